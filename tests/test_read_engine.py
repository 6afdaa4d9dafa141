"""The cold-read engine against a real HTTP remote behind a counting proxy (tests/faultproxy.py):
no request it can do without, parallel parts under a cap on requests in flight, FUSE threads that
keep serving while downloads stall, and `--stream`.

One registry serves the module: a directory output of small files, three objects of two or three
parts (regfs.download.PART), a directory of small files for the stalls, and one of tiny files
(fetched as their sizes are asked). Bytes are always
compared with DVC's (`dvc pull` of the same objects over HTTP); requests are counted at the proxy.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from regfs.download import PART
from regfs.fetch import WHOLE_ENTRY
from tests.faultproxy import FaultProxy, ProxyRequest, registry_behind_proxy
from tests.mounting import read_in_child
from tests.registry import Registry, random_bytes
from tests.trees import Snapshot, md5_hex, object_path, snapshot

# dir/ and stall/ average more than WHOLE_ENTRY per file: their listings ask sizes only (HEADs), and
# their files are fetched by reads and read-ahead. tiny/ is an output of small files: its listing
# over HTTP fetches them (regfs.fetch.whole_limit).
SMALL = {f"dir/{number:02}.bin": random_bytes(500 + number, WHOLE_ENTRY + 997 * number) for number in range(24)}
STALLED = {f"stall/{number:02}.bin": random_bytes(700 + number, WHOLE_ENTRY + 5000 + number) for number in range(12)}
TINY = {f"tiny/{number:02}.bin": random_bytes(800 + number, 1000 + 997 * number) for number in range(24)}
LARGE = {"big.bin": random_bytes(600, 2 * PART + (3 << 20)),  # three parts
         "streamed.bin": random_bytes(601, PART + (3 << 20)), "corrupt.bin": random_bytes(602, PART + 5000)}
CAT = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
HANG = 60  # seconds: a read that takes longer is a hang (a stalled request lasts until cleared)


@dataclass
class Web:
    registry: Registry
    store: Path  # the directory the HTTP server serves
    proxy: FaultProxy
    expected: Snapshot  # DVC's workspace of main

    def mount(self, mount, *args: str, **kwargs):
        return mount(f"{self.registry.path}@main", "--refresh", "0", "--remote-config",
                     f"web.url={self.proxy.url}/store", *args, **kwargs)

    def data(self, relpath: str) -> bytes:
        return self.expected[relpath][2]

    def requests(self, relpath: str, method: str = "GET") -> list[ProxyRequest]:
        object_id = md5_hex(self.data(relpath))
        return [request for request in self.proxy.requests
                if request.method == method and request.path.endswith(f"{object_id[:2]}/{object_id[2:]}")]


@pytest.fixture(scope="module")
def web(tools, oracle, tmp_path_factory):
    def fill(registry: Registry) -> None:
        for relpath, data in {**SMALL, **STALLED, **TINY, **LARGE}.items():
            registry.write(relpath, data)
        registry.add("dir", "stall", "tiny", *LARGE)

    parent = tmp_path_factory.mktemp("engine")
    with registry_behind_proxy(tools, parent, fill) as (registry, proxy):
        yield Web(registry, parent / "store", proxy, oracle.tree(registry.path, "main"))


@pytest.fixture
def proxy(web):
    web.proxy.clear()
    web.proxy.reset()
    yield web.proxy
    web.proxy.clear()


def files_below(tree: Snapshot, prefix: str) -> Snapshot:
    return {relpath.removeprefix(prefix): entry for relpath, entry in tree.items()
            if relpath.startswith(prefix)}


def test_a_cold_copy_asks_for_each_object_once_and_no_size_it_knows(web, proxy, mount, regfs_cli, tmp_path):
    """`cp -r` of a directory output and a read of a three-part object: one GET per small object,
    one per part, no HEAD for sizes the metafiles give; sizes learned before come from the index,
    so once they are known a cold copy makes no HEAD at all (HTTP cannot list: the first listing
    asks each entry's size)."""
    cache = tmp_path / "cache"
    first = web.mount(mount, cache_dir=cache)
    shutil.copytree(first / "dir", tmp_path / "copy")
    assert snapshot(tmp_path / "copy") == files_below(web.expected, "dir/")
    assert (first / "big.bin").read_bytes() == web.data("big.bin")

    for relpath in SMALL:
        assert len(web.requests(relpath)) == 1, (relpath, web.requests(relpath))
        assert len(web.requests(relpath, "HEAD")) <= 1, (relpath, web.requests(relpath, "HEAD"))
    manifests = [request for request in proxy.requests if request.path.endswith(".dir")]
    assert [request.method for request in manifests] == ["HEAD", "GET"], manifests
    assert sorted(request.range_start for request in web.requests("big.bin")) == [0, PART, 2 * PART]
    assert not web.requests("big.bin", "HEAD")
    first.unmount()

    assert regfs_cli("cache", "gc", "--max-size", "0", "--cache-dir", cache).returncode == 0
    assert not object_path(cache, md5_hex(web.data("big.bin"))).exists()
    proxy.reset()
    second = web.mount(mount, cache_dir=cache)
    shutil.copytree(second / "dir", tmp_path / "copy-again")
    assert snapshot(tmp_path / "copy-again") == files_below(web.expected, "dir/")
    assert [request.method for request in proxy.requests if request.method != "GET"] == []
    assert len(proxy.requests) == len(SMALL) + 1, proxy.requests  # and the manifest


def test_parallel_downloads_stay_under_the_cap_and_never_repeat(web, proxy, mount):
    """Readers of one large object and of many small ones at once, with `--max-requests 3`: the
    proxy never sees more than 3 requests at a time (but more than one: the parts run in
    parallel), each part and each small object is asked for once, and the bytes are DVC's."""
    mounted = web.mount(mount, "--max-requests", "3")
    paths = ["big.bin"] * 4 + list(SMALL)
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        contents = list(pool.map(lambda relpath: (mounted / relpath).read_bytes(), paths))
    for relpath, data in zip(paths, contents):
        assert data == web.data(relpath), relpath
    assert 2 <= proxy.max_in_flight <= 3, proxy.max_in_flight
    assert sorted(request.range_start for request in web.requests("big.bin")) == [0, PART, 2 * PART]
    for relpath in SMALL:
        assert len(web.requests(relpath)) == 1, (relpath, web.requests(relpath))


def test_reads_go_on_while_downloads_stall(web, proxy, mount, tmp_path):
    """Twelve readers wait for objects whose GETs stall (more readers than libfuse's default of 10
    threads); meanwhile a cached file the kernel has never seen, and a small object nobody is
    downloading, read at once. When the stall ends, the twelve get DVC's bytes."""
    cache = tmp_path / "cache"
    warm = web.mount(mount, cache_dir=cache)
    assert (warm / "dir/00.bin").read_bytes() == web.data("dir/00.bin")
    warm.unmount()

    mounted = web.mount(mount, cache_dir=cache)
    stalled_ids = {md5_hex(data)[2:] for data in STALLED.values()}
    proxy.inject("stall", keep_bytes=0,
                 match=lambda request: request.path.rsplit("/", 1)[-1] in stalled_ids)
    readers = {relpath: subprocess.Popen([sys.executable, "-c", CAT, mounted / relpath], stdout=subprocess.PIPE)
               for relpath in STALLED}
    try:
        deadline = time.monotonic() + HANG
        while len(proxy.faulted("stall")) < len(STALLED) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(proxy.faulted("stall")) >= len(STALLED), proxy.requests

        assert read_in_child(mounted / "dir/00.bin", HANG).data == web.data("dir/00.bin")
        assert read_in_child(mounted / "dir/01.bin", HANG).data == web.data("dir/01.bin")
        assert all(reader.poll() is None for reader in readers.values()), "a stalled read returned"
    finally:
        proxy.clear()
        outputs = {relpath: reader.communicate(timeout=HANG)[0] for relpath, reader in readers.items()}
    assert outputs == STALLED


def test_stream_serves_ranges_before_the_object_is_whole(web, proxy, mount):
    """`--stream`: while the last part of `streamed.bin` stalls, its first bytes read; readers at
    random offsets all get DVC's bytes once the stall ends; each part is asked for once (the
    stalled one again after its failure); `--cache-size` smaller than the object evicts it
    without breaking a reader."""
    mounted = web.mount(mount, "--stream", "--cache-size", "8M")
    data = web.data("streamed.bin")
    object_id = md5_hex(data)
    proxy.inject("stall", keep_bytes=0, match=lambda request: request.range_start == PART
                 and request.path.endswith(f"{object_id[:2]}/{object_id[2:]}"))
    assert read_in_child(mounted / "streamed.bin", HANG, 1000, 1 << 20).data == data[1000:1000 + (1 << 20)]

    rng = random.Random(7)
    ranges = [(rng.randrange(len(data)), rng.randrange(1, 300_000)) for _ in range(96)]

    def read_ranges(share: list[tuple[int, int]]) -> list[bytes]:
        with open(mounted / "streamed.bin", "rb", buffering=0) as file:
            return [os.pread(file.fileno(), size, offset) for offset, size in share]

    with ThreadPoolExecutor(max_workers=6) as pool:
        shares = [ranges[start::6] for start in range(6)]
        pending = [pool.submit(read_ranges, share) for share in shares]
        time.sleep(0.5)  # let readers wait on the stalled part
        proxy.clear()
        results = [job.result(timeout=HANG) for job in pending]
    for share, pieces in zip(shares, results):
        for (offset, size), piece in zip(share, pieces):
            assert piece == data[offset:offset + size], (offset, size)
    clean = sorted(request.range_start for request in web.requests("streamed.bin") if request.fault is None)
    assert clean == [0, PART], web.requests("streamed.bin")
    assert (mounted / "streamed.bin").read_bytes() == data


def test_stream_of_a_corrupt_object_fails_later_reads_and_caches_nothing(web, proxy, mount):
    """`--stream` of an object whose remote copy is corrupt (same size): readers may get its
    bytes before the end, but once the hash proves wrong every read fails with EIO (the kernel's
    pages are dropped too), one ERROR line says so, and nothing is cached; the remote repaired,
    the same file reads DVC's bytes."""
    data = web.data("corrupt.bin")
    object_id = md5_hex(data)
    stored = object_path(web.store, object_id)
    stored.chmod(0o644)
    stored.write_bytes(bytes(byte ^ 0x5A for byte in data[:4096]) + data[4096:])
    try:
        mounted = web.mount(mount, "--stream", expect_errors=object_id)
        read_in_child(mounted / "corrupt.bin", HANG)  # bytes or EIO: either may come first
        deadline = time.monotonic() + HANG
        while "streamed to readers" not in mounted.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        (line,) = [line for line in mounted.error_lines() if "streamed to readers" in line]
        assert object_id in line and "corrupt" in line and "EIO" in line, line
        for offset in (0, len(data) - 100):
            assert read_in_child(mounted / "corrupt.bin", HANG, offset, 100).errno == errno.EIO
        assert not object_path(mounted.cache_dir, object_id).exists()
        assert not list((mounted.cache_dir / "regfs" / "tmp").iterdir())
    finally:
        stored.write_bytes(data)
    deadline = time.monotonic() + HANG
    while (outcome := read_in_child(mounted / "corrupt.bin", HANG)).data is None \
            and time.monotonic() < deadline:
        time.sleep(0.25)
    assert outcome.data == data


def wait_for_gets(web: Web, proxy: FaultProxy, relpaths: list[str], settle: float = 0.5) -> set[str]:
    """The files of `relpaths` whose object the proxy saw a GET for, once `settle` seconds pass
    without a new request (or HANG seconds in all)."""
    deadline, seen, quiet_since = time.monotonic() + HANG, -1, time.monotonic()
    while time.monotonic() < deadline:
        if len(proxy.requests) != seen:
            seen, quiet_since = len(proxy.requests), time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            break
        time.sleep(0.05)
    return {relpath for relpath in relpaths if web.requests(relpath)}


def test_a_reader_in_order_gets_the_next_files_fetched_ahead(web, proxy, mount, regfs_cli, tmp_path):
    """Reading `dir/` one file after another, in its order: two files in a row start read-ahead of
    the next 4 (and no more), a third in order widens it to 8 ahead; then a `cp -r` of the whole
    directory gets DVC's bytes with exactly one GET per object (the reader waits for the fetches
    ahead, never repeats them), and `regfs stats` counts the fetches ahead."""
    mounted = web.mount(mount)
    names = sorted(SMALL)
    for relpath in names[:2]:
        assert (mounted / relpath).read_bytes() == web.data(relpath)
    assert wait_for_gets(web, proxy, names) == set(names[:6])
    assert (mounted / names[2]).read_bytes() == web.data(names[2])
    assert wait_for_gets(web, proxy, names) == set(names[:11])

    shutil.copytree(mounted / "dir", tmp_path / "copy")
    assert snapshot(tmp_path / "copy") == files_below(web.expected, "dir/")
    assert {relpath: len(web.requests(relpath)) for relpath in names} == dict.fromkeys(names, 1)
    stats = json.loads(regfs_cli("stats", "--json", mounted.path).stdout)
    assert 8 <= stats["readahead_fetches"] <= len(names) - 2, stats  # not the 2 files that started it


@pytest.mark.parametrize("order, options", [("backwards", ()), ("strided", ()),
                                            ("in order", ("-o", "dir_readahead=0"))])
def test_no_read_ahead_out_of_order_or_when_off(web, proxy, mount, order, options):
    """Files read backwards, or 9 entries apart (further than a step in order), or in order with
    read-ahead off: only the files read are fetched."""
    mounted = web.mount(mount, *options)
    names = sorted(SMALL)
    chosen = {"backwards": names[::-1][:6], "strided": names[::9], "in order": names[:6]}[order]
    for relpath in chosen:
        assert (mounted / relpath).read_bytes() == web.data(relpath)
    assert wait_for_gets(web, proxy, names) == set(chosen)


def test_listing_an_output_of_tiny_files_fetches_them_with_their_sizes(web, proxy, mount, regfs_cli, tmp_path):
    """Over HTTP each entry's size costs a request (no listings): in an output of small files that
    request is a GET of the first WHOLE_ENTRY bytes instead of a HEAD, and it brings the file
    whole. `ls -l` of tiny/ makes exactly one such GET per file and no HEAD, and leaves every file
    cached; a `cp -r` then asks the remote nothing, and gets DVC's bytes."""
    mounted = web.mount(mount)
    sizes = {entry.name: entry.stat().st_size for entry in os.scandir(mounted / "tiny")}
    assert sizes == {relpath.removeprefix("tiny/"): len(data) for relpath, data in TINY.items()}
    for relpath, data in TINY.items():
        assert [request.range for request in web.requests(relpath)] == [f"bytes=0-{WHOLE_ENTRY - 1}"], relpath
        assert not web.requests(relpath, "HEAD"), relpath
        assert object_path(mounted.cache_dir, md5_hex(data)).read_bytes() == data
    stats = json.loads(regfs_cli("stats", "--json", mounted.path).stdout)
    assert stats["fetched_with_size"] == len(TINY) == stats["objects_fetched"] - 1, stats  # and the manifest

    before = len(proxy.requests)
    shutil.copytree(mounted / "tiny", tmp_path / "copy")
    assert snapshot(tmp_path / "copy") == files_below(web.expected, "tiny/")
    assert proxy.requests[before:] == []


def test_with_read_ahead_off_a_listing_fetches_nothing(web, proxy, mount):
    """`--dir-readahead 0` fetches only what reads ask for: the listing of tiny/ is a HEAD per
    file, and nothing is cached before a read."""
    mounted = web.mount(mount, "--dir-readahead", "0")
    sizes = {entry.name: entry.stat().st_size for entry in os.scandir(mounted / "tiny")}
    assert sizes == {relpath.removeprefix("tiny/"): len(data) for relpath, data in TINY.items()}
    for relpath, data in TINY.items():
        assert not web.requests(relpath) and len(web.requests(relpath, "HEAD")) == 1, relpath
        assert not object_path(mounted.cache_dir, md5_hex(data)).exists()
    assert (mounted / "tiny/03.bin").read_bytes() == TINY["tiny/03.bin"]


def test_a_corrupt_tiny_file_is_not_cached_by_the_listing(web, proxy, mount):
    """A tiny file whose remote copy is corrupt (same size): the listing still gives every size and
    caches the other files, not that one; one warning names it; its read fails with EIO, as any
    read of a corrupt object does. The remote repaired, it reads DVC's bytes."""
    relpath = "tiny/05.bin"
    data, object_id = TINY[relpath], md5_hex(TINY[relpath])
    stored = object_path(web.store, object_id)
    stored.chmod(0o644)
    stored.write_bytes(bytes(byte ^ 0x5A for byte in data[:100]) + data[100:])
    try:
        mounted = web.mount(mount, expect_errors=object_id)
        sizes = {entry.name: entry.stat().st_size for entry in os.scandir(mounted / "tiny")}
        assert sizes == {name.removeprefix("tiny/"): len(content) for name, content in TINY.items()}
        for name, content in TINY.items():
            assert object_path(mounted.cache_dir, md5_hex(content)).exists() == (name != relpath), name
        (warning,) = [line for line in mounted.log_text().splitlines() if "WARNING" in line and object_id in line]
        assert "corrupt" in warning and "a read will fetch it again" in warning, warning
        assert read_in_child(mounted / relpath, HANG).errno == errno.EIO
        assert not list((mounted.cache_dir / "regfs" / "tmp").iterdir())
    finally:
        stored.write_bytes(data)
    deadline = time.monotonic() + HANG
    while (outcome := read_in_child(mounted / relpath, HANG)).data is None and time.monotonic() < deadline:
        time.sleep(0.25)
    assert outcome.data == data
