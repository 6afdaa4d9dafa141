"""`dvc import` and `dvc import-url` outputs: an import's bytes live with its source registry, read
through the source's own metafiles and remotes at the recorded revision, as `dvc pull` reads them.

The importer imports from four sources:

- `basic` (DVC 3): a file, a directory, a file inside a directory output, a Git-tracked file, a
  file at a tag (`--rev v1.0`) and on a branch (`--rev feature/x`), and one with `--no-download`
  (no hash recorded: regfs, like `dvc pull`, takes it from the source);
- `options`, whose objects are only on a remote that its default does not name: reached through
  what `dvc import` recorded, `--remote NAME`, `--config FILE`, `--remote-config KEY=VALUE`
  (options for the source's default remote) and `--remote NAME --remote-config ...`;
- `no-remote`, with no remote at all: its own cache is the store (a directory, and a directory
  imported `--no-download`);
- `legacy`, written by DVC 2 (legacy hashes and layout), imported by DVC 3.

Plus `dvc import-url` of a local file and of a URL served on 127.0.0.1 (their objects are pushed to
the importer's own remote), and an output of its own. A second registry, `chained`, imports from
the importer: imports of imports.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.httpserver import HTTPRemoteServer
from tests.lsparity import assert_ls_matches_dvc_list
from tests.registry import Registry, run_concurrently
from tests.trees import assert_same_tree, snapshot


@dataclass
class Imports:
    importer: Registry
    chained: Registry


def build_options_source(tools, parent: Path) -> Registry:
    """Objects pushed only to `alt`; the default `store` and `alt2` (a wrong URL) hold nothing."""
    registry = Registry.create(tools, parent / "options",
                               remotes={"store": "../options-store", "alt": "../options-alt",
                                        "alt2": "../nowhere"},
                               default_remote="store")
    for name in ("only-alt", "cfg", "rc-default", "rc-named"):
        registry.write(f"{name}.txt", f"reached through --{name}\n")
    registry.add("only-alt.txt", "cfg.txt", "rc-default.txt", "rc-named.txt")
    registry.push("-r", "alt")
    registry.commit("objects on alt only")
    return registry


def build_no_remote_source(tools, parent: Path) -> Registry:
    registry = Registry.create(tools, parent / "no-remote")
    registry.write("nr-dir/a.txt", "a directory in the source's cache\n")
    registry.write("nd-dir/b/c.txt", "imported with --no-download\n")
    registry.add("nr-dir", "nd-dir")
    registry.commit("cache only")
    return registry


def build_legacy_source(tools, parent: Path) -> Registry:
    registry = Registry.create(tools, parent / "legacy", remotes={"store": "../legacy-store"},
                               default_remote="store", dvc_executable=tools.dvc2)
    registry.write("legacy-dir/a.txt", b"written by dvc 2\r\nwith CRLF\r\n")
    registry.write("legacy-dir/b.bin", b"\x00\r\n\x01")
    registry.add("legacy-dir")
    registry.push()
    registry.commit("written by DVC 2")
    return registry


@pytest.fixture(scope="module")
def imports(request, tools, tmp_path_factory) -> Imports:
    parent = tmp_path_factory.mktemp("imports")
    # The basic registry is asked for only once these are built: another pytest-xdist worker may
    # be building it meanwhile.
    options, no_remote, legacy, registry, chained = run_concurrently(
        lambda: build_options_source(tools, parent),
        lambda: build_no_remote_source(tools, parent),
        lambda: build_legacy_source(tools, parent),
        lambda: Registry.create(tools, parent / "importer", remotes={"store": "../store"}, default_remote="store"),
        lambda: Registry.create(tools, parent / "chained", remotes={"store": "../chained-store"},
                                default_remote="store"))
    alt = str(parent / "options-alt")
    config_file = parent / "import-config"
    config_file.write_text("[core]\n    remote = alt\n['remote \"alt\"']\n    url = ../options-alt\n")

    source = str(request.getfixturevalue("basic").path)
    (registry.path / "imported").mkdir()
    registry.write(str(parent / "external" / "ext.bin"), b"\x00imported from a local path\xff")
    registry.write(str(parent / "web" / "page.txt"), "imported from a URL\n")
    registry.write("own.txt", "the importer's own output\n")
    server = HTTPRemoteServer(parent / "web").start()
    try:
        registry.dvc_concurrently(
            ("import", source, "run.sh"),
            ("import", source, "data", "-o", "imported/data"),
            ("import", "--rev", "v1.0", source, "données/été 1.txt", "-o", "imported/old été.txt"),
            ("import", "--rev", "feature/x", source, "feature.txt", "-o", "imported/feature.txt"),
            ("import", source, "README.txt", "-o", "imported/readme-from-git.txt"),
            ("import", source, "data/sub/tool.sh", "-o", "imported/tool-from-a-directory.sh"),
            ("import", "--no-download", source, "models/v1/weights.bin", "-o", "imported/weights.bin"),
            ("import", "--remote", "alt", options.path, "only-alt.txt"),
            ("import", "--config", config_file, options.path, "cfg.txt"),
            ("import", options.path, "rc-default.txt", "--remote-config", "url=../options-alt"),
            ("import", options.path, "rc-named.txt", "--remote", "alt2", "--remote-config", f"url={alt}"),
            ("import", no_remote.path, "nr-dir"),
            ("import", "--no-download", no_remote.path, "nd-dir"),
            ("import", legacy.path, "legacy-dir"),
            ("import-url", parent / "external" / "ext.bin", "ext.bin"),
            ("import-url", f"{server.url}/page.txt", "page.txt"),
            ("add", "own.txt"))
    finally:
        server.stop()
    registry.push()
    registry.commit("imports")

    chained.dvc_concurrently(("import", registry.path, "run.sh", "-o", "run-via-importer.sh"),
                             ("import", registry.path, "imported/data", "-o", "data-via-importer"))
    chained.commit("imports of imports")
    # Hand-written (DVC cannot make them): imports of themselves, a file and a directory.
    chained.checkout("cycle", new_branch=True)
    for name, md5 in (("loop.txt", "0123456789abcdef0123456789abcdef"),
                      ("loop-dir", "0123456789abcdef0123456789abcdef.dir")):
        chained.write(f"{name}.dvc", f"deps:\n- path: {name}\n  repo:\n    url: {chained.path}\n    rev: cycle\n"
                                     f"outs:\n- md5: {md5}\n  hash: md5\n  path: {name}\n")
    chained.commit("import cycles")
    chained.checkout("main")
    return Imports(registry, chained)


def test_import_options_were_recorded(imports):
    """Guard: the fixture exercises the forms it claims (DVC records each differently)."""
    importer = imports.importer.path
    assert "remote: alt" in (importer / "only-alt.txt.dvc").read_text()
    assert "config: /" in (importer / "cfg.txt.dvc").read_text()
    assert "remote:\n      url:" in (importer / "rc-default.txt.dvc").read_text()
    assert "core:\n        remote: alt2" in (importer / "rc-named.txt.dvc").read_text()
    no_download = (importer / "imported" / "weights.bin.dvc").read_text()
    assert "md5:" not in no_download.split("outs:")[1], no_download


# DVC 3.67's `dvc pull` does not use the remote that `dvc import --remote NAME` recorded (it looks
# on the source's default remote and fails), although `dvc import` itself used it: for these, what
# `dvc import` downloaded into the importer's workspace is the ground truth.
DVC_PULL_FAILS = {"only-alt.txt"}


def test_imports_equal_the_oracle(imports, mount, oracle):
    importer = imports.importer.path
    mounted = mount(f"{importer}@main")
    expected = dict(oracle.tree(importer, "main", pull_check=False))
    not_pulled = {path for path in DVC_PULL_FAILS if path not in expected}
    assert not_pulled <= DVC_PULL_FAILS
    expected.update({path: ("file", False, (importer / path).read_bytes()) for path in not_pulled})
    assert_same_tree(snapshot(mounted.path), expected, "importer @main")


def test_ls_matches_dvc_list(imports, tools, oracle, regfs_cli, tmp_path):
    for registry, paths in ((imports.importer, (None, "imported")), (imports.chained, (None,))):
        workspace = oracle.clone(registry.path, "main", pull_check=registry is imports.chained)
        assert_ls_matches_dvc_list(tools, regfs_cli, registry.path, "main", workspace, tmp_path / "cache", paths)


def test_imports_of_imports_equal_the_oracle_and_cycles_fail(imports, mount, oracle):
    chained = imports.chained.path
    mounted = mount(chained, expect_errors=r"cycle")
    assert_same_tree(snapshot(mounted / "main"), oracle.tree(chained, "main"), "chained @main")
    for path in ("loop.txt", "loop-dir/x"):
        with pytest.raises(OSError) as caught:
            (mounted / "cycle" / path).read_bytes()
        assert caught.value.errno in (errno.EIO, errno.ENOENT), caught.value
    assert "cycle" in mounted.log_text()
