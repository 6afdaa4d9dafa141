"""Cache management: `--cache-size` eviction in a mount, `regfs cache status|gc|verify`.

Registries are built with the real dvc (DVC 3, and DVC 2 for the legacy layout); every byte read
through a mount is compared with what `dvc pull` gives. Eviction is exercised while readers
(threads of this process and separate `md5sum` processes) read through a mount: by the mount's
own evictor and by `regfs cache gc` in a loop from another process. Figures of `cache status` are
checked against the cache directory walked here, and against the stores the objects came from.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from regfs.cache import ObjectCache, ObjectRef
from regfs.cachectl import format_size, parse_size
from regfs.errors import UsageError
from tests.mounting import run_cli
from tests.registry import Registry, random_bytes
from tests.test_server import public_dir  # noqa: F401 (the fixture: a /tmp directory all users enter)
from tests.trees import assert_same_tree, cache_objects, md5_hex, object_path, snapshot

SHARDS = 16
CAP = 3 * 1024 * 1024
GC_RUNS = 6  # readers go on until `regfs cache gc` ran this often meanwhile
_FETCHED = re.compile(r"fetched ([0-9a-f]{32}(?:\.dir)?) ")
_EVICTED = re.compile(r"^evicted (?:files/md5/)?([0-9a-f]{2})/([0-9a-f]{30}(?:\.dir)?) ", re.MULTILINE)
_PASS = re.compile(r"evicted (\d+) objects \(")


@dataclass
class Dataset:
    registry: Registry
    store: Path
    files: dict[str, bytes]  # what `dvc pull` gives, by workspace path

    @property
    def path(self) -> Path:
        return self.registry.path

    def object_id(self, relpath: str) -> str:
        """The md5 DVC recorded for a single-file output, from its .dvc file."""
        return re.search(r"md5: ([0-9a-f]{32})", (self.path / f"{relpath}.dvc").read_text())[1]


def _build(tools, parent: Path, contents: dict[str, bytes], outputs: list[str], oracle,
           dvc_executable: Path | None = None) -> Dataset:
    registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"},
                               default_remote="store", dvc_executable=dvc_executable)
    for relpath, data in contents.items():
        registry.write(relpath, data)
    registry.add(*outputs)
    registry.push()
    registry.commit("data")
    pulled = oracle.tree(registry.path, "main", dvc_executable=dvc_executable)
    files = {relpath: pulled[relpath][2] for relpath in contents}
    assert files == contents, "dvc pull does not give back what was added"
    return Dataset(registry, parent / "store", files)


@pytest.fixture(scope="module")
def dataset(tools, oracle, tmp_path_factory) -> Dataset:
    """DVC 3: a directory output of shards, three single-file outputs and one bigger than CAP/2."""
    rng = random.Random(7)
    contents = {f"shards/part-{i:02}.bin": random_bytes(200 + i, rng.randrange(150_000, 1_200_000))
                for i in range(SHARDS)}
    contents.update({"a.bin": random_bytes(301, 300_000), "b.bin": random_bytes(302, 400_000),
                     "c.bin": random_bytes(303, 500_000), "big.bin": random_bytes(304, 2_500_000)})
    return _build(tools, tmp_path_factory.mktemp("dataset"), contents,
                  ["shards", "a.bin", "b.bin", "c.bin", "big.bin"], oracle)


@pytest.fixture(scope="module")
def legacy(tools, oracle, tmp_path_factory) -> Dataset:
    """DVC 2: objects hashed md5-dos2unix, in the legacy layout `<cache>/ab/cdef...`."""
    contents = {"crlf.txt": b"line one\r\nline two\r\n" * 200,
                "binary.dat": b"\x00\r\n" + random_bytes(401, 90_000),
                "ldir/x.txt": b"x\r\ny\r\n", "ldir/y.bin": random_bytes(402, 40_000)}
    return _build(tools, tmp_path_factory.mktemp("legacy"), contents, ["crlf.txt", "binary.dat", "ldir"],
                  oracle, dvc_executable=tools.dvc2)


@pytest.fixture(scope="module")
def extra(tools, oracle, tmp_path_factory) -> Dataset:
    """A registry whose objects get into the cache through DVC itself (`dvc pull`), not regfs."""
    contents = {"e1.bin": random_bytes(501, 250_000), "e2.bin": random_bytes(502, 350_000)}
    return _build(tools, tmp_path_factory.mktemp("extra"), contents, ["e1.bin", "e2.bin"], oracle)


# -- helpers -----------------------------------------------------------------------------------


def _cli(tools, workdir: Path, *args) -> subprocess.CompletedProcess:
    return run_cli(list(args), tools.env, workdir)


def _disk_objects(cache: Path) -> dict[str, int]:
    """Object files on disk (both layouts, manifests too) and their sizes, by relative path."""
    return {relpath: (cache / relpath).stat().st_size for relpath in cache_objects(cache, manifests=True)}


def _fetch_counts(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for object_id in _FETCHED.findall(log):
        counts[object_id] = counts.get(object_id, 0) + 1
    return counts


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(0.1)


def _dvc_pull_into(tools, source: Dataset, cache: Path, workspace: Path) -> None:
    """`dvc pull` of `source` with `cache` as DVC's cache dir: objects regfs did not write."""
    tools.run(["git", "clone", "-q", source.path, workspace], cwd=workspace.parent)
    tools.run([tools.dvc3, "cache", "dir", "--local", cache], cwd=workspace)
    tools.run([tools.dvc3, "remote", "modify", "--local", "store", "url", source.store], cwd=workspace)
    tools.run([tools.dvc3, "pull", "-q"], cwd=workspace)


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("1048576", 1 << 20), ("500M", 500 << 20),
                                            ("20G", 20 << 30), ("1.5T", 3 << 39), ("20GiB", 20 << 30),
                                            ("64kb", 64 << 10)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1X", "G", "1.5.2M", "ten"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)


# -- eviction under concurrent readers ---------------------------------------------------------


class Readers:
    """Reader threads of this process and `md5sum` processes, each comparing every read with DVC's
    bytes. Problems are collected, never raised inside a thread."""

    def __init__(self, root: Path, files: dict[str, bytes], seed: int):
        self.root, self.files = root, files
        self.digests = {relpath: md5_hex(data) for relpath, data in files.items()}
        self.problems: list[str] = []
        self.reads = 0
        self.until = lambda: True  # when readers may stop after their rounds
        self._lock = threading.Lock()
        self._seed = seed

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def thread(self, number: int, rounds: int) -> None:
        rng = random.Random(self._seed * 100 + number)
        paths = sorted(self.files)
        for _ in self._rounds(rounds):
            relpath = rng.choice(paths)
            expected = self.files[relpath]
            try:
                with open(self.root / relpath, "rb", buffering=0) as file:
                    if rng.random() < 0.5:
                        actual = file.read()
                        if actual != expected:
                            self._problem(f"{relpath}: read {len(actual)} bytes, md5 {md5_hex(actual)}")
                    else:  # ranged reads at random offsets, one file open across evictions
                        for _ in range(6):
                            offset = rng.randrange(len(expected))
                            file.seek(offset)
                            chunk = file.read(rng.randrange(1, 256 * 1024))
                            if chunk != expected[offset:offset + len(chunk)] or not chunk:
                                self._problem(f"{relpath}: wrong bytes at offset {offset}")
                            time.sleep(0.001)
            except OSError as exc:
                self._problem(f"{relpath}: {exc!r}")
            with self._lock:
                self.reads += 1

    def process(self, passes: int) -> None:
        paths = sorted(self.files)
        for _ in self._rounds(passes):
            result = subprocess.run(["md5sum", *paths], cwd=self.root, capture_output=True, text=True,
                                    timeout=300, check=False)
            if result.returncode != 0:
                self._problem(f"md5sum exited {result.returncode}: {result.stderr.strip()}")
            for line in result.stdout.splitlines():
                digest, relpath = line.split(maxsplit=1)
                if digest != self.digests[relpath]:
                    self._problem(f"md5sum {relpath}: {digest}")

    def _rounds(self, least: int) -> Iterator[int]:
        """At least `least` rounds, and on while `self.until` says so (for at most 5 minutes: reads
        the page cache answers take no time, gc runs do)."""
        deadline = time.monotonic() + 300
        for number in itertools.count():
            if number >= least and (self.until() or time.monotonic() > deadline):
                return
            yield number

    def run(self, threads: int, rounds: int, processes: int, passes: int) -> None:
        with ThreadPoolExecutor(max_workers=threads + processes) as pool:
            jobs = [pool.submit(self.thread, number, rounds) for number in range(threads)]
            jobs += [pool.submit(self.process, passes) for _ in range(processes)]
            for job in jobs:
                job.result()


class GcLoop:
    """`regfs cache gc --max-size 0 -v` run again and again from another process, in a thread."""

    def __init__(self, tools, cache: Path, workdir: Path):
        self._tools, self._cache, self._workdir = tools, cache, workdir
        self._stop = threading.Event()
        self.evicted: dict[str, int] = {}
        self.runs = 0
        self.problems: list[str] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            result = _cli(self._tools, self._workdir, "cache", "gc", "--max-size", "0", "-v",
                          "--cache-dir", self._cache)
            self.runs += 1
            if result.returncode != 0:
                self.problems.append(str(result))
            for prefix, rest in _EVICTED.findall(result.stdout):
                self.evicted[prefix + rest] = self.evicted.get(prefix + rest, 0) + 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=300)


def test_readers_race_the_evictor_and_gc_from_another_process(dataset, tools, mount, tmp_path):
    """A mount with a small --cache-size, read by threads and processes (same and different
    objects, whole and ranged reads) while `regfs cache gc --max-size 0` loops: every read is DVC's
    bytes, no reader sees an error. Then a new mount of that cache, read without gc: once its
    readers stop, its own evictor has brought the cache under the cap. An object is never
    downloaded again unless it was evicted in between."""
    cache = tmp_path / "cache"
    racing = mount(f"{dataset.path}@main", "--cache-size", str(CAP), "--refresh", "0", cache_dir=cache)
    readers = Readers(racing.path, dataset.files, seed=1)
    with GcLoop(tools, cache, tmp_path / "gc") as gc:
        readers.until = lambda: gc.runs >= GC_RUNS
        readers.run(threads=6, rounds=30, processes=2, passes=2)
    assert not readers.problems, "\n".join(readers.problems[:20])
    assert not gc.problems, "\n".join(gc.problems[:3])
    assert gc.runs >= GC_RUNS and gc.evicted, f"gc ran {gc.runs} times and evicted {gc.evicted}"
    racing.unmount()

    # Without gc. The racing mount may have served every read of this phase from objects it still
    # held open after gc unlinked them, or from the kernel's page cache, and never needed its
    # evictor: a new mount has neither. The dataset (12.6 MB) is over the cap, so its evictor must
    # evict for the cache to end under the cap.
    assert sum(map(len, dataset.files.values())) > 2 * CAP
    calm = mount(f"{dataset.path}@main", "--cache-size", str(CAP), "--refresh", "0", cache_dir=cache)
    readers = Readers(calm.path, dataset.files, seed=3)
    readers.run(threads=4, rounds=20, processes=1, passes=1)
    assert not readers.problems, "\n".join(readers.problems[:20])
    _wait_for(lambda: sum(_disk_objects(cache).values()) <= CAP,
              f"the cache to shrink under {CAP} bytes: {sum(_disk_objects(cache).values())}")
    log = calm.log_text()
    passes = [int(count) for count in _PASS.findall(log)]
    assert passes and sum(passes) > 0, "the mount's evictor never evicted:\n" + calm.log_tail()
    assert f"keeping the cache under {format_size(CAP)}" in log

    # Downloads of one object by a mount never outnumber 1 + its evictions (by gc, and by that
    # mount's evictor).
    for mounted, evicted_by_gc in ((racing, gc.evicted), (calm, {})):
        log = mounted.log_text()
        passes = [int(count) for count in _PASS.findall(log)]
        fetches = _fetch_counts(log)
        refetched = sum(max(0, count - 1 - evicted_by_gc.get(object_id, 0))
                        for object_id, count in fetches.items())
        assert refetched <= sum(passes), (mounted.path, fetches, gc.evicted, passes)
    assert not list((cache / "regfs" / "tmp").iterdir())


def test_each_download_follows_an_eviction(dataset, tools, mount, tmp_path):
    """Racing readers of the same objects, while gc evicts everything again and again: an object
    is downloaded once, and again only after gc evicted it (gc lists what it evicts)."""
    cache = tmp_path / "cache"
    mounted = mount(f"{dataset.path}@main", "--refresh", "0", cache_dir=cache)
    files = {relpath: data for relpath, data in dataset.files.items() if relpath.startswith("shards/part-0")}
    readers = Readers(mounted.path, files, seed=2)
    with GcLoop(tools, cache, tmp_path / "gc") as gc:
        readers.until = lambda: gc.runs >= GC_RUNS
        readers.run(threads=6, rounds=25, processes=2, passes=2)
    assert not readers.problems, "\n".join(readers.problems[:20])
    assert not gc.problems, "\n".join(gc.problems[:3])
    fetches = _fetch_counts(mounted.log_text())
    assert fetches
    too_many = {object_id: (count, gc.evicted.get(object_id, 0)) for object_id, count in fetches.items()
                if count > 1 + gc.evicted.get(object_id, 0)}
    assert not too_many, f"(downloads, evictions) of objects downloaded more often than evicted: {too_many}"


def test_an_open_file_reads_on_after_gc_evicts_its_object(dataset, tools, mount, tmp_path):
    mounted = mount(f"{dataset.path}@main", "--refresh", "0")
    expected = dataset.files["big.bin"]
    stored = object_path(mounted.cache_dir, dataset.object_id("big.bin"))
    with open(mounted / "big.bin", "rb", buffering=0) as file:
        head = file.read(1 << 20)
        assert stored.exists()
        result = _cli(tools, tmp_path / "gc", "cache", "gc", "--max-size", "0", "--cache-dir",
                      mounted.cache_dir)
        assert result.returncode == 0, result
        assert not stored.exists(), "gc did not evict an object open in another process"
        rest = file.read()
    assert head + rest == expected
    # Read again: from the kernel's page cache or the daemon's still open descriptor, or, once
    # those are gone, fetched again.
    assert (mounted / "big.bin").read_bytes() == expected
    assert _fetch_counts(mounted.log_text())[dataset.object_id("big.bin")] in (1, 2)


def test_an_object_bigger_than_the_cap_is_served_then_evicted(dataset, mount):
    """`-o cache_size=1M`: big.bin (2.5 MB) still reads whole; its object stays while open (the
    mount's evictor leaves objects it holds open) and goes once closed."""
    mounted = mount(f"{dataset.path}@main", "-o", "cache_size=1M,refresh=0")
    stored = object_path(mounted.cache_dir, dataset.object_id("big.bin"))
    with open(mounted / "big.bin", "rb") as file:
        assert file.read() == dataset.files["big.bin"]
        _wait_for(lambda: "still over the cap: 1 objects open" in mounted.log_text(),
                  "the evictor to find the cache over its cap")
        assert stored.exists()
    _wait_for(lambda: not stored.exists(), "big.bin's object to be evicted once closed")
    assert re.search(r"evicted 1 objects \(2\.4 MiB\) to keep the cache under 1\.0 MiB", mounted.log_text())
    assert (mounted / "big.bin").read_bytes() == dataset.files["big.bin"]


def test_a_bad_cache_size_is_one_clear_error(dataset, regfs_cli, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = regfs_cli("mount", dataset.path, mountpoint, "--cache-size", "12X", "--cache-dir",
                       tmp_path / "cache")
    assert result.returncode == 1, result
    (line,) = result.error_lines()
    assert line.startswith("regfs: error: not a size: '12X' (give bytes"), line
    assert not os.path.ismount(mountpoint)


# -- gc: what it never removes, and in which order -----------------------------------------------


@contextlib.contextmanager
def _download_lock(cache: Path, object_id: str) -> Iterator[None]:
    """Hold an object's download lock, as a regfs process downloading that object does."""
    with ObjectCache(str(cache)).locked(ObjectRef(object_id, "md5")) as locked:
        assert locked
        yield


def _gc(tools, workdir: Path, cache: Path, max_size: int) -> set[str]:
    """Run `regfs cache gc -v`; the object ids it says it evicted."""
    result = _cli(tools, workdir, "cache", "gc", "--max-size", str(max_size), "-v", "--cache-dir", cache)
    assert result.returncode == 0, result
    return {prefix + rest for prefix, rest in _EVICTED.findall(result.stdout)}


def test_gc_spares_temporary_files_and_objects_being_downloaded(dataset, tools, mount, tmp_path):
    mounted = mount(f"{dataset.path}@main", "--refresh", "0")
    cache = mounted.cache_dir
    for name in ("a.bin", "b.bin", "c.bin"):
        assert (mounted / name).read_bytes() == dataset.files[name]
    ids = {name: dataset.object_id(name) for name in ("a.bin", "b.bin", "c.bin")}
    # A download in progress (of an object not in the cache yet): its temporary file, its lock held.
    pending = md5_hex(b"an object being downloaded")
    temporary = cache / "regfs" / "tmp" / f"{pending}~x1y2z3"
    temporary.write_bytes(b"partial" * 1000)
    with _download_lock(cache, pending), _download_lock(cache, ids["a.bin"]):
        assert _gc(tools, tmp_path / "gc1", cache, 0) == {ids["b.bin"], ids["c.bin"]}
        assert object_path(cache, ids["a.bin"]).exists()
        assert temporary.read_bytes() == b"partial" * 1000
        report = json.loads(_cli(tools, tmp_path / "status", "cache", "status", "--json", "--cache-dir",
                                 cache).stdout)
        assert (report["objects"], report["temporary_files"], report["temporary_bytes"]) == (1, 1, 7000)
    assert _gc(tools, tmp_path / "gc2", cache, 0) == {ids["a.bin"]}
    assert temporary.exists(), "gc removed a temporary file"
    assert cache_objects(cache, manifests=True) == set()
    for name in ("a.bin", "b.bin", "c.bin"):
        assert (mounted / name).read_bytes() == dataset.files[name]


def test_gc_evicts_the_least_recently_used_first(dataset, extra, tools, mount, tmp_path):
    """Recency is the last use by any regfs process, else (objects DVC wrote) the mtime."""
    cache = tmp_path / "cache"
    mounted = mount(f"{dataset.path}@main", "--refresh", "0", cache_dir=cache)
    for name in ("a.bin", "b.bin", "c.bin", "a.bin"):  # downloaded a, b, c; then a used again
        with open(mounted / name, "rb") as file:  # pages dropped: the read reaches the daemon
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert file.read() == dataset.files[name]
    mounted.unmount()  # the daemon writes the uses it holds in memory as it exits
    _dvc_pull_into(tools, extra, cache, tmp_path / "workspace")
    e2 = object_path(cache, extra.object_id("e2.bin"))
    an_hour_ago = time.time() - 3600
    os.utime(e2, (an_hour_ago, an_hour_ago))
    sources = {"a.bin": dataset, "b.bin": dataset, "c.bin": dataset, "e1.bin": extra, "e2.bin": extra}
    size = {name: len(source.files[name]) for name, source in sources.items()}
    object_id = {name: source.object_id(name) for name, source in sources.items()}
    assert _disk_objects(cache) == {str(object_path(cache, object_id[name]).relative_to(cache)): size[name]
                                    for name in sources}
    # Oldest first: e2 (DVC's, an hour old), b, c, a (used after c), e1 (DVC's, written last).
    assert _gc(tools, tmp_path / "gc1", cache, sum(size.values()) - size["e2.bin"]) == {object_id["e2.bin"]}
    assert _gc(tools, tmp_path / "gc2", cache, size["a.bin"] + size["c.bin"] + size["e1.bin"]) == \
        {object_id["b.bin"]}
    assert _gc(tools, tmp_path / "gc3", cache, size["a.bin"] + size["e1.bin"]) == {object_id["c.bin"]}
    assert _gc(tools, tmp_path / "gc4", cache, size["e1.bin"]) == {object_id["a.bin"]}


# -- status and verify -------------------------------------------------------------------------


def _store_totals(store: Path) -> dict[str, int]:
    files = [path for path in store.rglob("*") if path.is_file()]
    return {"objects": len(files), "bytes": sum(path.stat().st_size for path in files)}


def test_status_figures_match_the_disk_and_the_stores(dataset, legacy, extra, tools, mount, oracle, tmp_path):
    cache = tmp_path / "cache"
    for source, dvc in ((dataset, None), (legacy, tools.dvc2)):
        mounted = mount(f"{source.path}@main", "--refresh", "0", cache_dir=cache)
        assert_same_tree(snapshot(mounted.path), oracle.tree(source.path, "main", dvc_executable=dvc),
                         f"mount of {source.path.parent.name}")
        mounted.unmount()  # its last index writes done: the state on disk stays as status finds it
    _dvc_pull_into(tools, extra, cache, tmp_path / "workspace")
    (cache / "regfs" / "tmp" / f"{md5_hex(b'x')}~abc").write_bytes(b"t" * 777)
    # regfs's own files as the status will find them (its own index connections checkpoint, later).
    state = [path for path in (cache / "regfs").rglob("*") if path.is_file()
             and path.relative_to(cache / "regfs").parts[0] != "tmp" and not path.name.endswith(("-wal", "-shm"))]
    state_bytes = sum(path.stat().st_size for path in state)

    result = _cli(tools, tmp_path / "status", "cache", "status", "--json", "--cache-dir", cache)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    disk = _disk_objects(cache)
    assert (report["objects"], report["bytes"]) == (len(disk), sum(disk.values()))
    assert (report["temporary_files"], report["temporary_bytes"]) == (1, 777)
    tops = {path.relative_to(cache / "regfs").parts[0] for path in state}
    assert {"sizes.sqlite", "usage.sqlite", "git"} <= tops, tops  # the indexes and the Git mirrors count
    assert report["state_bytes"] == state_bytes > 0
    # Each remote: every object of its store was fetched (one commit, all of it read).
    assert report["remotes"] == {f"remote 'store' ({source.store})": _store_totals(source.store)
                                 for source in (dataset, legacy)}
    assert report["unknown_origin"] == _store_totals(extra.store)  # written by DVC

    text = _cli(tools, tmp_path / "status-text", "cache", "status", "--cache-dir", cache)
    assert text.returncode == 0 and f"objects          {len(disk)}, " in text.stdout, text
    assert "regfs state      " in text.stdout, text
    assert "unknown origin: 2 objects" in text.stdout
    missing = _cli(tools, tmp_path / "missing", "cache", "status", "--cache-dir", tmp_path / "no-such-cache")
    assert missing.returncode == 1 and missing.error_lines() == [
        f"regfs: error: no cache at {tmp_path / 'no-such-cache'}"]


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_verify_drops_corrupt_objects_of_both_layouts(dataset, legacy, tools, mount, oracle, tmp_path):
    cache = tmp_path / "cache"
    mounts = {}
    for source, dvc in ((dataset, None), (legacy, tools.dvc2)):
        mounts[source.path] = mount(f"{source.path}@main", "--refresh", "0", cache_dir=cache)
        snapshot(mounts[source.path].path)
    before = _disk_objects(cache)
    damaged = {object_path(cache, dataset.object_id("a.bin")): _flip_a_bit,
               object_path(cache, dataset.object_id("b.bin")): _truncate,
               object_path(cache, legacy.object_id("crlf.txt"), legacy=True): _flip_a_bit,
               object_path(cache, legacy.object_id("binary.dat"), legacy=True): _truncate}
    for path, damage in damaged.items():
        damage(path)
    relpaths = {str(path.relative_to(cache)) for path in damaged}

    result = _cli(tools, tmp_path / "verify1", "cache", "verify", "-j", "2", "--cache-dir", cache)
    assert result.returncode == 1, result
    assert set(re.findall(r"^dropped (\S+): corrupt", result.stdout, re.MULTILINE)) == relpaths, result
    assert len(result.stdout.splitlines()) == len(relpaths), result
    kept = {relpath: size for relpath, size in before.items() if relpath not in relpaths}
    assert _disk_objects(cache) == kept

    again = _cli(tools, tmp_path / "verify2", "cache", "verify", "--cache-dir", cache)
    assert again.returncode == 0 and again.stdout == "", again
    assert f"verified {len(before) - len(relpaths)} objects: 0 bad" in again.stderr

    # Mounts fetch the dropped objects again and serve DVC's bytes. New ones: the first mounts may
    # serve their readers from the kernel's page cache, filled with the bytes verified at download.
    for source, dvc in ((dataset, None), (legacy, tools.dvc2)):
        mounts[source.path].unmount()
        mounts[source.path] = mount(f"{source.path}@main", "--refresh", "0", cache_dir=cache)
        assert_same_tree(snapshot(mounts[source.path].path),
                         oracle.tree(source.path, "main", dvc_executable=dvc),
                         f"mount of {source.path.parent.name} after verify")
    fetches = {object_id: count for mounted in mounts.values()
               for object_id, count in _fetch_counts(mounted.log_text()).items()}
    damaged_ids = {dataset.object_id("a.bin"), dataset.object_id("b.bin"), legacy.object_id("crlf.txt"),
                   legacy.object_id("binary.dat")}
    assert fetches == dict.fromkeys(damaged_ids, 1), fetches
    assert _disk_objects(cache) == before


# -- a group-shared cache ------------------------------------------------------------------------


def test_group_members_evict_each_others_objects(tools, public_dir):  # noqa: F811 (the fixture)
    """`--shared group`: one member's gc evicts objects another member's regfs fetched; the index
    stays writable for both; the first member reads on, fetching again."""
    group, users = 4310, (4311, 4312)
    registry = Registry.create(tools, public_dir / "registry", remotes={"store": "../store"},
                               default_remote="store")
    contents = {f"set/part-{i}.bin": random_bytes(600 + i, 100_000 + i) for i in range(3)}
    for relpath, data in contents.items():
        registry.write(relpath, data)
    registry.add("set")
    registry.commit("data")
    registry.push()
    cache = public_dir / "cache"
    cache.mkdir()
    os.chown(cache, 0, group)
    cache.chmod(0o2775)

    def regfs_as(uid: int, *args) -> subprocess.CompletedProcess:
        home = public_dir / f"home-{uid}"
        env = {**tools.env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={group}",
                               sys.executable, "-m", "regfs", *map(str, args)], env=env, cwd=public_dir,
                              capture_output=True, timeout=120, check=False)

    def read_all(uid: int) -> None:
        for relpath, data in contents.items():
            result = regfs_as(uid, "cat", f"{registry.path}@main", relpath, "--cache-dir", cache,
                              "--shared", "group")
            assert result.stdout == data, result.stderr.decode()

    read_all(users[0])
    assert len(_disk_objects(cache)) == len(contents) + 1  # and the .dir manifest
    gc = regfs_as(users[1], "cache", "gc", "--max-size", "0", "-v", "--cache-dir", cache, "--shared", "group")
    assert gc.returncode == 0, gc.stderr.decode()
    assert len(_EVICTED.findall(gc.stdout.decode())) == len(contents) + 1
    assert _disk_objects(cache) == {}
    for name in ("usage.sqlite", "sizes.sqlite"):
        info = (cache / "regfs" / name).stat()
        assert info.st_gid == group and info.st_mode & 0o664 == 0o664, f"{name}: {oct(info.st_mode)}"
    read_all(users[0])
    verify = regfs_as(users[1], "cache", "verify", "--cache-dir", cache, "--shared", "group")
    assert verify.returncode == 0, verify.stderr.decode()
    status = regfs_as(users[1], "cache", "status", "--json", "--cache-dir", cache, "--shared", "group")
    report = json.loads(status.stdout)
    assert report["objects"] == len(contents) + 1
    assert list(report["remotes"]) == [f"remote 'store' ({public_dir / 'store'})"]
