#!/usr/bin/env python3
"""The regfs soak: many readers, moving refs, prefetch and eviction, for as long as you ask.

Builds a registry with the real git and dvc CLIs (N small files of 1-64 KiB in one directory
output, a few large files in another, two commits), pushes it to a local remote, drops the
registry's own cache, and mounts it with a cache cap below the data's size, so eviction runs all
the time. Then, until the duration is up:

- R reader processes read random files of random revisions, whole or by random ranges, through the
  mount, and compare every byte with the content the script generated (no md5 of a copy: the
  expected bytes are regenerated from their seed). The branch `moving` is resolved to its `@sha`
  first, since it may move between a readlink and a read;
- the branch `moving` jumps between the two commits every few seconds (the mount refreshes each
  second), so the symlink under the mount changes while readers use it;
- `regfs prefetch` fetches random sub-directories through the daemon;
- `regfs cache gc --max-size` squeezes the cache below the mount's own cap now and then;
- the daemon's resident memory is sampled every second.

The verdict: 0 wrong bytes, 0 read errors, 0 hangs (a reader that makes no progress for
--hang-after seconds), 0 failed prefetch/gc runs, no ERROR line in the daemon log, `regfs cache
verify` clean at the end. Exit status 0 only if all hold. Figures print as a table, and as JSON
with --json FILE.

Usage: .venv/bin/python scripts/soak.py --duration 600            (a 10k-file registry, 16 readers)
       .venv/bin/python scripts/soak.py --duration 30 --files 1000 (the short version the tests run)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SMALL_MIN, SMALL_MAX = 1 << 10, 64 << 10
BIG_MIN, BIG_MAX = 4 << 20, 12 << 20
PER_DIR = 100  # small files per sub-directory of data/
CHANGED = 0.05  # share of small files the second commit rewrites


def content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class FileSpec:
    seed: int
    size: int


def revision_a(files: int, big: int) -> dict[str, FileSpec]:
    rng = random.Random(1)
    tree = {f"data/d{i // PER_DIR:03d}/f{i:05d}.bin": FileSpec(10 + i, rng.randint(SMALL_MIN, SMALL_MAX))
            for i in range(files)}
    tree.update({f"big/b{i}.bin": FileSpec(1_000_000 + i, rng.randint(BIG_MIN, BIG_MAX)) for i in range(big)})
    return tree


def revision_b(tree_a: dict[str, FileSpec]) -> dict[str, FileSpec]:
    """Rewrites some files, drops a few, adds a directory: what a registry's next version does."""
    rng = random.Random(2)
    tree = dict(tree_a)
    small = sorted(path for path in tree if path.startswith("data/"))
    for path in rng.sample(small, max(1, int(len(small) * CHANGED))):
        tree[path] = FileSpec(rng.randrange(1 << 40), rng.randint(SMALL_MIN, SMALL_MAX))
    for path in rng.sample(small, max(1, len(small) // 100)):
        del tree[path]
    for i in range(PER_DIR):
        tree[f"data/new/g{i:03d}.bin"] = FileSpec(2_000_000 + i, rng.randint(SMALL_MIN, SMALL_MAX))
    return tree


# -- building the registry --------------------------------------------------------------------------


class Tools:
    def __init__(self, work: Path, dvc: str, regfs: list[str]):
        self.work, self.dvc, self.regfs = work, dvc, regfs
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("GIT_", "DVC_"))}
        self.env.update(GIT_AUTHOR_NAME="soak", GIT_AUTHOR_EMAIL="soak@regfs.invalid",
                        GIT_COMMITTER_NAME="soak", GIT_COMMITTER_EMAIL="soak@regfs.invalid",
                        GIT_CONFIG_NOSYSTEM="1", DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0",
                        DVC_SITE_CACHE_DIR=str(work / "dvc-site-cache"))

    def run(self, *args: str | os.PathLike, cwd: Path | None = None, check: bool = True) -> str:
        done = subprocess.run([os.fspath(arg) for arg in args], cwd=cwd, env=self.env, text=True,
                              stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if check and done.returncode != 0:
            raise SystemExit(f"soak: {' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout}{done.stderr}")
        return done.stdout

    def regfs_cli(self, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.regfs, *map(os.fspath, args)], env=self.env, text=True,
                              stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if check and done.returncode != 0:
            raise SystemExit(f"soak: regfs {' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout}{done.stderr}")
        return done


def write_tree(root: Path, tree: dict[str, FileSpec]) -> None:
    for top in ("data", "big"):
        shutil.rmtree(root / top, ignore_errors=True)
    for relpath, spec in tree.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(spec.seed, spec.size))


def build_registry(tools: Tools, trees: dict[str, dict[str, FileSpec]]) -> dict[str, str]:
    """The registry (tags a and b, branch `moving`); returns tag -> commit sha."""
    registry, remote = tools.work / "registry", tools.work / "remote"
    registry.mkdir()
    tools.run("git", "init", "-q", "-b", "main", cwd=registry)
    tools.run(tools.dvc, "init", "-q", cwd=registry)
    tools.run(tools.dvc, "remote", "add", "-d", "store", remote, cwd=registry)
    shas = {}
    for tag, tree in trees.items():
        write_tree(registry, tree)
        tools.run(tools.dvc, "add", "-q", "data", "big", cwd=registry)
        tools.run("git", "add", "-A", cwd=registry)
        tools.run("git", "commit", "-q", "-m", f"revision {tag}", cwd=registry)
        tools.run("git", "tag", tag, cwd=registry)
        shas[tag] = tools.run("git", "rev-parse", "HEAD", cwd=registry).strip()
        tools.run(tools.dvc, "push", "-q", "-j", "4", cwd=registry)
    tools.run("git", "branch", "moving", shas["a"], cwd=registry)
    shutil.rmtree(registry / ".dvc" / "cache")  # every object comes from the remote, through regfs
    return shas


# -- readers ----------------------------------------------------------------------------------------


@dataclass
class ReaderResult:
    ops: int = 0
    ranged_ops: int = 0
    bytes_read: int = 0
    wrong: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)
    max_op_s: float = 0.0


def reader(index: int, mountpoint: str, trees: dict[str, dict[str, FileSpec]], shas: dict[str, str],
           deadline: float, heartbeat, results) -> None:
    rng = random.Random(1000 + index)
    result = ReaderResult()
    by_sha = {shas[tag]: tree for tag, tree in trees.items()}
    paths = {sha: sorted(tree) for sha, tree in by_sha.items()}
    while time.time() < deadline:
        started = time.monotonic()
        where = rng.choice(["a", "b", "moving", "@a", "@b"])
        try:
            if where.startswith("@"):
                sha = shas[where[1:]]
            else:
                sha = os.readlink(os.path.join(mountpoint, where)).removeprefix("@")
            relpath = rng.choice(paths[sha])
            spec = by_sha[sha][relpath]
            full = os.path.join(mountpoint, "@" + sha, relpath)
            ranged = rng.random() < 0.3
            with open(full, "rb", buffering=0) as file:
                if ranged:
                    offset = rng.randrange(spec.size)
                    length = rng.randint(1, min(spec.size - offset, 1 << 20))
                    data = os.pread(file.fileno(), length, offset)
                    expected = content(spec.seed, spec.size)[offset:offset + length]
                else:
                    data = file.read()
                    expected = content(spec.seed, spec.size)
            result.ops += 1
            result.ranged_ops += ranged
            result.bytes_read += len(data)
            if data != expected:
                result.wrong += 1
                result.messages.append(f"wrong bytes: {full} ranged={ranged} got {len(data)} bytes")
        except (OSError, KeyError) as exc:
            result.errors += 1
            result.messages.append(f"{where}: {type(exc).__name__}: {exc}")
        result.max_op_s = max(result.max_op_s, time.monotonic() - started)
        heartbeat[index] = time.time()
    result.messages = result.messages[:20]
    results.put({"index": index, **asdict(result)})


# -- the background activity ------------------------------------------------------------------------


class Background:
    """Threads that move the ref, prefetch, gc and sample the daemon's memory until stopped."""

    def __init__(self, tools: Tools, mountpoint: Path, cache: Path, shas: dict[str, str],
                 subdirs: list[str], gc_size: int, daemon_pid: int):
        self.tools, self.mountpoint, self.cache = tools, mountpoint, cache
        self.shas, self.subdirs, self.gc_size, self.daemon_pid = shas, subdirs, gc_size, daemon_pid
        self.stop = threading.Event()
        self.counts = {"ref_moves": 0, "prefetch_runs": 0, "prefetch_failures": 0, "gc_runs": 0,
                       "gc_failures": 0}
        self.failures: list[str] = []
        self.rss_mb: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=target, daemon=True)
                   for target in (self._move_refs, self._prefetch, self._gc, self._sample_memory)]
        for thread in threads:
            thread.start()
        return threads

    def _count(self, name: str, failure: str | None = None) -> None:
        with self._lock:
            self.counts[name] += 1
            if failure:
                self.failures.append(failure)

    def _move_refs(self) -> None:
        registry, tag = self.tools.work / "registry", "b"
        while not self.stop.wait(3.0):
            self.tools.run("git", "branch", "-f", "moving", self.shas[tag], cwd=registry)
            self._count("ref_moves")
            tag = "a" if tag == "b" else "b"

    def _prefetch(self) -> None:
        rng = random.Random(7)
        while not self.stop.wait(4.0):
            sha = self.shas[rng.choice(["a", "b"])]
            target = self.mountpoint / ("@" + sha) / rng.choice(self.subdirs)
            done = self.tools.regfs_cli("prefetch", "-j", "4", target, check=False)
            self._count("prefetch_runs")
            if done.returncode != 0:
                self._count("prefetch_failures", f"prefetch {target}: {done.stderr.strip()[-400:]}")

    def _gc(self) -> None:
        while not self.stop.wait(7.0):
            done = self.tools.regfs_cli("cache", "gc", "--max-size", str(self.gc_size), "--cache-dir",
                                        self.cache, check=False)
            self._count("gc_runs")
            if done.returncode != 0:
                self._count("gc_failures", f"cache gc: {done.stderr.strip()[-400:]}")

    def _sample_memory(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(1.0):
            rss = rss_mb(self.daemon_pid)
            if rss is not None:
                self.rss_mb.append((time.monotonic() - started, rss))


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def cache_bytes(cache: Path) -> int:
    total = 0
    for top in (cache / "files" / "md5", cache):
        if not top.is_dir():
            continue
        for prefix in top.iterdir():
            if len(prefix.name) == 2 and prefix.is_dir():
                total += sum(entry.stat().st_size for entry in prefix.iterdir() if entry.is_file())
    return total


# -- the run ----------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    return int(float(number) * units[unit])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    parser.add_argument("--files", type=int, default=10_000, help="small files (default 10000)")
    parser.add_argument("--big", type=int, default=4, help="large files, read by ranges too (default 4)")
    parser.add_argument("--readers", type=int, default=16, help="reader processes (default 16)")
    parser.add_argument("--cache-share", type=float, default=0.4,
                        help="the mount's --cache-size as a share of the data's size (default 0.4)")
    parser.add_argument("--hang-after", type=float, default=60, help="a reader stuck this long is a hang")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed)")
    parser.add_argument("--dvc", default=shutil.which("dvc", path=os.path.dirname(sys.executable))
                        or shutil.which("dvc"), help="the dvc executable (default: next to python)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not args.dvc:
        parser.error("no dvc executable found; pass --dvc")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="regfs-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tools = Tools(work, args.dvc, [sys.executable, "-m", "regfs"])
    trees = {"a": revision_a(args.files, args.big)}
    trees["b"] = revision_b(trees["a"])
    total = sum(spec.size for spec in {**trees["a"], **trees["b"]}.values())
    print(f"soak: building a registry of {len(trees['a'])} + {len(trees['b'])} files "
          f"({total / 2**20:.0f} MiB) in {work}", flush=True)
    built = time.monotonic()
    shas = build_registry(tools, trees)
    print(f"soak: registry built in {time.monotonic() - built:.0f}s", flush=True)

    mountpoint, cache, log = work / "mnt", work / "cache", work / "regfs.log"
    mountpoint.mkdir()
    cap = int(total * args.cache_share)
    tools.regfs_cli("mount", work / "registry", mountpoint, "--cache-dir", cache, "--refresh", "1",
                    "--cache-size", str(cap), "--log-file", log)
    try:
        figures = run_load(args, tools, trees, shas, mountpoint, cache, cap)
    finally:
        tools.regfs_cli("umount", mountpoint, check=False)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    verify = tools.regfs_cli("cache", "verify", "--cache-dir", cache, check=False)
    log_errors = [line for line in log.read_text(errors="replace").splitlines() if " ERROR " in line]
    figures.update(cache_verify_exit=verify.returncode, daemon_log_errors=len(log_errors),
                   daemon_log_error_lines=log_errors[:10], total_data_mib=round(total / 2**20, 1),
                   cache_cap_mib=round(cap / 2**20, 1))
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    passed = (figures["wrong"] == 0 and figures["errors"] == 0 and figures["hangs"] == 0
              and not figures["background_failures"] and verify.returncode == 0 and not log_errors)
    print("soak: PASS" if passed else "soak: FAIL", flush=True)
    return 0 if passed else 1


def run_load(args, tools: Tools, trees, shas, mountpoint: Path, cache: Path, cap: int) -> dict:
    status = json.loads(tools.regfs_cli("status", "--json").stdout)
    (daemon_pid,) = [record["pid"] for record in status if record["mountpoint"] == str(mountpoint)]
    subdirs = sorted({path.rsplit("/", 1)[0] for tree in trees.values() for path in tree})
    background = Background(tools, mountpoint, cache, shas, subdirs, cap // 2, daemon_pid)
    context = multiprocessing.get_context("fork")
    heartbeat = context.Array("d", [time.time()] * args.readers)
    results = context.Queue()
    deadline = time.time() + args.duration
    readers = [context.Process(target=reader, args=(i, str(mountpoint), trees, shas, deadline, heartbeat,
                                                    results), daemon=True)
               for i in range(args.readers)]
    started = time.monotonic()
    for process in readers:
        process.start()
    threads = background.start()
    hung: set[int] = set()
    collected: list[dict] = []
    while len(collected) < len(readers):
        while not results.empty():
            collected.append(results.get())
        now = time.time()
        for index, process in enumerate(readers):
            if process.is_alive() and now - heartbeat[index] > args.hang_after:
                hung.add(index)
        if hung or (time.time() > deadline + args.hang_after
                    and not any(process.is_alive() for process in readers)):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    background.stop.set()
    for thread in threads:
        thread.join(timeout=120)
    for process in readers:
        if process.is_alive():  # hung in a read: ours to end, by pid
            os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=10)
    while not results.empty():
        collected.append(results.get())
    stats = json.loads(tools.regfs_cli("stats", "--json", mountpoint).stdout)
    rss = [mib for _, mib in background.rss_mb]
    warm = [mib for seconds, mib in background.rss_mb if seconds >= elapsed * 0.25]
    ops = sum(r["ops"] for r in collected)
    return {
        "duration_s": round(elapsed, 1), "readers": args.readers, "readers_reported": len(collected),
        "files": len(trees["a"]), "ops": ops, "ranged_ops": sum(r["ranged_ops"] for r in collected),
        "ops_per_s": round(ops / elapsed, 1) if elapsed else 0,
        "bytes_read_mib": round(sum(r["bytes_read"] for r in collected) / 2**20, 1),
        "wrong": sum(r["wrong"] for r in collected), "errors": sum(r["errors"] for r in collected),
        # a reader that stalled, or never reported (killed while stuck in a read)
        "hangs": len(hung | (set(range(len(readers))) - {r["index"] for r in collected})),
        "max_op_s": round(max((r["max_op_s"] for r in collected), default=0.0), 2),
        "reader_messages": [m for r in collected for m in r["messages"]][:20],
        **background.counts, "background_failures": background.failures[:10],
        "objects_fetched": stats["objects_fetched"], "bytes_fetched_mib": round(stats["bytes_fetched"] / 2**20, 1),
        "cache_mib_at_end": round(cache_bytes(cache) / 2**20, 1),
        "rss_mib_first": round(rss[0], 1) if rss else None,
        "rss_mib_after_warmup_median": round(statistics.median(warm), 1) if warm else None,
        "rss_mib_max": round(max(rss), 1) if rss else None, "rss_mib_last": round(rss[-1], 1) if rss else None,
        # medians of each quarter of the run: flat memory shows as flat figures after the first
        "rss_mib_by_quarter": [round(statistics.median(part), 1) if part else None
                               for part in quarters(background.rss_mb, elapsed)],
    }


def quarters(samples: list[tuple[float, float]], elapsed: float) -> list[list[float]]:
    parts: list[list[float]] = [[], [], [], []]
    for seconds, mib in samples:
        parts[min(3, int(4 * seconds / max(elapsed, 1e-9)))].append(mib)
    return parts


def report(figures: dict) -> None:
    width = max(map(len, figures))
    for key, value in figures.items():
        if isinstance(value, list) and value and not isinstance(value[0], str):
            print(f"{key:<{width}}  {' '.join(map(str, value))}")
        elif isinstance(value, list):
            if value:
                print(f"{key}:")
                for item in value:
                    print(f"    {item}")
        else:
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
