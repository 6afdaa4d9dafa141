"""Branches and tags with hostile but legal Git names, mounted for real.

Every name here passes `git check-ref-format`: shell metacharacters, unicode, a 240-character
component, deep nesting, a name that looks like a sha, names starting with `-` or `@`, a tag and a
branch of one name. Unpinned, each ref is a symlink at its path to the right `@<sha>` (or, if it
cannot be a path, is left out with a logged warning) and the tree behind it is the DVC oracle's;
`URL@<name>` pins it, and `@<hex>` stays a commit even where a branch has that hex name (a full
sha also pins the commit, as `git rev-parse` reads it; a shorter prefix pins the branch). Names
that are no revision (`..`, `../../etc`, a 6-digit prefix, a blob) are ENOENT or one
`regfs: error:` line. Some refs are shell commands that would create a canary file if regfs ever
handed a revision to a shell; no test may find one. A ref name git itself forbids (`a..b`, only
possible in a corrupt `packed-refs`) fails a local registry with one clear line.
"""

from __future__ import annotations

import errno
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from regfs.api import RegistryFileSystem
from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, snapshot

# Ref name -> the commit (0, 1 or 2) it points at. All are shown in an unpinned mount.
SHOWN_BRANCHES = {
    "a;b": 0,
    "$(x)": 1,
    "`x`": 2,
    "a|b": 0,
    "a&b&&c": 1,
    "x>y<z": 2,
    "q'uote\"dq": 0,
    "!bang#hash%pct": 1,
    "{brace},=eq": 2,
    "${IFS}": 0,
    "ünïcödé-ß": 1,
    "日本語/データ": 2,
    "🎉": 0,
    "long-" + "x" * 240: 1,  # one component of 245 bytes (NAME_MAX is 255)
    "/".join(["n" * 100, "m" * 100, "o" * 100]): 2,
    "a/b/c": 0,
    "deadbeefdeadbeef": 1,  # a branch, not a commit prefix: shown by name, @deadbeef... is ENOENT
    "-dash": 2,
    "--help": 0,
    "x@y": 1,
}
SHOWN_TAGS = {"tag;$(y)": 2, "v`z`|w": 0}
ANNOTATED_TAGS = {"rel&$(q)": 1}
# A component starting with `@` would shadow the `@<sha>` namespace: left out, with a warning.
UNSHOWABLE_BRANCHES = {"@lead": 1, "a2/@b": 2}
# A tag and a branch of one name: the tag wins, as in `git rev-parse`. A branch below a tag's
# name cannot be a path (the tag's symlink is there): left out, with a warning.
SAME_NAME = "same"
BELOW_A_TAG = "dup/inner"
# Refs that name no commit are not shown at all.
BLOB_TAG = "blob-tag"
# Pinned mounts cost a daemon each: these cover every kind of name above (the API pins them all).
PINNED_BY_MOUNT = ["$(x)", "`x`", "a;b", "q'uote\"dq", "日本語/データ", "long-" + "x" * 240,
                   "/".join(["n" * 100, "m" * 100, "o" * 100]), "deadbeefdeadbeef", "--help", "@lead",
                   SAME_NAME, BELOW_A_TAG, *ANNOTATED_TAGS]
# Shell commands that would each create one canary file (`${IFS}` is a space to a shell).
CANARY_COMMANDS = ["c1;touch${{IFS}}{canary}", "$(touch${{IFS}}{canary})", "`touch${{IFS}}{canary}`",
                   "c4|touch${{IFS}}{canary}", "c5&&touch${{IFS}}{canary}"]


@dataclass
class HostileRegistry:
    registry: Registry
    commits: list[str]
    refs: dict[str, str]  # every name expected at its path in an unpinned mount -> commit sha
    pinnable: dict[str, str]  # every name `URL@<name>` must pin -> commit sha
    canaries: list[Path]
    warned: list[str] = field(default_factory=list)  # refs left out with a warning

    @property
    def path(self) -> Path:
        return self.registry.path

    def canaries_found(self) -> list[Path]:
        return [canary for canary in self.canaries if os.path.lexists(canary)]


def check_ref_format(registry: Registry, refname: str) -> None:
    """Fail the fixture, not silently skip a name, if this git refuses it."""
    result = registry.tools.run(["git", "check-ref-format", refname], cwd=registry.path, check=False)
    if result.returncode != 0:
        pytest.fail(f"git check-ref-format refuses {refname!r}: the test's names need updating",
                    pytrace=False)


def make_ref(registry: Registry, refname: str, target: str) -> None:
    check_ref_format(registry, refname)
    registry.git("update-ref", refname, target)  # no `git branch NAME`: `-dash` would be an option


def peeled(registry: Registry, refname: str) -> str:
    return registry.git("rev-parse", "--verify", "--end-of-options", f"{refname}^{{commit}}").strip()


@pytest.fixture(scope="module")
def hostile(tools, tmp_path_factory) -> HostileRegistry:
    """Three commits (outputs changing, then a Git-only change) and refs with hostile names."""
    parent = tmp_path_factory.mktemp("hostile-names")
    canary_dir = tmp_path_factory.mktemp("canaries")
    registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"},
                               default_remote="store")
    registry.write("README.txt", "hostile names\n")
    registry.write("data.bin", random_bytes(71, 5000))
    registry.write("images/a.txt", "a\n")
    registry.write("images/sub/b.bin", random_bytes(72, 3000))
    registry.add("data.bin", "images")
    registry.push()
    commits = [registry.commit("first")]
    registry.write("data.bin", random_bytes(73, 7000))
    registry.write("images/c.txt", "c\n")
    registry.add("data.bin", "images")
    registry.push()
    commits.append(registry.commit("second"))
    registry.write("README.txt", "hostile names, a Git-only change\n")
    commits.append(registry.commit("third"))

    refs = {"main": commits[2], "HEAD": commits[2]}
    for name, number in SHOWN_BRANCHES.items():
        make_ref(registry, f"refs/heads/{name}", commits[number])
        refs[name] = commits[number]
    for name, number in SHOWN_TAGS.items():
        make_ref(registry, f"refs/tags/{name}", commits[number])
        refs[name] = commits[number]
    for name, number in ANNOTATED_TAGS.items():
        check_ref_format(registry, f"refs/tags/{name}")
        registry.git("tag", "-a", "-m", f"annotated {name}", "--", name, commits[number])
        refs[name] = commits[number]
    for name, number in UNSHOWABLE_BRANCHES.items():
        make_ref(registry, f"refs/heads/{name}", commits[number])
    make_ref(registry, f"refs/tags/{SAME_NAME}", commits[0])
    make_ref(registry, f"refs/heads/{SAME_NAME}", commits[1])
    refs[SAME_NAME] = commits[0]
    make_ref(registry, "refs/tags/dup", commits[0])
    refs["dup"] = commits[0]
    make_ref(registry, f"refs/heads/{BELOW_A_TAG}", commits[1])
    make_ref(registry, f"refs/tags/{BLOB_TAG}", registry.git("rev-parse", f"{commits[0]}:README.txt").strip())
    # A branch named like the first commit's sha prefix, on the second commit (git warns that the
    # name is ambiguous, and `git rev-parse` takes the branch).
    make_ref(registry, f"refs/heads/{commits[0][:12]}", commits[1])
    refs[commits[0][:12]] = commits[1]
    # A branch named with the first commit's full sha, on the third commit: at its path it is that
    # branch's symlink, but as a revision a full sha is the commit (git warns that such a ref is
    # ignored when the 40 hex digits are given).
    make_ref(registry, f"refs/heads/{commits[0]}", commits[2])
    refs[commits[0]] = commits[2]

    canaries = []
    for number, command in enumerate(CANARY_COMMANDS):
        canary = canary_dir / f"canary-{number}"
        name = command.format(canary=canary)
        make_ref(registry, f"refs/heads/{name}", commits[number % 3])
        refs[name] = commits[number % 3]
        canaries.append(canary)

    pinnable = {name: sha for name, sha in refs.items() if name != "HEAD"}
    for name in UNSHOWABLE_BRANCHES:
        pinnable[name] = peeled(registry, f"refs/heads/{name}")
    pinnable[BELOW_A_TAG] = commits[1]
    pinnable[commits[0]] = commits[0]
    for name, sha in pinnable.items():  # what git itself says, by full ref name (a full sha by itself)
        kind = "tags" if name in (*SHOWN_TAGS, *ANNOTATED_TAGS, SAME_NAME, "dup") else "heads"
        assert peeled(registry, name if name == commits[0] else f"refs/{kind}/{name}") == sha, name
    result = HostileRegistry(registry, commits, refs, pinnable, canaries,
                             warned=[*UNSHOWABLE_BRANCHES, BELOW_A_TAG])
    assert not result.canaries_found(), "a canary exists before any test ran"
    return result


@pytest.fixture
def no_canary(hostile):
    """Every test of this module ends by checking that no revision went through a shell."""
    yield
    found = hostile.canaries_found()
    assert not found, f"a revision string was run by a shell: {found}"


def link_target(name: str, commit_sha: str) -> str:
    return "../" * name.count("/") + "@" + commit_sha


def test_unpinned_mount_shows_each_hostile_ref_at_its_path(hostile, mount, oracle, no_canary):
    mounted = mount(hostile.path)
    top_level = {name.split("/", 1)[0] for name in hostile.refs}
    assert sorted(os.listdir(mounted.path)) == sorted(top_level)

    failures = []
    for name, commit_sha in sorted(hostile.refs.items()):
        link = mounted / name
        parent, _, leaf = name.rpartition("/")
        if leaf not in os.listdir(mounted / parent if parent else mounted.path):
            failures.append(f"{name!r}: not listed in its directory")
        elif not os.path.islink(link) or os.readlink(link) != link_target(name, commit_sha):
            failures.append(f"{name!r}: {os.readlink(link) if os.path.islink(link) else 'not a symlink'}, "
                            f"expected -> {link_target(name, commit_sha)}")
        else:
            expected = oracle.tree(hostile.path, commit_sha)
            actual = snapshot(link)
            if actual != expected:
                failures.append(f"{name!r}: its tree differs from the oracle of {commit_sha[:10]}")
    assert not failures, "hostile refs in the unpinned mount:\n" + "\n".join(failures)


def test_refs_that_cannot_be_paths_are_left_out_with_a_warning(hostile, mount, no_canary):
    mounted = mount(hostile.path)
    assert not os.path.lexists(mounted / BELOW_A_TAG), "a branch below a tag's symlink was shown"
    assert os.readlink(mounted / "dup") == "@" + hostile.refs["dup"]
    assert not os.path.lexists(mounted / "a2"), "a directory was made for a ref that is not shown"
    for name in ("@lead", BLOB_TAG):
        with pytest.raises(OSError) as caught:
            os.lstat(mounted / name)
        assert caught.value.errno == errno.ENOENT, f"{name}: {caught.value!r}"
    log = mounted.log_text()
    for name in hostile.warned:
        assert re.search(rf"WARNING .*not showing ref {re.escape(repr(name))}", log), \
            f"no warning names the ref {name!r} left out:\n{mounted.log_tail()}"


def test_url_at_a_hostile_name_pins_that_commit(hostile, mount, oracle, no_canary, tmp_path):
    """`regfs mount URL@NAME` for every hostile name (three mounts at a time, one cache)."""
    names = [*PINNED_BY_MOUNT, CANARY_COMMANDS[1].format(canary=hostile.canaries[1]), hostile.commits[0][:12],
             hostile.commits[0]]
    trees = oracle.trees(hostile.path, [hostile.pinnable[name] for name in names])
    expected = {name: trees[hostile.pinnable[name]] for name in names}

    def check(name: str) -> str | None:
        mounted = mount(f"{hostile.path}@{name}", check=False, cache_dir=tmp_path / "shared-cache")
        try:
            if mounted.result.returncode != 0 or not os.path.ismount(mounted.path):
                return f"{name!r}: regfs mount failed: {mounted.result}"
            if snapshot(mounted.path) != expected[name]:
                return f"{name!r}: the pinned tree is not that of {hostile.pinnable[name][:10]}"
            return None
        finally:
            mounted.unmount()

    with ThreadPoolExecutor(max_workers=3) as pool:
        failures = [failure for failure in pool.map(check, names) if failure]
    assert not failures, "pinned mounts of hostile names:\n" + "\n".join(failures)


def test_every_hostile_name_pins_its_commit_through_the_api(hostile, tmp_path, no_canary):
    """The same resolution, in one process for every name (fsspec: `rev=` is the `@REV`)."""
    wrong = {}
    for name, commit_sha in sorted(hostile.pinnable.items()):
        filesystem = RegistryFileSystem(repo=str(hostile.path), rev=name, cache_dir=str(tmp_path / "cache"),
                                        skip_instance_cache=True)
        if filesystem.commit_sha != commit_sha:
            wrong[name] = filesystem.commit_sha
    assert not wrong, f"names pinned to the wrong commit: {wrong}"


def test_names_that_are_no_revision_are_enoent(hostile, mount, no_canary):
    mounted = mount(hostile.path)
    registry = hostile.registry
    blob = registry.git("rev-parse", f"{hostile.commits[0]}:README.txt").strip()
    tree = registry.git("rev-parse", f"{hostile.commits[0]}^{{tree}}").strip()
    assert not any(sha.startswith("deadbeefdeadbeef") for sha in hostile.commits)  # a branch's name only
    names = ["@..", "@../../etc", "@.", "@", f"@{hostile.commits[0][:6]}", f"@{blob}", f"@{tree}",
             f"@{blob[:10]}", "@deadbeefdeadbeef", "@$(x)", "@a;b", f"@{hostile.commits[0]}\n",
             f"@{hostile.commits[0]}x", "@HEAD", "@main"]
    failures = []
    for name in names:
        try:
            status = os.stat(mounted / name)
        except OSError as error:
            if error.errno != errno.ENOENT:
                failures.append(f"{name!r}: {error!r}, expected ENOENT")
        else:
            failures.append(f"{name!r} exists (mode {status.st_mode:o}), expected ENOENT")
    assert not failures, "names that are no revision:\n" + "\n".join(failures)
    # A real prefix still works next to them.
    assert os.path.isdir(mounted / f"@{hostile.commits[0][:7]}")


def test_at_hex_is_a_commit_even_where_a_branch_has_that_name(hostile, mount, oracle, no_canary):
    """`@<hex>` names a commit by id: branches named with the first commit's sha prefix (shown as
    a ref, pointing at the second commit) and with its full sha (pointing at the third) must not
    stand in for it."""
    mounted = mount(hostile.path)
    first, second, third = hostile.commits
    for name, branch_commit in ((first[:12], second), (first, third)):
        assert os.readlink(mounted / name) == "@" + branch_commit
        assert_same_tree(snapshot(mounted / f"@{name}"), oracle.tree(hostile.path, first),
                         f"@{name} (a commit's sha and a branch name)")
        assert_same_tree(snapshot(mounted / name), oracle.tree(hostile.path, branch_commit),
                         f"{name} (the branch)")


@pytest.mark.parametrize("revision", ["..", "../../etc", "@", "{six_hex}", "{blob}", "$(x)x", BLOB_TAG,
                                      "deadbeefdeadbeef/../a;b"])
def test_pinning_a_name_that_is_no_revision_fails_cleanly(hostile, mount, no_canary, revision):
    blob = hostile.registry.git("rev-parse", f"{hostile.commits[0]}:README.txt").strip()
    revision = revision.format(six_hex=hostile.commits[0][:6], blob=blob)
    mounted = mount(f"{hostile.path}@{revision}", check=False, expect_errors=r"unknown revision")
    assert mounted.result.returncode == 1, mounted.result
    assert not os.path.ismount(mounted.path)
    lines = mounted.result.error_lines()
    assert len(lines) == 1 and "revision" in lines[0], mounted.result
    assert "Traceback" not in mounted.result.stderr


@pytest.mark.parametrize("command", ["$(touch {canary})", "`touch {canary}`", "x;touch {canary}",
                                     "x|touch {canary}", "x&&touch {canary}", "$(touch${{IFS}}{canary})"])
def test_ls_of_a_shell_command_revision_fails_cleanly_and_runs_nothing(hostile, regfs_cli, tmp_path,
                                                                      no_canary, command):
    canary = tmp_path / "pwned"
    revision = command.format(canary=canary)
    result = regfs_cli("ls", f"{hostile.path}@{revision}", "--cache-dir", tmp_path / "cache")
    assert result.returncode == 1, result
    lines = result.error_lines()
    assert len(lines) == 1 and "unknown revision" in lines[0], result
    assert "Traceback" not in result.stderr and result.stdout == "", result
    assert not os.path.lexists(canary), f"`regfs ls` ran the revision through a shell: {canary} exists"
    assert not hostile.canaries_found()


def test_ls_of_hostile_names_lists_their_trees(hostile, regfs_cli, oracle, tmp_path, no_canary):
    failures = []
    for name in ["a;b", "$(x)", "日本語/データ", "--help", "@lead", *CANARY_COMMANDS[:1]]:
        name = name.format(canary=hostile.canaries[0]) if "{canary}" in name else name
        result = regfs_cli("ls", f"{hostile.path}@{name}", "--cache-dir", tmp_path / "cache")
        expected = sorted(relpath for relpath in oracle.tree(hostile.path, hostile.pinnable[name])
                          if "/" not in relpath)
        if result.returncode != 0 or sorted(result.stdout.splitlines()) != expected:
            failures.append(f"{name!r}: {result}\nexpected {expected}")
    assert not failures, "\n".join(failures)


def test_a_ref_name_git_forbids_fails_a_local_registry_with_one_clear_line(tools, regfs_cli, tmp_path):
    """`..` is no part of a legal ref name, but a corrupt or hostile `packed-refs` can hold one.
    libgit2 then refuses to fetch from the local registry at all: `regfs ls` says so in one line
    naming the ref, and a mirror fetched earlier is served instead."""
    registry = Registry.create(tools, tmp_path / "registry")
    registry.write("README.txt", "a registry with a ref git forbids\n")
    commit_sha = registry.commit("readme")
    cache, early_cache = tmp_path / "cache", tmp_path / "early-cache"
    early = regfs_cli("ls", f"{registry.path}@main", "--cache-dir", early_cache)
    assert early.returncode == 0 and "README.txt" in early.stdout.split(), early

    registry.git("pack-refs", "--all")
    with open(registry.path / ".git" / "packed-refs", "a") as packed:
        packed.write(f"{commit_sha} refs/heads/a..b\n")
    result = regfs_cli("ls", f"{registry.path}@main", "--cache-dir", cache)
    assert result.returncode == 1, result
    lines = result.error_lines()
    assert len(lines) == 1 and "refs/heads/a..b" in lines[0], result
    assert "Traceback" not in result.stderr

    served = regfs_cli("ls", f"{registry.path}@main", "--cache-dir", early_cache)
    assert served.returncode == 0 and "README.txt" in served.stdout.split(), served
    assert "serving the mirror as fetched at" in served.stderr and "refs/heads/a..b" in served.stderr
