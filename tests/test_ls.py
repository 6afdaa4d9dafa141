"""`regfs ls` against `dvc list` on the basic registry, every revision (the other fixtures' modules
run the same comparison on their registries: tests/lsparity.py)."""

from __future__ import annotations

import pytest

from tests.lsparity import (
    ALL_TEXT_FLAGS,
    TEXT_FLAGS,
    TEXT_FLAGS_INSIDE_OUTPUTS,
    assert_ls_matches_dvc_list,
    dvc_list,
    regfs_ls,
)


@pytest.mark.parametrize(("rev", "paths", "text_flags"), [
    ("v1.0", (None,), ALL_TEXT_FLAGS),
    ("v1.0", ("données",), TEXT_FLAGS),
    ("v1.0", ("data", "data/sub"), TEXT_FLAGS_INSIDE_OUTPUTS),
    ("v2.0", (None,), TEXT_FLAGS),
    ("feature/x", (None,), TEXT_FLAGS),
    ("main", (None,), TEXT_FLAGS),
])
def test_ls_matches_dvc_list(basic, tools, oracle, regfs_cli, tmp_path, rev, paths, text_flags):
    assert_ls_matches_dvc_list(tools, regfs_cli, basic.path, rev, oracle.clone(basic.path, rev), tmp_path / "cache",
                               paths, text_flags)


def test_ls_of_a_file_and_of_nothing(basic, tools, regfs_cli, tmp_path):
    for path, flags in (("big.bin", ("--json",)), ("README.txt", ("--size", "--show-hash")), ("links/data-link", ())):
        assert regfs_ls(regfs_cli, basic.path, "v1.0", path, tmp_path, *flags) == \
            dvc_list(tools, basic.path, "v1.0", path, *flags), (path, flags)
    result = regfs_cli("ls", f"{basic.path}@v1.0", "no/such/path", "--cache-dir", tmp_path)
    assert result.returncode == 1 and "no/such/path" in result.stderr, result
