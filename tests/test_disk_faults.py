"""A full disk under the cache: the cache directory is a small tmpfs (mounted here, as root), and
a read needs more than it holds.

The reader gets EIO, the log says no space was left and names the object and its remote, the
half-written download is gone, objects cached before stay intact, the size index failing on the
full disk costs no read, and once the tmpfs is grown the same read succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regfs.cache import ObjectWriter
from regfs.dvcmeta import HASH_MD5
from regfs.errors import CacheError
from regfs.hashing import StreamHasher
from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, md5_hex, mentions_object, object_path, snapshot

PAGE = 4096  # tmpfs allocates whole pages


def read_once_recovered(path: Path, within: float = 10.0) -> bytes:
    deadline = time.monotonic() + within
    while True:
        try:
            return path.read_bytes()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(path: Path, leave_pages: int) -> None:
    """Write a file into `path`'s filesystem until it is full, then give back `leave_pages`."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while file.write(b"\0" * PAGE):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    os.truncate(filler, filler.stat().st_size // PAGE * PAGE - leave_pages * PAGE)


def cached_objects(cache: Path) -> dict[str, str]:
    """The id of every object in a DVC 3 cache layout (named by its path) -> the md5 of its bytes."""
    return {path.parent.name + path.name: md5_hex(path.read_bytes())
            for path in (cache / "files" / "md5").glob("??/*")}


def intact(objects: dict[str, str]) -> bool:
    return all(object_id.removesuffix(".dir") == digest for object_id, digest in objects.items())


@pytest.fixture(scope="module")
def registry(tools, tmp_path_factory) -> Registry:
    parent = tmp_path_factory.mktemp("disk-faults")
    registry = Registry.create(tools, parent / "registry", remotes={"store": str(parent / "store")},
                               default_remote="store")
    registry.write("small/a.bin", random_bytes(61, 300_000))
    registry.write("small/b.txt", "b\n")
    registry.write("one.bin", random_bytes(62, 500_000))
    registry.write("note.txt", "a note that fits in one page\n")
    registry.write("huge.bin", random_bytes(63, 12 * 1024 * 1024))
    registry.add("small", "one.bin", "note.txt", "huge.bin")
    registry.push()
    registry.commit("data")
    return registry


def test_a_full_cache_disk_fails_the_read_cleanly_and_recovers_when_space_is_freed(registry, mount, oracle,
                                                                                   tmp_path):
    expected = oracle.tree(registry.path, "main")
    huge_id, note_id = md5_hex(expected["huge.bin"][2]), md5_hex(expected["note.txt"][2])

    with tmpfs(tmp_path / "cache", "4m") as cache:
        mounted = mount(f"{registry.path}@main", cache_dir=cache, expect_errors=huge_id)
        try:
            tree = snapshot(mounted.path, skip=["huge.bin", "note.txt"])
            assert_same_tree(tree, {path: entry for path, entry in expected.items()
                                    if path not in ("huge.bin", "note.txt")}, "what fits in the cache")
            before = cached_objects(cache)
            assert len(before) == 4 and intact(before)  # small/'s manifest, its 2 files, one.bin

            with pytest.raises(OSError) as caught:
                (mounted / "huge.bin").read_bytes()
            assert caught.value.errno in (errno.EIO, errno.ENOSPC), caught.value
            lines = [line for line in mounted.error_lines() if mentions_object(line, huge_id)]
            assert lines and "no space left on device" in lines[0] and "remote 'store'" in lines[0], \
                mounted.log_tail()
            assert not list((cache / "regfs" / "tmp").iterdir()), "a partial download was left behind"
            assert not object_path(cache, huge_id).exists()
            assert cached_objects(cache) == before, "objects cached before the failure changed"

            # Full to the last page but one: `note.txt` fits, the size index's next write does not
            # (its write-ahead log emptied first, so that the write must grow it).
            with sqlite3.connect(cache / "regfs" / "sizes.sqlite") as connection:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            connection.close()
            fill(cache, leave_pages=1)
            assert (mounted / "note.txt").read_bytes() == expected["note.txt"][2]
            assert md5_hex(object_path(cache, note_id).read_bytes()) == note_id
            # The index is written in the background, within a few seconds.
            deadline = time.monotonic() + 30
            while "cannot record object sizes" not in mounted.log_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "cannot record object sizes" in mounted.log_text(), \
                f"the size index did not fail on the full disk:\n{mounted.log_tail()}"
            assert_same_tree(snapshot(mounted.path, skip=["huge.bin"]),
                             {path: entry for path, entry in expected.items() if path != "huge.bin"},
                             "everything cached, on a full disk")

            resize(cache, "64m")
            # The daemon remembers a failed fetch for a second (the kernel retries a failed read at
            # once): the read works again after that.
            assert hashlib.md5(read_once_recovered(mounted / "huge.bin")).hexdigest() == huge_id
            assert intact(after := cached_objects(cache)) and set(after) == {*before, note_id, huge_id}
            assert not list((cache / "regfs" / "tmp").iterdir())
        finally:
            mounted.unmount()


def test_a_daemon_starts_on_a_full_cache_disk_and_serves_what_is_cached(registry, mount, oracle, tmp_path):
    """On a full disk (too full for sqlite to create its -wal/-shm files if they are not there), a
    new daemon still mounts and reads every cached object; an index it cannot open only costs
    lookups."""
    expected = {path: entry for path, entry in oracle.tree(registry.path, "main").items()
                if path != "huge.bin"}
    with tmpfs(tmp_path / "cache", "4m") as cache:
        first = mount(registry.path, cache_dir=cache)
        try:
            assert_same_tree(snapshot(first / "main", skip=["huge.bin"]), expected, "filling the cache")
        finally:
            first.unmount()
        fill(cache, leave_pages=0)
        second = mount(registry.path, cache_dir=cache)
        try:
            assert os.statvfs(cache).f_bavail == 0, "the disk was not full"
            assert_same_tree(snapshot(second / "main", skip=["huge.bin"]), expected, "on the full disk")
        finally:
            second.unmount()


def test_a_write_that_fills_the_disk_fails_with_enospc_not_a_short_file(tmp_path):
    """pwrite(2) on a filling disk writes what fits and fails (ENOSPC) only on the next call: the
    cache's writer goes on to that failure instead of taking the short write for the whole (which
    left the read above failing on a temporary file shorter than its writes, now and then)."""
    with tmpfs(tmp_path / "small", "1m") as small:
        fd = os.open(small / "object", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            writer = ObjectWriter(fd, str(small / "object"), StreamHasher(HASH_MD5), "an object")
            writer.write_at(random_bytes(64, 600_000), 0)
            with pytest.raises(CacheError, match="no space left on device while caching an object"):
                writer.write_at(random_bytes(65, 1 << 20), 600_000)
        finally:
            os.close(fd)
