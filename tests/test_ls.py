"""`regfs ls` against `dvc list` on the basic registry.

`dvc list --rev REV` is the oracle for names, `isdir` and `isout`. It is not for `isexec`: DVC
3.67 reports `isexec: false` for an output recorded `isexec: true`, so `isexec` is checked against
the executable bits of the pulled workspace, which is what the mount shows.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.registry import Tools


def dvc_list(tools: Tools, source: str, rev: str, path: str | None, *flags: str) -> str:
    args = [tools.dvc3, "list", source, *([path] if path else []), "--rev", rev, *flags]
    return tools.run(args, cwd=tools.workdir).stdout.decode()


def regfs_ls(regfs_cli, basic, rev, path, tmp_path, *flags):
    result = regfs_cli("ls", f"{basic.path}@{rev}", *([path] if path else []), *flags,
                       "--cache-dir", tmp_path / "ls-cache")
    assert result.returncode == 0, result
    return result.stdout


@pytest.mark.parametrize(
    ("rev", "path", "recursive"),
    [
        ("v1.0", None, False),
        ("v2.0", None, False),
        ("feature/x", None, False),
        ("v1.0", "data", False),
        ("v1.0", "data/sub", False),
        ("v2.0", "données", False),
        ("v1.0", None, True),
        ("v2.0", "data", True),
    ],
)
def test_ls_names_match_dvc_list(basic, tools, regfs_cli, tmp_path, rev, path, recursive):
    flags = ("-R",) if recursive else ()
    expected = dvc_list(tools, str(basic.path), rev, path, *flags).splitlines()
    actual = regfs_ls(regfs_cli, basic, rev, path, tmp_path, *flags).splitlines()
    assert sorted(actual) == sorted(expected), "regfs ls and dvc list name different entries"
    assert actual == expected, f"same entries, different order:\nregfs ls: {actual}\ndvc list: {expected}"


@pytest.mark.parametrize(("rev", "path", "recursive"), [("v1.0", None, False), ("v1.0", "data", True)])
def test_ls_json_matches_dvc_list_and_the_workspace(basic, tools, oracle, regfs_cli, tmp_path, rev, path,
                                                    recursive):
    flags = ("-R",) if recursive else ()
    expected = json.loads(dvc_list(tools, str(basic.path), rev, path, "--json", *flags))
    actual = json.loads(regfs_ls(regfs_cli, basic, rev, path, tmp_path, "--json", *flags))
    assert isinstance(actual, list)
    assert [entry["path"] for entry in actual] == [entry["path"] for entry in expected]
    assert {entry["path"]: (entry["isdir"], entry["isout"]) for entry in actual} == \
        {entry["path"]: (entry["isdir"], entry["isout"]) for entry in expected}

    workspace = oracle.clone(basic.path, rev)
    base = workspace / path if path else workspace
    for entry in actual:
        on_disk = base / entry["path"]
        want_exec = on_disk.is_file() and not on_disk.is_symlink() and os.access(on_disk, os.X_OK)
        assert entry["isexec"] is want_exec, f"{entry} vs the pulled workspace"
