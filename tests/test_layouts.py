"""Repository layouts and configuration: sub-repositories, nested `.dvcignore`, hand-written
`.dvc/config` quirks, and the user's DVC config levels, each compared with `dvc pull`.

One registry holds the cases (branch `main`):

- `.dvc/config` written by hand as users do: comments (also inline), a quoted URL, a default remote
  named in another case than its section (`MixedCase`), a `remote://base/derived` remote used by
  an output's `remote: Derived`;
- `.dvcignore` files: the root one excludes `skipped/` and `*.off.txt.dvc`, `keep/.dvcignore`
  re-includes `*.off.txt.dvc` below it; ignored metafiles' objects are never pushed, so showing one
  would fail the read;
- a sub-repository `sub/` (`dvc init --subdir`) with its own default remote (a relative URL, so
  relative to `sub/.dvc/`), its own `.dvcignore` and a pipeline; the oracle runs `dvc pull` in the
  root and in `sub/`, as a user of the sub-repository would.

Branch `machine-config` names a default remote that only the machine's DVC config defines: the
system level (`DVC_SYSTEM_CONFIG_DIR`) gives a wrong URL, the global level (`DVC_GLOBAL_CONFIG_DIR`)
the right one and wins; `--remote-config` (the user's `config.local`) wins over both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lsparity import ALL_TEXT_FLAGS, assert_ls_matches_dvc_list
from tests.mounting import run_cli
from tests.registry import Registry
from tests.trees import assert_same_tree, snapshot, without

CONFIG = """\
# written by hand
[core]
    remote = MixedCase  # the default, named in another case than its section
['remote "mixedcase"']
    url = "../../store"  # quoted, then a comment
['remote "base"']
    url = ../../other-store
['remote "derived"']
    url = remote://Base/derived
"""

SUB_PIPELINE = """\
stages:
  make:
    cmd: printf '${greeting}\\n' > made.txt
    outs:
    - made.txt
"""


@dataclass
class LayoutRegistry:
    registry: Registry
    parent: Path


def in_subrepo(registry: Registry, *args: str) -> None:
    registry.tools.run([registry.dvc_executable, *args, "-q"], cwd=registry.path / "sub")


@pytest.fixture(scope="module")
def layouts(tools, tmp_path_factory) -> LayoutRegistry:
    parent = tmp_path_factory.mktemp("layouts")
    registry = Registry.create(tools, parent / "registry")
    (registry.path / ".dvc" / "config").write_text(CONFIG)
    registry.write("top.txt", "on the default remote\n")
    registry.write("derived.txt", "on remote://base/derived\n")
    registry.write("skipped/s.txt", "its metafile is in an ignored directory\n")
    registry.write("r.off.txt", "its metafile matches an ignore pattern\n")
    registry.write("keep/k.off.txt", "re-included by keep/.dvcignore\n")
    registry.write("keep/plain.txt", "a plain output below keep/\n")
    registry.add("top.txt", "derived.txt", "skipped/s.txt", "r.off.txt", "keep/k.off.txt", "keep/plain.txt")
    metafile = registry.path / "derived.txt.dvc"
    metafile.write_text(metafile.read_text() + "  remote: Derived\n")
    registry.write(".dvcignore", "skipped/\n*.off.txt.dvc\n")
    registry.write("keep/.dvcignore", "!*.off.txt.dvc\n")

    (registry.path / "sub").mkdir()
    in_subrepo(registry, "init", "--subdir")
    in_subrepo(registry, "remote", "add", "-d", "substore", "../../sub-store")
    registry.write("sub/inner.txt", "in the sub-repository\n")
    registry.write("sub/dir/a.txt", "a file of a directory output of the sub-repository\n")
    registry.write("sub/dir/deeper/b.bin", b"\x00\x01binary\x02")
    registry.write("sub/hidden.txt", "ignored by the sub-repository's .dvcignore\n")
    registry.write("sub/params.yaml", "greeting: hello from sub\n")
    registry.write("sub/dvc.yaml", SUB_PIPELINE)
    in_subrepo(registry, "add", "inner.txt", "dir", "hidden.txt")
    registry.write("sub/.dvcignore", "hidden.txt.dvc\n")
    in_subrepo(registry, "repro")
    in_subrepo(registry, "push")
    registry.push()
    registry.commit("layouts")

    registry.checkout("machine-config", new_branch=True)
    registry.write(".dvc/config", CONFIG.replace("remote = MixedCase", "remote = machine"))
    registry.commit("the default remote is the machine's")
    registry.checkout("main")
    return LayoutRegistry(registry, parent)


def test_fixture_exercises_the_layouts(layouts):
    """Guard: the ignored outputs were not pushed, the derived and sub-repository ones were."""
    store, other, sub_store = (layouts.parent / name for name in ("store", "other-store", "sub-store"))
    assert (other / "derived" / "files").is_dir() and (sub_store / "files").is_dir()
    pushed = {path.read_bytes() for path in store.rglob("*") if path.is_file()}
    assert b"on the default remote\n" in pushed and b"re-included by keep/.dvcignore\n" in pushed
    assert not pushed & {b"its metafile is in an ignored directory\n",
                         b"its metafile matches an ignore pattern\n"}
    assert not any(b"ignored by the sub" in path.read_bytes() for path in sub_store.rglob("*") if path.is_file())


def test_layouts_equal_the_oracle(layouts, mount, oracle):
    source = layouts.registry.path
    mounted = mount(f"{source}@main")
    actual = snapshot(mounted.path)
    expected = oracle.tree(source, "main", subrepos=["sub"])
    assert_same_tree(without(actual, "sub/.dvc"), without(expected, "sub/.dvc"), "layouts @main")
    # A sub-repository's `.dvc/` is shown as Git has it (the pull's cache and tmp are not in Git).
    in_git = layouts.registry.git_files("main")
    assert {path: entry for path, entry in actual.items() if path.startswith("sub/.dvc/")} == \
        {path: entry for path, entry in in_git.items() if path.startswith("sub/.dvc/")} != {}


def machine_levels(parent: Path, system_url: str, global_url: str) -> dict[str, str]:
    """DVC_SYSTEM_CONFIG_DIR and DVC_GLOBAL_CONFIG_DIR (below `parent`) with a `machine` remote each."""
    env = {}
    for level, url in (("system", system_url), ("global", global_url)):
        directory = parent / level
        directory.mkdir(parents=True)
        (directory / "config").write_text(f"[core]\n    check_update = false\n"
                                          f"['remote \"machine\"']\n    url = {url}\n")
        env[f"DVC_{level.upper()}_CONFIG_DIR"] = str(directory)
    return env


def regfs_get(tools, source: Path, rev: str, path: str, out: Path, env: dict[str, str], *args: str) -> dict:
    result = run_cli(["get", f"{source}@{rev}", path, "-o", out, "--cache-dir", out.parent / "cache", *args],
                     {**tools.env, **env}, out.parent / "cli")
    assert result.returncode == 0, result
    return {f"{path}/{relpath}": entry for relpath, entry in snapshot(out).items()}


def test_system_global_and_local_config_levels(layouts, oracle, tools, tmp_path):
    """`keep/` (on the default remote) through `regfs get`, against `dvc pull` with the same levels."""
    source, store = layouts.registry.path, layouts.parent / "store"
    wrong = str(layouts.parent / "no-such-store")
    # The global level wins over the system one.
    env = machine_levels(tmp_path / "levels", system_url=wrong, global_url=str(store))
    expected = oracle.tree(source, "machine-config", env=env)
    actual = regfs_get(tools, source, "machine-config", "keep", tmp_path / "levels" / "out", env)
    assert_same_tree(actual, without_all_but(expected, "keep"), "global over system")
    # What the user gives (config.local for DVC, --remote-config for regfs) wins over both.
    env = machine_levels(tmp_path / "local", system_url=wrong, global_url=wrong + "-too")
    expected = oracle.tree(source, "machine-config", env=env, local_config=[("machine", "url", str(store))])
    actual = regfs_get(tools, source, "machine-config", "keep", tmp_path / "local" / "out", env,
                       "--remote-config", f"machine.url={store}")
    assert_same_tree(actual, without_all_but(expected, "keep"), "local over global")


def without_all_but(tree: dict, directory: str) -> dict:
    return {path: entry for path, entry in tree.items() if path.startswith(directory + "/")}


def test_ls_matches_dvc_list(layouts, tools, oracle, regfs_cli, tmp_path):
    """Sub-repositories are left out of their parent's listing and listed when named; what
    `.dvcignore` excludes is not listed."""
    source = layouts.registry.path
    workspace = oracle.clone(source, "main", subrepos=["sub"])
    assert_ls_matches_dvc_list(tools, regfs_cli, source, "main", workspace, tmp_path / "cache", (None,), ALL_TEXT_FLAGS)
    assert_ls_matches_dvc_list(tools, regfs_cli, source, "main", workspace, tmp_path / "cache", ("sub", "keep"))
