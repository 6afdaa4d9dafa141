#!/usr/bin/env python3
"""The regfs read-engine benchmark: each figure a ratio against a baseline measured in the same run.

Builds a registry with the real git and dvc CLIs (a 1 GiB object, 10k small files, a 1,000-file
directory, and two huge listings whose `.dir` manifests and `.dvc` files are written directly),
serves its remote as a local directory, over HTTP (nginx on 127.0.0.1) and as S3 (moto on
127.0.0.1), mounts it with `python -m regfs mount`, and measures every workload of the engine's
targets --repeat times, each time next to its baseline. Prints the machine, the versions, and a
table of medians: baseline, regfs, regfs/baseline, the target and whether it is met, the number of
GETs the server saw and fetched bytes / read bytes.

Workloads (--only takes these names):

  warm-seq     2nd sequential read of the 1 GiB object, cached   vs a native read of the cached file
  first-read   1st read of the cached object, page cache dropped  vs a native read of the cached file
  small-files  10k files of 1-64 KiB, shuffled, 2 readers, warm   vs the same files on local disk
  cold-copy    `cp -r` of a 1,000-file directory, empty cache     vs `dvc pull` of it, same remote
  cold-read    1st read of the 1 GiB object, empty cache          vs a plain GET (cp / curl / s3fs)
               (its time to first byte is the row ttfb-default)
  cold-stream  the same on a --stream mount (bytes served as they arrive, hash checked at the end)
  ttfb-stream  first byte of the uncached object with --stream    vs a plain GET of 1 byte
               (then the rest of it: its GETs and fetched/read bytes)
  ls-100k      `ls -l` of a 100k-entry output, manifest cached    vs `ls -l` of the tree on local disk
  rss-1m       daemon peak RSS after reading every directory of a 1M-entry output

The S3 figures read a 128 MiB object instead of the 1 GiB one: moto serves about 100 MiB/s.
Features this build of regfs lacks (an HTTP remote, --stream) are reported "unsupported by this
build", never a crash. Processes it starts (nginx, the S3 server, readers, mount daemons) it ends
by pid; mounts are unmounted in `finally`.

Usage: python scripts/bench.py [--repeat N] [--budget S] [--only W,...] [--remotes local,http,s3]
                               [--workdir DIR] [--json FILE] [--quick]       (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 1 << 20
READ_BUFFER = 1 << 20
S3_BUCKET = "bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
WORKLOADS = ("warm-seq", "first-read", "small-files", "cold-copy", "cold-read", "cold-stream", "ttfb-stream",
             "ls-100k", "rss-1m")
COLD = ("cold-copy", "cold-read", "cold-stream", "ttfb-stream")
REMOTES = ("local", "http", "s3")
UNSUPPORTED = re.compile(r"not supported|unrecognized arguments|invalid choice", re.IGNORECASE)


@dataclass(frozen=True)
class Sizes:
    big: int  # bytes of the big object
    s3_big: int  # bytes of the big object of the S3 figures (moto is slow)
    small_files: int
    copy_files: int
    list_entries: int  # entries of the `ls -l` output (distinct objects)
    rss_entries: int  # entries of the RSS output (few distinct objects)
    rss_dirs: int


FULL = Sizes(big=1 << 30, s3_big=128 << 20, small_files=10_000, copy_files=1_000, list_entries=100_000,
             rss_entries=1_000_000, rss_dirs=1_000)
QUICK = Sizes(big=64 << 20, s3_big=16 << 20, small_files=1_000, copy_files=200, list_entries=10_000,
              rss_entries=100_000, rss_dirs=100)
RSS_OBJECTS = 1024  # distinct objects behind the entries of the RSS output


class BenchError(Exception):
    pass


class Unsupported(Exception):
    """This build of regfs lacks what the workload needs (an HTTP remote, --stream)."""


# -- tools ------------------------------------------------------------------------------------------


class Tools:
    def __init__(self, work: Path, dvc: str):
        self.work, self.dvc = work, dvc
        self.regfs = [sys.executable, "-m", "regfs"]
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("GIT_", "DVC_"))}
        self.env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@regfs.invalid",
                        GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@regfs.invalid",
                        GIT_CONFIG_NOSYSTEM="1", DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0", **S3_ENV)

    def run(self, *args, cwd: Path | None = None, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        # cwd: the work directory by default, so that `python -m regfs` imports the regfs that
        # PYTHONPATH or the environment gives, not a `regfs/` that happens to be in the caller's cwd
        done = subprocess.run([os.fspath(arg) for arg in args], cwd=cwd or self.work,
                              env={**self.env, **(env or {})},
                              text=True, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if check and done.returncode != 0:
            raise BenchError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def regfs_cli(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(*self.regfs, *args, check=check)


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:5.0f}s]: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def end_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End a process this script started, by its pid."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


# -- servers ----------------------------------------------------------------------------------------


class AccessLog:
    """Lines `METHOD URI STATUS BYTES "RANGE"`, written by nginx or by the S3 server below."""

    def __init__(self, path: Path):
        self.path = path
        path.touch()

    def mark(self) -> int:
        return self.path.stat().st_size

    def since(self, mark: int) -> dict:
        """Requests per method, and body bytes of successful GETs, since `mark`."""
        methods, sent = Counter(), 0
        with open(self.path, "rb") as file:
            file.seek(mark)
            for line in file.read().decode(errors="replace").splitlines():
                method, _uri, status, size, *_ = line.split(" ") + ["", "", "", ""]
                methods[method] += 1
                if method == "GET" and status.startswith("2") and size.isdigit():
                    sent += int(size)
        return {"requests": dict(methods), "gets": methods["GET"], "bytes": sent}


class Nginx:
    def __init__(self, work: Path, root: Path):
        self.prefix = work / "nginx"
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = AccessLog(self.prefix / "access.log")
        template = (Path(__file__).with_name("bench-nginx.conf")).read_text()
        config = (template.replace("@USER@", "user root;" if os.geteuid() == 0 else "")
                  .replace("@PREFIX@", str(self.prefix)).replace("@PORT@", str(self.port))
                  .replace("@ROOT@", str(root)))
        self.config = self.prefix / "nginx.conf"
        self.config.write_text(config)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = find_nginx()
        if binary is None:
            raise BenchError("nginx is not installed (bash scripts/setup.sh --bench installs it)")
        with open(self.prefix / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen([binary, "-p", str(self.prefix), "-c", str(self.config)],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=stderr)
        wait_for_port(self.port, self.process, "nginx")

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process, signal.SIGQUIT)  # nginx's graceful shutdown; workers follow the master


def find_nginx() -> str | None:
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class S3Server:
    """moto's S3 server in a child process (this process's readers must not share its GIL), with a
    WSGI layer that logs each request like nginx does."""

    def __init__(self, work: Path):
        self.dir = work / "s3"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = AccessLog(self.dir / "access.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.dir / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve-s3", str(self.port), str(self.log.path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env={**os.environ, "TMPDIR": str(self.dir)})
        wait_for_port(self.port, self.process, "the moto S3 server")
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        client.create_bucket(Bucket=S3_BUCKET)

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)


def serve_s3(port: int, log_path: str) -> None:
    """The child process of `S3Server`: moto's WSGI app behind a request log, until SIGTERM."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    lock = threading.Lock()
    app = DomainDispatcherApplication(create_backend_app)

    def logged(environ, start_response):
        status = ["-"]

        def start(line, headers, exc_info=None):
            status[0] = line.split(" ", 1)[0]
            return start_response(line, headers, exc_info)

        body, sent = app(environ, start), 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            with lock:
                method, uri = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
                log_file.write(f"{method} {uri} {status[0]} {sent} \"{environ.get('HTTP_RANGE', '-')}\"\n")

    with open(log_path, "a", buffering=1) as log_file:
        server = make_server("127.0.0.1", port, logged, threaded=True, request_handler=MotoRequestHandler)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        server.serve_forever()


# -- the registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BigObject:
    name: str  # its path in the registry
    size: int
    relpath: str  # below a remote's or cache's root: files/md5/ab/cdef...
    local_path: Path  # its file on the local remote


@dataclass
class Registry:
    path: Path
    remote_dir: Path
    big_objects: dict = field(default_factory=dict)  # remote name -> the BigObject read from it
    servers: dict = field(default_factory=dict)  # remote name -> Nginx / S3Server

    def big(self, remote: str = "local") -> BigObject:
        return self.big_objects[remote]


def write_random(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.writelines(rng.randbytes(min(16 * MIB, size - start)) for start in range(0, size, 16 * MIB))


def small_tree(root: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    for index in range(count):
        size = rng.randint(1 << 10, 64 << 10)
        write_random(root / f"d{index // 1000:02d}" / f"f{index:05d}.bin", size, rng)


def object_relpath(md5: str) -> str:
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def put_object(remote_dir: Path, data: bytes, suffix: str = "") -> str:
    md5 = hashlib.md5(data).hexdigest() + suffix
    path = remote_dir / object_relpath(md5)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return md5


def write_dir_output(registry: Path, remote_dir: Path, name: str, entries: list[tuple[str, str]],
                     size: int) -> None:
    """A directory output written by hand, as DVC 3 writes it (dvc-format.md 2, 4): the `.dir`
    manifest (a JSON list of {md5, relpath} sorted by relpath; its id is the md5 of its bytes) on the
    remote, and the `.dvc` file in the registry. `dvc add` of 1M files would take an hour."""
    manifest = json.dumps([{"md5": md5, "relpath": relpath} for relpath, md5 in sorted(entries)],
                          sort_keys=True).encode()
    dir_id = put_object(remote_dir, manifest, ".dir")
    (registry / f"{name}.dvc").write_text(
        f"outs:\n- md5: {dir_id}\n  size: {size}\n  nfiles: {len(entries)}\n  hash: md5\n  path: {name}\n")
    (registry / ".gitignore").open("a").write(f"/{name}\n")


def build_listing(registry: Path, remote_dir: Path, native: Path, count: int) -> None:
    """`list/`: `count` entries, each its own small object on the local remote; the same tree in
    `native` for the baseline."""
    entries, total = [], 0
    native.mkdir(parents=True)
    for index in range(count):
        data = f"entry {index}\n".encode() * (1 + index % 13)
        name = f"e{index:07d}.txt"
        entries.append((name, put_object(remote_dir, data)))
        (native / name).write_bytes(data)
        total += len(data)
    write_dir_output(registry, remote_dir, "list", entries, total)


def build_huge(registry: Path, remote_dir: Path, count: int, dirs: int) -> None:
    """`huge/`: `count` entries in `dirs` directories sharing RSS_OBJECTS distinct objects."""
    contents = [f"object {index}\n".encode() * (1 + index % 50) for index in range(RSS_OBJECTS)]
    ids = [put_object(remote_dir, data) for data in contents]
    sizes = [len(data) for data in contents]
    per_dir = count // dirs
    entries = [(f"d{index // per_dir:04d}/f{index % per_dir:04d}.bin", ids[index % RSS_OBJECTS])
               for index in range(count)]
    write_dir_output(registry, remote_dir, "huge", entries, sum(sizes[i % RSS_OBJECTS] for i in range(count)))


def init_registry(tools: Tools, registry: Registry, servers: dict) -> None:
    """git and dvc init; the remotes `local` (the default), `http` and `s3` (if their servers run)."""
    path, dvc = registry.path, tools.dvc
    path.mkdir()
    registry.remote_dir.mkdir()
    tools.run("git", "init", "-q", "-b", "main", cwd=path)
    tools.run(dvc, "init", "-q", cwd=path)
    tools.run(dvc, "remote", "add", "-d", "local", registry.remote_dir, cwd=path)
    if "http" in servers:
        tools.run(dvc, "remote", "add", "http", servers["http"].url, cwd=path)
    if "s3" in servers:
        tools.run(dvc, "remote", "add", "s3", f"s3://{S3_BUCKET}/store", cwd=path)
        tools.run(dvc, "remote", "modify", "s3", "endpointurl", servers["s3"].url, cwd=path)
    registry.servers = servers


def build_registry(tools: Tools, sizes: Sizes, workloads: set[str], servers: dict) -> Registry:
    """Only the outputs the chosen workloads read; `big-s3.bin` is the big object of the S3 figures."""
    registry = Registry(tools.work / "registry", tools.work / "remote")
    path, dvc = registry.path, tools.dvc
    init_registry(tools, registry, servers)
    rng = random.Random(42)
    added, bigs = [], {}
    if workloads & {"warm-seq", "first-read", "cold-read", "cold-stream", "ttfb-stream"}:
        bigs = {"big.bin": sizes.big, **({"big-s3.bin": sizes.s3_big} if "s3" in servers else {})}
    for name, size in bigs.items():
        write_random(path / name, size, rng)
        added.append(name)
    if "small-files" in workloads:
        small_tree(path / "small", sizes.small_files, 1)
        added.append("small")
    if "cold-copy" in workloads:
        small_tree(path / "copy", sizes.copy_files, 2)
        added.append("copy")
    if added:
        log(f"dvc add {' '.join(added)}; dvc push -r local")
        tools.run(dvc, "add", "-q", *added, cwd=path)
        tools.run(dvc, "push", "-q", "-r", "local", *[f"{name}.dvc" for name in added], cwd=path)
    if "ls-100k" in workloads:
        log(f"writing list/ ({sizes.list_entries} entries, each its own object)")
        build_listing(path, registry.remote_dir, tools.work / "native-list", sizes.list_entries)
    if "rss-1m" in workloads:
        log(f"writing huge/ ({sizes.rss_entries} entries)")
        build_huge(path, registry.remote_dir, sizes.rss_entries, sizes.rss_dirs)
    tools.run("git", "add", "-A", cwd=path)
    tools.run("git", "commit", "-q", "-m", "benchmark registry", cwd=path)
    cold = [f"{name}.dvc" for name in ("big-s3.bin", "copy") if name in added]
    if "s3" in servers and cold and workloads & set(COLD):
        log(f"dvc push -r s3 {' '.join(cold)}")
        tools.run(dvc, "push", "-q", "-r", "s3", *cold, cwd=path)
    for name, size in bigs.items():
        relpath = object_relpath(_dvc_md5(path / f"{name}.dvc"))
        big = BigObject(name, size, relpath, registry.remote_dir / relpath)
        for remote in (["s3"] if name == "big-s3.bin" else ["local", "http"]):
            registry.big_objects[remote] = big
    shutil.rmtree(path / ".dvc" / "cache", ignore_errors=True)  # regfs and dvc pull start from remotes
    return registry


def _dvc_md5(dvc_file: Path) -> str:
    match = re.search(r"md5: ([0-9a-f]{32})", dvc_file.read_text())
    if match is None:
        raise BenchError(f"no md5 in {dvc_file}")
    return match.group(1)


# -- mounts -----------------------------------------------------------------------------------------


@dataclass
class Mount:
    path: Path
    pid: int
    log: Path
    tools: Tools

    def stats(self) -> dict:
        return json.loads(self.tools.regfs_cli("stats", "--json", self.path).stdout)

    def unsupported_reason(self) -> str | None:
        """The daemon log's line saying what this build does not support, if any."""
        for line in self.log.read_text(errors="replace").splitlines():
            if UNSUPPORTED.search(line):
                return line.split(": ", 2)[-1][:200]
        return None


_mount_numbers = iter(range(1_000_000))


@contextlib.contextmanager
def mounted(tools: Tools, registry: Registry, cache: Path, remote: str | None = None, options: tuple = ()):
    number = next(_mount_numbers)
    mountpoint, log_file = tools.work / "mnt" / str(number), tools.work / "logs" / f"mount-{number}.log"
    mountpoint.mkdir(parents=True)
    log_file.parent.mkdir(exist_ok=True)
    args = ["mount", f"{registry.path}@main", mountpoint, "--cache-dir", cache, "--log-file", log_file,
            *options]
    if remote is not None:
        args += ["--remote", remote]
    done = tools.regfs_cli(*args, check=False)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        if UNSUPPORTED.search(message):
            raise Unsupported(message)
        raise BenchError(f"regfs mount failed: {message}")
    pid = None
    try:
        pid = daemon_pid(tools, mountpoint)
        yield Mount(mountpoint, pid, log_file, tools)
    finally:
        unmount(tools, mountpoint, pid)


def daemon_pid(tools: Tools, mountpoint: Path) -> int:
    for record in json.loads(tools.regfs_cli("status", "--json").stdout):
        if record["mountpoint"] == str(mountpoint):
            return record["pid"]
    raise BenchError(f"no regfs daemon serves {mountpoint}")


def unmount(tools: Tools, mountpoint: Path, pid: int | None) -> None:
    """`regfs umount`; if that fails, a lazy unmount and the end of the daemon this script started."""
    done = tools.regfs_cli("umount", mountpoint, check=False)
    if done.returncode != 0:
        log(f"regfs umount {mountpoint} failed ({done.stderr.strip()}); lazy unmount, SIGTERM to pid {pid}")
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)
        if pid is not None:
            end_daemon(pid)


def end_daemon(pid: int) -> None:
    """SIGTERM to a mount daemon this script started, SIGKILL if it is still there 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
    log(f"the daemon {pid} did not exit after SIGKILL")


# -- measuring --------------------------------------------------------------------------------------


class PageCache:
    """Drops the page cache before cold figures: `echo 3 > /proc/sys/vm/drop_caches` (root), else
    posix_fadvise(DONTNEED) on the files about to be read. `method` says which one was used."""

    def __init__(self):
        self.method = "drop_caches"
        try:
            self._drop_all()
        except OSError:
            self.method = "posix_fadvise(DONTNEED)"

    @staticmethod
    def _drop_all() -> None:
        os.sync()  # dirty pages are not dropped: write them first
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")

    def drop(self, *paths: Path) -> None:
        if self.method == "drop_caches":
            self._drop_all()
            return
        for path in paths:
            for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
                fd = os.open(file, os.O_RDONLY)
                try:
                    with contextlib.suppress(OSError):  # a FUSE file may not implement fsync
                        os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


@dataclass
class Read:
    size: int
    seconds: float
    first_byte_s: float

    @property
    def mib_s(self) -> float:
        return self.size / MIB / self.seconds


def read_file(path: Path, buffer: bytearray) -> Read:
    """Reads the whole file sequentially; times the open to the last byte, and to the first."""
    started = time.perf_counter()
    first, total = None, 0
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            if first is None:
                first = time.perf_counter() - started
            total += count
    seconds = time.perf_counter() - started
    return Read(total, seconds, first if first is not None else seconds)


def read_files(paths: list[str], start, results) -> None:
    """A reader process of small-files: waits for `start`, reads every file whole, reports its bytes
    (or the error that stopped it)."""
    buffer, total = bytearray(64 << 10), 0
    start.wait()
    try:
        for path in paths:
            with open(path, "rb", buffering=0) as file:
                while count := file.readinto(buffer):
                    total += count
    except OSError as exc:
        results.put(f"{exc}")
        return
    results.put(total)


def files_per_second(paths: list[str], expected_bytes: int, readers: int = 2) -> float:
    """Files per second of `readers` processes reading every other file of `paths`; checks that
    they read `expected_bytes` in all."""
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=read_files, args=(paths[index::readers], start, results))
                 for index in range(readers)]
    for process in processes:
        process.start()
    time.sleep(0.2)  # let them reach the start line
    started = time.perf_counter()
    start.set()
    totals = [results.get(timeout=1800) for _ in processes]
    seconds = time.perf_counter() - started
    for process in processes:
        process.join(timeout=30)
    errors = [total for total in totals if isinstance(total, str)]
    if errors:
        raise BenchError(f"a reader failed: {errors[0]}")
    if sum(totals) != expected_bytes:
        raise BenchError(f"the readers read {sum(totals)} bytes, the files hold {expected_bytes}")
    return len(paths) / seconds


def timed(*command, **kwargs) -> float:
    started = time.perf_counter()
    done = subprocess.run([os.fspath(arg) for arg in command], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, **kwargs)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace")[-500:]
        raise BenchError(f"{' '.join(map(str, command))} failed: {reason}")
    return seconds


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


# -- results ----------------------------------------------------------------------------------------


@dataclass
class Target:
    text: str
    ratio_min: float | None = None
    ratio_max: float | None = None
    value_min: float | None = None
    value_max: float | None = None

    def met(self, ratio: float | None, value: float | None) -> bool | None:
        checks = []
        if self.ratio_min is not None or self.ratio_max is not None:
            if ratio is None:
                return None
            checks += [self.ratio_min is None or ratio >= self.ratio_min,
                       self.ratio_max is None or ratio <= self.ratio_max]
        if self.value_min is not None or self.value_max is not None:
            if value is None:
                return None
            checks += [self.value_min is None or value >= self.value_min,
                       self.value_max is None or value < self.value_max]
        return all(checks) if checks else None


TARGETS = {
    "warm-seq": Target(">= 0.9x", ratio_min=0.9),
    "first-read": Target(">= 0.5x", ratio_min=0.5),
    "small-files": Target(">= 0.5x, >= 40k/s", ratio_min=0.5, value_min=40_000),
    "cold-copy": Target("<= 0.5x time", ratio_max=0.5),
    "cold-read": Target(">= 0.8x", ratio_min=0.8),
    "cold-stream": Target(">= 0.8x", ratio_min=0.8),
    "ttfb-stream": Target("< 50 ms", value_max=50),
    "ttfb-default": Target("(info)"),
    "ls-100k": Target("< 1 s", value_max=1.0),
    "rss-1m": Target("< 300 MB", value_max=300),
}


@dataclass
class Row:
    workload: str
    remote: str
    unit: str
    baseline_name: str
    baselines: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    gets: list[int] = field(default_factory=list)
    baseline_gets: list[int] = field(default_factory=list)
    fetched_over_read: list[float] = field(default_factory=list)
    status: str = "measured"  # or "unsupported by this build: ...", "failed: ...", "unavailable: ..."
    note: str = ""
    requests: dict | None = None  # per method, of the last regfs run, as the server saw them

    def add(self, baseline: float | None, value: float) -> None:
        """One repeat: the ratio is regfs / baseline, whatever the unit (a time or a rate)."""
        self.values.append(value)
        if baseline is not None:
            self.baselines.append(baseline)
            self.ratios.append(value / baseline)

    def traffic(self, gets: int | None, fetched: int | None, read: int,
                baseline_gets: int | None = None) -> None:
        if gets is not None:
            self.gets.append(gets)
        if baseline_gets is not None:
            self.baseline_gets.append(baseline_gets)
        if fetched is not None and read:
            self.fetched_over_read.append(fetched / read)

    def summary(self) -> dict:
        def median(values: list) -> float | None:
            return statistics.median(values) if values else None

        ratio, value = median(self.ratios), median(self.values)
        measured = self.status == "measured" and bool(self.values)
        return {"workload": self.workload, "remote": self.remote, "unit": self.unit,
                "baseline_name": self.baseline_name, "baseline": median(self.baselines), "regfs": value,
                "ratio": ratio, "target": TARGETS[self.workload].text,
                "met": TARGETS[self.workload].met(ratio, value) if measured else None,
                "gets": median(self.gets), "baseline_gets": median(self.baseline_gets),
                "fetched_over_read": median(self.fetched_over_read), "status": self.status, "note": self.note,
                "requests_last_run": self.requests,
                "repeats": len(self.values), "samples": {"baseline": self.baselines, "regfs": self.values,
                                                         "ratio": self.ratios}}


# -- workloads --------------------------------------------------------------------------------------


@dataclass
class Bench:
    tools: Tools
    registry: Registry
    sizes: Sizes
    repeat: int
    budget: float
    page_cache: PageCache
    rows: list[Row] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.tools.work

    def row(self, workload: str, remote: str, unit: str, baseline_name: str) -> Row:
        row = Row(workload, remote, unit, baseline_name)
        self.rows.append(row)
        return row

    def runs(self, *rows: Row) -> Iterator[int]:
        """Up to --repeat runs, fewer when the next one would end past --budget seconds (one at least)."""
        started = time.monotonic()
        for index in range(self.repeat):
            elapsed = time.monotonic() - started
            if index and elapsed * (index + 1) / index > self.budget:
                for row in rows:
                    row.note += f"; {index} of {self.repeat} runs (--budget {self.budget:.0f} s)"
                return
            yield index

    def fresh_cache(self, name: str) -> Path:
        cache = self.work / "caches" / name
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        return cache

    def traffic_mark(self, remote: str) -> int | None:
        server = self.registry.servers.get(remote)
        return server.log.mark() if server else None

    def traffic(self, remote: str, mark: int | None,
                mount: Mount | None = None) -> tuple[int | None, int | None, dict | None]:
        """GETs, fetched bytes and requests per method since `mark`: the server's log, else (local
        remote) the mount's stats, which count objects fetched and no requests."""
        server = self.registry.servers.get(remote)
        if server is not None and mark is not None:
            seen = server.log.since(mark)
            return seen["gets"], seen["bytes"], seen["requests"]
        if mount is not None:
            stats = mount.stats()
            return stats["objects_fetched"], stats["bytes_fetched"], None
        return None, None, None


def guarded(row: Row, action) -> None:
    """Runs one row's measurements; what this build lacks or what fails becomes the row's status."""
    try:
        action()
    except Unsupported as exc:
        row.status = f"unsupported by this build: {exc}"
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        lines = str(exc).strip().splitlines()
        row.status = f"failed: {lines[0][:200] if lines else type(exc).__name__}"
    log(f"{row.workload} {row.remote}: {row.status}"
        + (f", regfs {row.values} vs baseline {row.baselines}" if row.values else ""))


def failing_read(mount: Mount, action):
    """`action()`, turning a read error caused by a missing feature of this build into Unsupported."""
    try:
        return action()
    except (OSError, BenchError) as exc:
        reason = mount.unsupported_reason()
        if reason:
            raise Unsupported(reason) from exc
        raise


def warm_big(bench: Bench, workloads: set[str]) -> None:
    """warm-seq and first-read: the big object in a warm cache, local remote, one mount."""
    seq = bench.row("warm-seq", "local", "MiB/s", "native read, cached file") \
        if "warm-seq" in workloads else None
    first = bench.row("first-read", "local", "MiB/s", "native read, page cache dropped") \
        if "first-read" in workloads else None
    buffer = bytearray(READ_BUFFER)
    cache = bench.work / "caches" / "warm"
    cache.mkdir(parents=True, exist_ok=True)

    def measure() -> None:
        with mounted(bench.tools, bench.registry, cache) as mount:
            path, cached = mount.path / "big.bin", cache / bench.registry.big().relpath
            read_file(path, buffer)  # brings the object into the cache (the cold figures measure that)
            for index in bench.runs(*filter(None, (seq, first))):
                if seq is not None:
                    read_file(cached, buffer)
                    native = read_file(cached, buffer)
                    read_file(path, buffer)
                    seq.add(native.mib_s, read_file(path, buffer).mib_s)
                if first is not None:
                    bench.page_cache.drop(cached)
                    native = read_file(cached, buffer)
                    bench.page_cache.drop(cached, path)
                    first.add(native.mib_s, read_file(path, buffer).mib_s)
                log(f"warm big object: repeat {index + 1}/{bench.repeat} done")

    for row in filter(None, (seq, first)):
        row.note = f"{bench.sizes.big // MIB} MiB; page cache: {bench.page_cache.method}"
    guarded(seq or first, measure)
    if seq is not None and first is not None:
        first.status = seq.status


def small_files(bench: Bench) -> None:
    row = bench.row("small-files", "local", "files/s", "native files, same order")
    native_root = bench.registry.path / "small"
    relpaths = sorted(str(path.relative_to(native_root)) for path in native_root.rglob("*.bin"))
    size = sum((native_root / relpath).stat().st_size for relpath in relpaths)
    row.note = f"{len(relpaths)} files, 2 reader processes, warm"

    def measure() -> None:
        with mounted(bench.tools, bench.registry, bench.work / "caches" / "warm") as mount:
            native = [str(native_root / relpath) for relpath in relpaths]
            through = [str(mount.path / "small" / relpath) for relpath in relpaths]
            files_per_second(native, size)
            files_per_second(through, size)  # fetches into the cache on the first pass
            for index in bench.runs(row):
                order = list(range(len(relpaths)))
                random.Random(index).shuffle(order)
                row.add(files_per_second([native[i] for i in order], size),
                        files_per_second([through[i] for i in order], size))

    guarded(row, measure)


def cold_copy(bench: Bench, remote: str) -> None:
    row = bench.row("cold-copy", remote, "s", "dvc pull, same remote")
    clone, out = bench.work / "clone", bench.work / "copy-out"
    source = bench.registry.path / "copy"
    files = [path for path in source.rglob("*") if path.is_file()]
    read_bytes = sum(path.stat().st_size for path in files)
    objects = [bench.registry.remote_dir / object_relpath(hashlib.md5(path.read_bytes()).hexdigest())
               for path in files]
    row.note = f"{bench.sizes.copy_files} files, {read_bytes / MIB:.0f} MiB"
    if not clone.exists():
        bench.tools.run("git", "clone", "-q", bench.registry.path, clone)

    def dvc_pull() -> tuple[float, int | None]:
        for path in (clone / ".dvc" / "cache", clone / ".dvc" / "tmp", clone / "copy"):
            shutil.rmtree(path, ignore_errors=True)
        site = bench.work / "dvc-site-cache"
        shutil.rmtree(site, ignore_errors=True)
        bench.page_cache.drop(*objects)
        mark = bench.traffic_mark(remote)
        seconds = timed(bench.tools.dvc, "pull", "-q", "-r", remote, "copy.dvc", cwd=clone,
                        env={**bench.tools.env, "DVC_SITE_CACHE_DIR": str(site)})
        return seconds, bench.traffic(remote, mark)[0]

    def measure() -> None:
        for _ in bench.runs(row):
            baseline, baseline_gets = dvc_pull()
            shutil.rmtree(out, ignore_errors=True)
            with mounted(bench.tools, bench.registry, bench.fresh_cache("cold"), remote) as mount:
                bench.page_cache.drop(*objects)
                mark = bench.traffic_mark(remote)
                seconds = failing_read(mount, lambda: timed("cp", "-r", mount.path / "copy", out))
                gets, fetched, row.requests = bench.traffic(remote, mark, mount)
            row.add(baseline, seconds)
            row.traffic(gets, fetched, read_bytes, baseline_gets)
            shutil.rmtree(out, ignore_errors=True)

    guarded(row, measure)


def plain_get(bench: Bench, remote: str, out: Path) -> float:
    """One whole-object GET with a plain client, into a file: cp (local), curl (http), s3fs (s3)."""
    big = bench.registry.big(remote)
    relpath = big.relpath
    if remote == "local":
        return timed("cp", "--reflink=never", big.local_path, out)
    if remote == "http":
        return timed("curl", "-sS", "-f", "-o", out, f"{bench.registry.servers['http'].url}/{relpath}")
    import s3fs

    fs = s3fs.S3FileSystem(key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": bench.registry.servers["s3"].url,
                                          "region_name": "us-east-1"}, skip_instance_cache=True)
    started = time.perf_counter()
    fs.get_file(f"{S3_BUCKET}/store/{relpath}", str(out))
    return time.perf_counter() - started


def plain_first_byte(bench: Bench, remote: str) -> float:
    """Seconds for one plain GET of the object's first byte, its connection included (the client
    library is loaded and set up before the clock starts)."""
    big = bench.registry.big(remote)
    if remote == "local":
        started = time.perf_counter()
        with open(big.local_path, "rb", buffering=0) as file:
            file.read(1)
    elif remote == "http":
        connection = http.client.HTTPConnection("127.0.0.1", bench.registry.servers["http"].port, timeout=30)
        started = time.perf_counter()
        connection.request("GET", "/" + big.relpath, headers={"Range": "bytes=0-0"})
        connection.getresponse().read()
        connection.close()
    else:
        import boto3

        client = boto3.client("s3", endpoint_url=bench.registry.servers["s3"].url, region_name="us-east-1",
                              aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
        started = time.perf_counter()
        client.get_object(Bucket=S3_BUCKET, Key=f"store/{big.relpath}", Range="bytes=0-0")["Body"].read()
    return time.perf_counter() - started


PLAIN_GETS = {"local": "cp of the remote file", "http": "curl GET", "s3": "s3fs get_file"}


def cold_read(bench: Bench, remote: str) -> None:
    """cold-read, and the time to first byte of the same reads (the engine without --stream)."""
    row = bench.row("cold-read", remote, "MiB/s", PLAIN_GETS[remote])
    ttfb = bench.row("ttfb-default", remote, "ms", "plain GET of 1 byte")
    ttfb.note = "first byte of the cold-read reads (no --stream)"
    guarded(row, lambda: cold_reads(bench, remote, row, (), ttfb))
    ttfb.status = row.status


def cold_stream(bench: Bench, remote: str) -> None:
    """cold-stream: cold-read on a `--stream` mount (bytes served as the parts arrive, the hash
    checked at the end: the read may end before the check; the traffic is counted after it)."""
    row = bench.row("cold-stream", remote, "MiB/s", PLAIN_GETS[remote])
    guarded(row, lambda: cold_reads(bench, remote, row, ("--stream",)))


def cold_reads(bench: Bench, remote: str, row: Row, options: tuple, ttfb: Row | None = None) -> None:
    """The runs of a 1st read of the big object through a fresh mount with `options` and an empty
    cache, each next to a plain GET of it (and, for `ttfb`, next to a plain GET of 1 byte)."""
    big = bench.registry.big(remote)
    row.note = f"{big.size // MIB} MiB object, empty cache; page cache: {bench.page_cache.method}"
    buffer, out = bytearray(READ_BUFFER), bench.work / "get-out"
    for _ in bench.runs(*filter(None, (row, ttfb))):
        bench.page_cache.drop(big.local_path)
        mark = bench.traffic_mark(remote)
        baseline = big.size / MIB / plain_get(bench, remote, out)
        baseline_gets = bench.traffic(remote, mark)[0]
        out.unlink()
        first_byte = plain_first_byte(bench, remote) * 1000 if ttfb is not None else None
        with mounted(bench.tools, bench.registry, bench.fresh_cache("cold"), remote, options) as mount:
            bench.page_cache.drop(big.local_path)
            mark = bench.traffic_mark(remote)
            read = failing_read(mount, lambda: read_file(mount.path / big.name, buffer))
            if "--stream" in options:
                verified(mount)
            gets, fetched, row.requests = bench.traffic(remote, mark, mount)
        row.add(baseline, read.mib_s)
        row.traffic(gets, fetched, read.size, baseline_gets)
        if ttfb is not None:
            ttfb.add(first_byte, read.first_byte_s * 1000)
        log(f"{row.workload} {remote}: {read.mib_s:.0f} MiB/s vs {baseline:.0f} MiB/s")


def verified(mount: Mount) -> None:
    """Until the download ends: a streamed read may end before the hash is checked, and the
    mount's statistics (the local remote's traffic) count an object once it is."""
    deadline = time.monotonic() + 300
    while not mount.stats()["objects_fetched"] and time.monotonic() < deadline:
        time.sleep(0.1)


def ttfb_stream(bench: Bench, remote: str) -> None:
    """The first byte of the uncached big object on a `--stream` mount; then the rest of it, read
    on through the same descriptor, for its GETs and fetched/read bytes (the throughput of that
    streamed read is in the notes)."""
    row = bench.row("ttfb-stream", remote, "ms", "plain GET of 1 byte")
    big = bench.registry.big(remote)
    row.note = f"{big.size // MIB} MiB object, empty cache, mount --stream"
    buffer, rates = bytearray(READ_BUFFER), []

    def streamed_read(mount: Mount) -> Read:
        started = time.perf_counter()
        with open(mount.path / big.name, "rb", buffering=0) as file:
            total = file.readinto(memoryview(buffer)[:1])
            first = time.perf_counter() - started
            while count := file.readinto(buffer):
                total += count
        return Read(total, time.perf_counter() - started, first)

    def measure() -> None:
        for _ in bench.runs(row):
            bench.page_cache.drop(big.local_path)
            baseline = plain_first_byte(bench, remote) * 1000
            cache = bench.fresh_cache("cold")
            with mounted(bench.tools, bench.registry, cache, remote, ("--stream",)) as mount:
                bench.page_cache.drop(big.local_path)
                mark = bench.traffic_mark(remote)
                read = failing_read(mount, lambda: streamed_read(mount))
                verified(mount)
                gets, fetched, row.requests = bench.traffic(remote, mark, mount)
            row.add(baseline, read.first_byte_s * 1000)
            row.traffic(gets, fetched, read.size)
            rates.append(read.mib_s)
            log(f"ttfb-stream {remote}: {read.first_byte_s * 1000:.1f} ms vs {baseline:.1f} ms; "
                f"whole read {read.mib_s:.0f} MiB/s")
        row.note += f"; the whole streamed read: {statistics.median(rates):.0f} MiB/s"

    guarded(row, measure)


def listing(bench: Bench) -> None:
    row = bench.row("ls-100k", "local", "s", "ls -l of the tree on local disk")
    row.note = f"{bench.sizes.list_entries} entries in one directory, fresh mount, manifest and sizes cached"
    cache, native = bench.work / "caches" / "list", bench.work / "native-list"
    cache.mkdir(parents=True, exist_ok=True)

    def measure() -> None:
        with mounted(bench.tools, bench.registry, cache) as mount:
            os.stat(mount.path / "list" / "e0000000.txt")  # fetches the manifest, learns every size
        timed("ls", "-l", native)
        again = []
        for _ in bench.runs(row):
            baseline = timed("ls", "-l", native)
            with mounted(bench.tools, bench.registry, cache) as mount:
                row.add(baseline, timed("ls", "-l", mount.path / "list"))
                again.append(timed("ls", "-l", mount.path / "list"))
        row.note += (f"; a 2nd ls -l on the same mount (manifest parsed, sizes known): "
                     f"{statistics.median(again):.3f} s")

    guarded(row, measure)


def huge_listing(bench: Bench) -> None:
    row = bench.row("rss-1m", "local", "MB", "-")

    def measure() -> None:
        with mounted(bench.tools, bench.registry, bench.fresh_cache("huge")) as mount:
            started = time.perf_counter()
            top = mount.path / "huge"
            names = sum(len(os.listdir(top / name)) for name in os.listdir(top))
            seconds = time.perf_counter() - started
            row.add(None, peak_rss_mb(mount.pid))
        if names != bench.sizes.rss_entries:
            raise BenchError(f"listed {names} entries of huge/, expected {bench.sizes.rss_entries}")
        row.note = (f"{names} entries in {bench.sizes.rss_dirs} dirs, {RSS_OBJECTS} distinct objects; VmHWM "
                    f"after reading every directory of it ({seconds:.1f} s, manifest not cached); one run")

    guarded(row, measure)


# -- the report -------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(memory / (1 << 20), 1),
            "kernel": platform.release(), "load_average_start": os.getloadavg()}


def versions(tools: Tools) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    probe = tools.run(sys.executable, "-c", "import regfs; print(regfs.__version__, regfs.__file__)").stdout
    regfs_version, regfs_file = probe.split()
    source = os.path.dirname(os.path.dirname(regfs_file))
    sha = tools.run("git", "-C", source, "rev-parse", "HEAD", check=False).stdout.strip() or "?"
    package = os.path.dirname(regfs_file)
    dirty = tools.run("git", "-C", source, "status", "--porcelain", "-uno", "--", package, check=False).stdout
    changes = " + uncommitted changes to regfs/" if dirty.strip() else ""
    found = {"python": platform.python_version(),
             "regfs": f"{regfs_version} ({source}, git {sha[:12]}{changes})"}
    for name in ("mfusepy", "s3fs", "moto", "fsspec"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    found["dvc"] = tools.run(tools.dvc, "--version", check=False).stdout.strip()
    found["libfuse"] = _libfuse_version()
    nginx = find_nginx()
    found["nginx"] = tools.run(nginx, "-v", check=False).stderr.strip().removeprefix("nginx version: ") \
        if nginx else "not installed"
    found["curl"] = " ".join(tools.run("curl", "--version", check=False).stdout.split()[:2])
    return found


def _libfuse_version() -> str:
    ldconfig = shutil.which("ldconfig", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin") or "ldconfig"
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"libfuse3\.so\.3 .*=> (\S+)", listing)
    return os.path.basename(os.path.realpath(match.group(1))) if match else "libfuse3 not found"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "files/s":
        return f"{value:,.0f} files/s"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:,.0f} {unit}"


def table(summaries: list[dict]) -> str:
    header = ["workload", "remote", "baseline", "baseline figure", "regfs figure", "ratio", "target",
              "result", "GETs regfs/base", "fetched/read"]
    lines = [header]
    for row in summaries:
        measured = row["status"] == "measured" and row["regfs"] is not None
        result = {True: "met", False: "MISSED", None: "-"}[row["met"]] if measured \
            else row["status"].split(":")[0]
        gets = "-" if row["gets"] is None else f"{row['gets']:.0f}"
        if row["baseline_gets"] is not None:
            gets += f"/{row['baseline_gets']:.0f}"
        lines.append([row["workload"], row["remote"], row["baseline_name"],
                      fmt(row["baseline"], row["unit"]) if measured else "-",
                      fmt(row["regfs"], row["unit"]) if measured else "-",
                      f"{row['ratio']:.2f}x" if measured and row["ratio"] is not None else "-",
                      row["target"], result, gets,
                      f"{row['fetched_over_read']:.2f}" if row["fetched_over_read"] is not None else "-"])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)


def notes(summaries: list[dict]) -> str:
    lines = []
    for row in summaries:
        requests = row["requests_last_run"]
        requests = "requests of regfs's last run: " + ", ".join(
            f"{method} {count}" for method, count in sorted(requests.items())) if requests else ""
        text = "; ".join(filter(None, [row["note"], requests,
                                       row["status"] if row["status"] != "measured" else ""]))
        if text:
            lines.append(f"  {row['workload']} {row['remote']}: {text}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, help="runs per figure, medians reported (default 3, --quick 1)")
    parser.add_argument("--only", help=f"comma-separated workloads (default all): {','.join(WORKLOADS)}")
    parser.add_argument("--remotes", default=",".join(REMOTES),
                        help="remotes of the cold figures (default all)")
    parser.add_argument("--budget", type=float, default=90,
                        help="seconds one figure may take: fewer runs than --repeat past it (default 90)")
    parser.add_argument("--workdir", help="build and keep everything here (default: a temporary directory, "
                                          "removed at the end)")
    parser.add_argument("--json", help="also write every figure and sample to this file")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and one run, a smoke test (about 3 minutes)")
    parser.add_argument("--dvc", default=shutil.which("dvc", path=os.path.dirname(sys.executable))
                        or shutil.which("dvc"), help="the dvc executable (default: next to python)")
    parser.add_argument("--serve-s3", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workloads = set(args.only.split(",")) if args.only else set(WORKLOADS)
    args.remote_list = [name for name in args.remotes.split(",") if name]
    for name in args.workloads - set(WORKLOADS):
        parser.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for name in set(args.remote_list) - set(REMOTES):
        parser.error(f"unknown remote {name!r}; choose from {', '.join(REMOTES)}")
    if not args.dvc and not args.serve_s3:
        parser.error("no dvc executable found; pass --dvc")
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def start_servers(tools: Tools, args, remote_dir: Path) -> tuple[dict, dict]:
    """The servers the cold figures need; returns (running, remote name -> why unavailable)."""
    running, unavailable = {}, {}
    if not args.workloads & set(COLD):
        return running, unavailable
    for name, make in (("http", lambda: Nginx(tools.work, remote_dir)), ("s3", lambda: S3Server(tools.work))):
        if name not in args.remote_list:
            continue
        server = make()
        try:
            server.start()
            running[name] = server
        except BenchError as exc:
            server.stop()
            unavailable[name] = str(exc)
    return running, unavailable


COLD_FUNCTIONS = (("cold-copy", cold_copy), ("cold-read", cold_read), ("cold-stream", cold_stream),
                  ("ttfb-stream", ttfb_stream))


def run(bench: Bench, args, unavailable: dict) -> None:
    workloads = args.workloads
    if workloads & {"warm-seq", "first-read"}:
        warm_big(bench, workloads)
    if "small-files" in workloads:
        small_files(bench)
    for remote in args.remote_list:
        for workload, function in COLD_FUNCTIONS:
            if workload not in workloads:
                continue
            if remote in unavailable:
                bench.row(workload, remote, "-", "-").status = f"unavailable: {unavailable[remote]}"
                continue
            log(f"{workload} on the {remote} remote")
            function(bench, remote)
    if "ls-100k" in workloads:
        listing(bench)
    if "rss-1m" in workloads:
        huge_listing(bench)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_s3:
        serve_s3(int(args.serve_s3[0]), args.serve_s3[1])
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="regfs-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"bench: {work} is not empty")
    try:
        report = measure_all(args, Tools(work, args.dvc))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def measure_all(args, tools: Tools) -> dict:
    """The machine, the versions, and the rows of every workload asked for."""
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    report = {"machine": machine(), "versions": versions(tools), "repeat": args.repeat,
              "sizes": asdict(sizes), "quick": args.quick}
    for key, value in {**report["machine"], **report["versions"]}.items():
        print(f"{key:20} {value}")
    servers: dict = {}
    try:
        servers, unavailable = start_servers(tools, args, tools.work / "remote")
        log(f"building the registry in {tools.work}")
        registry = build_registry(tools, sizes, args.workloads, servers)
        log(f"registry built in {time.monotonic() - started:.0f}s")
        # The build writes gigabytes and a million small files: flushed now, so that the kernel's
        # writeback of them does not slow the first figures (ls-100k took 1.6 s instead of 0.9).
        flushing = time.monotonic()
        os.sync()
        log(f"flushed to disk in {time.monotonic() - flushing:.0f}s")
        bench = Bench(tools, registry, sizes, args.repeat, args.budget, PageCache())
        report["page_cache_drop"] = bench.page_cache.method
        run(bench, args, unavailable)
    finally:
        for server in servers.values():
            server.stop()
    report["machine"]["load_average_end"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started)
    report["rows"] = [row.summary() for row in bench.rows]
    return report


def print_report(report: dict, repeat: int) -> None:
    load = report["machine"]["load_average_start"][0], report["machine"]["load_average_end"][0]
    print(f"\nregfs benchmark: medians of up to {repeat} run(s), ratio = regfs / baseline; "
          f"{report['seconds']} s in all; load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
          "end\n")
    print(table(report["rows"]))
    print("\nnotes:\n" + notes(report["rows"]))


if __name__ == "__main__":
    sys.exit(main())
