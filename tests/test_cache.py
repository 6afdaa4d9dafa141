"""The cache directory: reused across mounts, shared with DVC, enough once the remote is gone.

Each test works on its own copy of the basic registry and its store (a plain directory copy, no
DVC call), so it may make the store unreachable without disturbing other tests. The copy has the
same commits, so the basic registry's oracle trees apply to it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, md5_hex, mentions_object, object_path, snapshot


def copy_registry(basic, destination: Path) -> tuple[Path, Path]:
    """Copy registry and store side by side, so the relative remote URL still resolves."""
    registry = destination / "registry"
    store = destination / "store"
    shutil.copytree(basic.path, registry, symlinks=True)
    shutil.copytree(basic.store, store, symlinks=True)
    return registry, store


def test_second_mount_reads_from_the_cache_without_the_remote(basic, mount, oracle, tmp_path):
    source, store = copy_registry(basic, tmp_path / "copy")
    cache_dir = tmp_path / "shared-cache"
    expected = oracle.tree(basic.path, "v2.0")

    first = mount(f"{source}@v2.0", cache_dir=cache_dir)
    assert_same_tree(snapshot(first.path), expected, "first mount @v2.0")
    first.unmount()

    store.rename(store.with_name("store-gone"))
    second = mount(f"{source}@v2.0", cache_dir=cache_dir)
    assert_same_tree(snapshot(second.path), expected, "second mount @v2.0, remote gone, same cache")


def test_uncached_object_without_remote_is_eio(basic, mount, oracle, tmp_path):
    """With the remote gone, what is cached still reads; what is not gives EIO (never zeros)."""
    source, store = copy_registry(basic, tmp_path / "copy")
    cache_dir = tmp_path / "shared-cache"
    first = mount(f"{source}@v2.0", cache_dir=cache_dir)
    big = (first / "big.bin").read_bytes()
    first.unmount()

    store.rename(store.with_name("store-gone"))
    run_v1 = oracle.tree(basic.path, "v1.0")["run.sh"][2]
    run_v1_id = md5_hex(run_v1)
    second = mount(f"{source}@v1.0", cache_dir=cache_dir, expect_errors=r"run\.sh|" + run_v1_id)
    assert (second / "big.bin").read_bytes() == big, "big.bin is the same object in v1.0 and v2.0"
    with pytest.raises(OSError) as caught:
        (second / "run.sh").read_bytes()
    assert caught.value.errno == errno.EIO, caught.value
    assert not object_path(cache_dir, run_v1_id).exists()
    errors = second.error_lines()
    assert any(mentions_object(line, run_v1_id) for line in errors), \
        f"no ERROR line names object {run_v1_id}:\n" + second.log_tail()


def test_dvc_pull_cache_serves_as_cache_dir(basic, mount, oracle, tmp_path):
    """`--cache-dir` pointing at the `.dvc/cache` that `dvc pull` filled: no remote needed."""
    source, store = copy_registry(basic, tmp_path / "copy")
    expected = oracle.tree(source, "v1.0")
    dvc_cache = oracle.clone(source, "v1.0") / ".dvc" / "cache"
    assert expected == oracle.tree(basic.path, "v1.0")
    store.rename(store.with_name("store-gone"))

    mounted = mount(f"{source}@v1.0", cache_dir=dvc_cache)
    assert_same_tree(snapshot(mounted.path), expected, "mount @v1.0 served from DVC's own cache")


def test_remote_option_selects_another_remote(tools, mount, oracle, tmp_path):
    """`--remote NAME` reads from that remote instead of the default one (`dvc pull -r NAME`)."""
    parent = tmp_path / "two-remotes"
    registry = Registry.create(tools, parent / "registry",
                               remotes={"store": "../store", "mirror": "../mirror"}, default_remote="store")
    registry.write("a.txt", "on both remotes\n")
    registry.write("dir/b.txt", "b\n")
    registry.write("dir/c/d.bin", random_bytes(51, 2000))
    registry.add("a.txt", "dir")
    registry.push()
    registry.push("-r", "mirror")
    registry.commit("pushed to two remotes")
    expected = oracle.tree(registry.path, "main", pull_args=["-r", "mirror"])
    shutil.rmtree(parent / "store")

    mounted = mount(f"{registry.path}@main", "--remote", "mirror")
    assert_same_tree(snapshot(mounted.path), expected, "@main with --remote mirror, default remote gone")


def _damage(path: Path, how: str) -> None:
    """Damage a cache file in place, as a stray writer would: the mtime moves with the write."""
    path.chmod(0o644)
    data = path.read_bytes()
    if how == "flip":
        with open(path, "r+b") as file:
            file.seek(len(data) // 2)
            file.write(bytes([data[len(data) // 2] ^ 0x01]))
    else:
        with open(path, "r+b") as file:
            file.truncate(len(data) // 2)
    path.chmod(0o444)


def test_a_damaged_cache_entry_is_never_served_but_dropped_and_fetched_again(basic, mount, oracle, tmp_path):
    """Files regfs verified at download, and files DVC wrote, damaged in the cache afterwards (a
    flipped bit, a truncation): a new mount hashes them before serving a byte, removes them, and
    serves DVC's bytes fetched again from the remote."""
    source, _ = copy_registry(basic, tmp_path / "copy")
    cache_dir = tmp_path / "cache"
    expected = oracle.tree(basic.path, "v2.0")
    first = mount(f"{source}@v2.0", cache_dir=cache_dir)
    assert_same_tree(snapshot(first.path), expected, "first mount")
    first.unmount()

    damaged = {"big.bin": "flip", "data/a.txt": "truncate"}
    for relpath, how in damaged.items():
        _damage(object_path(cache_dir, md5_hex(expected[relpath][2])), how)

    second = mount(f"{source}@v2.0", cache_dir=cache_dir, expect_errors="is corrupt")
    assert_same_tree(snapshot(second.path), expected, "mount over the damaged cache")
    log = second.log_text()
    for relpath in damaged:
        object_id = md5_hex(expected[relpath][2])
        assert mentions_object(log, object_id), f"nothing logged about the damaged {relpath}"
        assert f"cached object {object_id} is corrupt" in log
        assert md5_hex(object_path(cache_dir, object_id).read_bytes()) == object_id, "not fetched again"
    assert log.count(" is corrupt ") == len(damaged), "intact objects were taken for corrupt ones"
