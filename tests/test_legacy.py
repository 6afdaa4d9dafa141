"""Registries written by DVC 2.x (legacy "md5-dos2unix" hashing, objects at `<remote>/ab/cdef`),
then extended with DVC 3 (plain md5, `files/md5/ab/cdef`) in the same repo and remote.

Legacy text objects are named by the hash of their bytes with CRLF turned into LF, so a reader
that verifies downloads with plain md5 rejects them; the files here make that visible: CRLF text,
mixed endings, CRLF pairs split across read-buffer boundaries, binary data full of CRLF.

The branch `old-formats` holds what DVC 1.x and 0.x wrote and DVC 2 still reads (DVC 3 refuses
both): a `.dvc` file with several outputs, a `wdir`, and the old keys `cmd`, `md5`, `locked`,
`deps`, `metric`, `persist`; and a `dvc.lock` 1.0 (no `schema` key, stages at the top, outputs
without sizes). No DVC 1.x runs here, so both are DVC 2.58's own files rewritten into the old
shape (the inverse of DVC 2's `migrate_lock_v1_to_v2`), and DVC 2.58 is their oracle.
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import dataclass

import pytest
import yaml

from tests.lsparity import assert_ls_matches_dvc_list
from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, md5_hex, missing_from_cache, object_path, snapshot


def text_with_split_crlfs() -> bytes:
    """About 1.2 MiB of text whose CRLF pairs straddle 8 KiB, 64 KiB and 1 MiB boundaries."""
    line = b"the quick brown fox jumps over the lazy dog\r\n"
    data = bytearray(line * (1_300_000 // len(line)))
    for boundary in (8 * 1024, 64 * 1024, 1024 * 1024):
        data[boundary - 1: boundary + 1] = b"\r\n"
    return bytes(data)


def binary_with_crlf() -> bytes:
    """NUL bytes make this binary for DVC 2, whatever its CRLFs."""
    return b"\x00\x01\r\n" + random_bytes(11, 5000) + b"\r\n\x00"


def mostly_non_printable() -> bytes:
    """No NUL, but far more than 30% of bytes outside printable ASCII: binary for DVC 2."""
    return bytes(range(0x80, 0x100)) * 4 + b"\r\nsome text\r\n"


OLD_PIPELINE = r"""
stages:
  make:
    wdir: work
    cmd: >-
      mkdir -p ../made/parts &&
      printf 'made by dvc 2\r\n' > ../made/one.txt &&
      printf 'part\r\n' > ../made/parts/p.txt
    outs:
    - ../made/one.txt
    - ../made/parts
"""


@dataclass
class LegacyRegistry:
    registry: Registry
    legacy_sha: str
    mixed_sha: str


def old_style_dvc_file(registry: Registry, metafiles: list[str], wdir: str) -> str:
    """One `.dvc` file of DVC 0.x/1.x (a stage with `cmd`, `md5`, `locked`, `wdir` and several
    outputs carrying `cache`, `metric`, `persist`), made of the outputs of `metafiles`."""
    outs = []
    for metafile in metafiles:
        (out,) = yaml.safe_load((registry.path / metafile).read_text())["outs"]
        out.pop("size", None)  # DVC 0.x wrote no sizes
        out.pop("nfiles", None)
        outs.append({**out, "path": out["path"], "cache": True, "metric": False, "persist": False})
        registry.remove(metafile)
    return yaml.safe_dump({"md5": "0123456789abcdef0123456789abcdef", "cmd": "echo old", "wdir": wdir,
                           "deps": [], "outs": outs, "locked": True}, sort_keys=False)


def lock_v1(text: str) -> str:
    """A DVC 2 `dvc.lock` (schema 2.0) in the 1.0 shape: stages at the top, no sizes."""
    stages = yaml.safe_load(text)["stages"]
    for stage in stages.values():
        for out in stage.get("outs", []):
            out.pop("size", None)
            out.pop("nfiles", None)
    return yaml.safe_dump(stages, sort_keys=False)


@pytest.fixture(scope="module")
def legacy(tools, tmp_path_factory) -> LegacyRegistry:
    dvc2 = tools.dvc2
    registry = Registry.create(tools, tmp_path_factory.mktemp("legacy") / "registry",
                               remotes={"store": "../store"}, default_remote="store",
                               dvc_executable=dvc2)
    registry.write("crlf.txt", b"line one\r\nline two\r\n")
    registry.write("mixed-endings.txt", b"unix\nwindows\r\nold mac\rend\r\n")
    registry.write("split-crlf.txt", text_with_split_crlfs())
    registry.write("binary.dat", binary_with_crlf())
    registry.write("high-bytes.bin", mostly_non_printable())
    registry.write("empty.txt", b"")
    registry.write("crlf-dir/a.txt", b"alpha\r\nbeta\r\n")
    registry.write("crlf-dir/sub/b.txt", b"gamma\r\n")
    registry.write("crlf-dir/sub/c.bin", binary_with_crlf())
    registry.write("crlf-dir/unix.txt", b"plain\n")
    registry.add("crlf.txt", "mixed-endings.txt", "split-crlf.txt", "binary.dat", "high-bytes.bin",
                 "empty.txt", "crlf-dir")
    registry.push()
    legacy_sha = registry.commit("written by DVC 2")
    registry.tag("legacy")

    registry.checkout("old-formats", new_branch=True)
    registry.write("old/a.txt", b"old style\r\n")
    registry.write("old/b.bin", binary_with_crlf())
    registry.write("old/dir/x.txt", b"in an old directory output\r\n")
    registry.add("old/a.txt", "old/b.bin", "old/dir")
    registry.write("stages/old.dvc", old_style_dvc_file(
        registry, ["old/a.txt.dvc", "old/b.bin.dvc", "old/dir.dvc"], "../old"))
    registry.write("pipe/dvc.yaml", OLD_PIPELINE)
    (registry.path / "pipe" / "work").mkdir()
    registry.dvc("repro", "pipe/dvc.yaml")
    registry.push()
    registry.write("pipe/dvc.lock", lock_v1((registry.path / "pipe" / "dvc.lock").read_text()))
    registry.commit("formats of DVC 0.x and 1.x")
    registry.checkout("main")

    registry.dvc_executable = tools.dvc3
    registry.write("new3.txt", b"written by dvc 3\r\n")
    registry.write("dir3/x.txt", b"x\r\ny\r\n")
    registry.write("dir3/deep/z.bin", binary_with_crlf())
    registry.write("crlf.txt", b"line one\r\nline two, re-added by DVC 3\r\n")
    registry.add("new3.txt", "dir3", "crlf.txt")
    registry.push()
    mixed_sha = registry.commit("extended by DVC 3")
    return LegacyRegistry(registry, legacy_sha, mixed_sha)


def test_dvc2_and_dvc3_agree_on_the_legacy_commit(legacy, oracle, tools):
    """Sanity of the oracle itself: both DVC versions pull the same workspace."""
    source = legacy.registry.path
    by_dvc2 = oracle.tree(source, "legacy", dvc_executable=tools.dvc2)
    assert_same_tree(oracle.tree(source, "legacy"), by_dvc2, "dvc 3 pull vs dvc 2 pull")


def test_legacy_and_mixed_commits_equal_the_oracle(legacy, mount, oracle, tools):
    source = legacy.registry.path
    mounted = mount(source)
    expected = oracle.trees(source, ("legacy", "main"))
    assert_same_tree(snapshot(mounted / "legacy"), expected["legacy"], "legacy (DVC 2) commit")
    assert_same_tree(snapshot(mounted / "main"), expected["main"], "mixed DVC 2 + 3 commit")


def test_pinned_legacy_commit_with_dvc2_oracle(legacy, mount, oracle, tools):
    source = legacy.registry.path
    mounted = mount(f"{source}@legacy")
    assert_same_tree(snapshot(mounted.path), oracle.tree(source, "legacy", dvc_executable=tools.dvc2),
                     "pinned legacy commit vs dvc 2 pull")


def test_old_formats_equal_the_dvc2_oracle(legacy, mount, oracle, tools):
    source = legacy.registry.path
    old_dvc_file = legacy.registry.git("show", "old-formats:stages/old.dvc")
    assert "locked: true" in old_dvc_file and "metric: false" in old_dvc_file, old_dvc_file
    assert "schema" not in legacy.registry.git("show", "old-formats:pipe/dvc.lock")
    mounted = mount(f"{source}@old-formats")
    assert_same_tree(snapshot(mounted.path), oracle.tree(source, "old-formats", dvc_executable=tools.dvc2),
                     "old formats vs dvc 2 pull")


def test_cache_keeps_both_layouts(legacy, mount, oracle):
    """After reading a mixed commit, each object sits where DVC 3's own pull put it: legacy ones at
    `ab/cdef`, DVC 3 ones at `files/md5/ab/cdef`."""
    source = legacy.registry.path
    mounted = mount(f"{source}@main")
    snapshot(mounted.path)
    missing = missing_from_cache(mounted.cache_dir, oracle.clone(source, "main"))
    assert not missing, f"objects `dvc pull` caches that are not in regfs's cache dir: {sorted(missing)}"


def test_fixture_really_uses_legacy_hashing(legacy):
    """Guard against a fixture that silently stopped exercising the legacy format."""
    registry = legacy.registry
    metafile = registry.git("show", f"{legacy.legacy_sha}:crlf.txt.dvc")
    assert "hash:" not in metafile, metafile
    object_id = next(line.split(":")[1].strip() for line in metafile.splitlines() if "md5:" in line)
    assert object_id != md5_hex(b"line one\r\nline two\r\n")
    assert object_path(registry.path.parent / "store", object_id, legacy=True).exists()
    assert "hash: md5" in registry.git("show", f"{legacy.mixed_sha}:new3.txt.dvc")


def test_corrupt_legacy_object_is_eio(legacy, mount, oracle, tmp_path):
    """Legacy objects are verified too (so the passing reads above are not vacuous)."""
    source = tmp_path / "copy" / "registry"
    store = tmp_path / "copy" / "store"
    shutil.copytree(legacy.registry.path, source, symlinks=True)
    shutil.copytree(legacy.registry.path.parent / "store", store, symlinks=True)
    metafile = legacy.registry.git("show", f"{legacy.legacy_sha}:crlf.txt.dvc")
    object_id = re.search(r"md5: ([0-9a-f]{32})", metafile)[1]
    stored = object_path(store, object_id, legacy=True)
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes().replace(b"line one", b"line 0ne"))

    mounted = mount(f"{source}@legacy", expect_errors=rf"crlf\.txt|{object_id}|{object_id[2:]}")
    with pytest.raises(OSError) as caught:
        (mounted / "crlf.txt").read_bytes()
    assert caught.value.errno == errno.EIO, caught.value
    assert not object_path(mounted.cache_dir, object_id, legacy=True).exists()
    expected = oracle.tree(legacy.registry.path, "legacy")
    assert (mounted / "split-crlf.txt").read_bytes() == expected["split-crlf.txt"][2]


def test_ls_matches_dvc_list(legacy, tools, oracle, regfs_cli, tmp_path):
    """DVC 2 and mixed commits, listed by DVC 3 (which refuses the old-formats branch; DVC 2.58's
    `dvc list` fails with the pygit2 1.21 that constraints-dvc2.txt pins: GIT_OBJ_COMMIT is gone)."""
    source = legacy.registry.path
    for rev in ("legacy", "main"):
        assert_ls_matches_dvc_list(tools, regfs_cli, source, rev, oracle.clone(source, rev), tmp_path / "cache")
