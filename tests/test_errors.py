"""What regfs refuses: every change to the tree (EROFS), and bad mount requests (one clear
`regfs: error:` line, non-zero exit, nothing left mounted or running)."""

from __future__ import annotations

import errno
import os

from tests.mounting import is_mounted
from tests.trees import snapshot


def attempt(operation) -> str | None:
    """None if `operation` failed with EROFS, else a description of what happened."""
    try:
        operation()
    except OSError as error:
        return None if error.errno == errno.EROFS else f"{errno.errorcode.get(error.errno)}: {error}"
    return "succeeded"


def write_operations(root):
    """(name, operation) pairs, each of which must fail with EROFS under `root`."""

    def open_for(path, flags):
        return lambda: os.close(os.open(root / path, flags, 0o644))

    return [
        ("open O_WRONLY a DVC file", open_for("run.sh", os.O_WRONLY)),
        ("open O_RDWR a DVC file in a directory output", open_for("data/a.txt", os.O_RDWR)),
        ("open O_WRONLY|O_APPEND a Git file", open_for("README.txt", os.O_WRONLY | os.O_APPEND)),
        ("open O_TRUNC", open_for("README.txt", os.O_WRONLY | os.O_TRUNC)),
        ("create at the root", open_for("new.txt", os.O_WRONLY | os.O_CREAT)),
        ("create in a directory output", open_for("data/new-file.txt", os.O_WRONLY | os.O_CREAT)),
        ("create in a Git directory", open_for("tools/new.sh", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
        ("mkdir", lambda: os.mkdir(root / "new-dir")),
        ("mkdir in a directory output", lambda: os.mkdir(root / "data/new-dir")),
        ("rmdir", lambda: os.rmdir(root / "data/sub/deeper")),
        ("unlink a DVC file", lambda: os.unlink(root / "run.sh")),
        ("unlink a Git file", lambda: os.unlink(root / "README.txt")),
        ("unlink a Git symlink", lambda: os.unlink(root / "link-to-run")),
        ("rename", lambda: os.rename(root / "run.sh", root / "renamed.sh")),
        ("rename in a directory output", lambda: os.rename(root / "data/a.txt", root / "data/b.txt")),
        ("chmod", lambda: os.chmod(root / "run.sh", 0o777)),
        ("chmod a directory", lambda: os.chmod(root / "data", 0o777)),
        ("chown", lambda: os.chown(root / "run.sh", 1, 1)),
        ("truncate", lambda: os.truncate(root / "run.sh", 0)),
        ("truncate a Git file", lambda: os.truncate(root / "README.txt", 1)),
        ("symlink", lambda: os.symlink("run.sh", root / "new-link")),
        ("hard link", lambda: os.link(root / "run.sh", root / "hard-link")),
    ]


def test_every_change_is_erofs_on_a_pinned_mount(basic, mount, oracle):
    mounted = mount(f"{basic.path}@v1.0")
    outcomes = {name: attempt(operation) for name, operation in write_operations(mounted.path)}
    wrong = {name: outcome for name, outcome in outcomes.items() if outcome is not None}
    assert not wrong, f"operations that did not fail with EROFS: {wrong}"
    assert snapshot(mounted.path) == oracle.tree(basic.path, "v1.0"), "the tree changed"


def test_every_change_is_erofs_on_an_unpinned_mount(basic, mount):
    mounted = mount(basic.path)
    operations = [(f"[v2.0/] {name}", operation) for name, operation in write_operations(mounted / "v2.0")]
    operations += [
        ("mkdir a ref", lambda: os.mkdir(mounted / "new-branch")),
        ("symlink a ref", lambda: os.symlink("@" + basic.refs["v1.0"], mounted / "new-tag")),
        ("unlink a ref", lambda: os.unlink(mounted / "v1.0")),
        ("rename a ref", lambda: os.rename(mounted / "v1.0", mounted / "v1.1")),
        ("rmdir a ref directory", lambda: os.rmdir(mounted / "feature")),
        ("create at the root", lambda: os.close(os.open(mounted / "f", os.O_WRONLY | os.O_CREAT))),
    ]
    wrong = {name: outcome for name, operation in operations if (outcome := attempt(operation)) is not None}
    assert not wrong, f"operations that did not fail with EROFS: {wrong}"
    assert os.readlink(mounted / "v1.0") == "@" + basic.refs["v1.0"]


def assert_clean_failure(mounted, *mentions: str) -> None:
    """`regfs mount` failed as the contract says: non-zero exit, one `regfs: error:` line that
    names what was wrong, no traceback, nothing mounted (the fixture checks no daemon is left)."""
    result = mounted.result
    assert result.returncode != 0, f"regfs mount {mounted.source} succeeded: {result}"
    lines = result.error_lines()
    assert len(lines) == 1, f"expected one `regfs: error:` line on stderr: {result}"
    assert "Traceback" not in result.stderr, result
    for mention in mentions:
        assert mention in lines[0], f"{mention!r} not named in {lines[0]!r}"
    assert not is_mounted(mounted.path)


def test_unknown_revision(basic, mount):
    mounted = mount(f"{basic.path}@nope", check=False, expect_errors=True)
    assert_clean_failure(mounted, "nope")


def test_source_that_is_not_a_git_repo(mount, tmp_path):
    not_a_repo = tmp_path / "plain-directory"
    not_a_repo.mkdir()
    (not_a_repo / "file.txt").write_text("not git\n")
    mounted = mount(not_a_repo, check=False, expect_errors=True)
    assert_clean_failure(mounted)


def test_source_that_does_not_exist(mount, tmp_path):
    mounted = mount(tmp_path / "no-such-registry", check=False, expect_errors=True)
    assert_clean_failure(mounted)


def test_missing_mountpoint(basic, mount, tmp_path):
    missing = tmp_path / "no-such-mountpoint"
    mounted = mount(basic.path, check=False, expect_errors=True, mountpoint=missing)
    assert_clean_failure(mounted)
    assert not missing.exists(), "regfs must not create the mountpoint"


def test_mountpoint_already_mounted(basic, mount):
    first = mount(f"{basic.path}@v1.0")
    second = mount(f"{basic.path}@v2.0", check=False, expect_errors=True, mountpoint=first.path)
    assert second.result.returncode != 0, second.result
    assert len(second.result.error_lines()) == 1, second.result
    assert "Traceback" not in second.result.stderr, second.result
    assert (first / "run.sh").read_bytes() == b"#!/bin/sh\necho run v1\n", "the first mount was disturbed"
    second.unmount()
    assert is_mounted(first.path), "unmounting the refused second mount took the first one down"


def test_ls_unknown_revision(basic, regfs_cli, tmp_path):
    result = regfs_cli("ls", f"{basic.path}@nope", "--cache-dir", tmp_path / "cache")
    assert result.returncode != 0, result
    lines = result.error_lines()
    assert len(lines) == 1 and "nope" in lines[0], result
    assert "Traceback" not in result.stderr, result
