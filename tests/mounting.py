"""Drive the regfs command line: real FUSE mounts, always unmounted, daemon logs checked.

A `Mount` starts `python -m regfs mount ...` (which daemonizes and returns once the mount is
ready), and `unmount()` runs `python -m regfs umount`, falls back to `fusermount3 -u -z` if the
mount is still there, and fails if a daemon survived (`umount` must wait for it). The daemon's
log is scanned afterwards: an ERROR line the test did not declare fails the test.

Standard output and error of the CLI go to files, not pipes: a daemon that kept an inherited pipe
open would otherwise hang the test until the daemon exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.registry import PROJECT_ROOT

CLI_TIMEOUT = 180
# A mount older than this is torn down by a watchdog (the daemon is killed, which aborts the
# FUSE connection) so that a hung regfs makes the test fail instead of hanging the suite.
WATCHDOG_SECONDS = 420
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("regfs: error:")]

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_cli(args: list[str | os.PathLike], env: dict[str, str], workdir: Path,
            timeout: float = CLI_TIMEOUT) -> CliResult:
    """`python -m regfs ARGS` from the project root, output captured through files."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = workdir / "cli.out", workdir / "cli.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        completed = subprocess.run(
            [sys.executable, "-m", "regfs", *map(os.fspath, args)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            timeout=timeout,
            check=False,
        )
    return CliResult(
        completed.returncode,
        out_path.read_bytes().decode(errors="replace"),
        err_path.read_bytes().decode(errors="replace"),
    )


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def regfs_processes() -> dict[int, list[str]]:
    """Live (non-zombie) processes whose command line mentions regfs, other than ourselves."""
    own = _ancestors()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in own:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
            with open(f"/proc/{name}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any("regfs" in arg for arg in argv):
            found[int(name)] = argv
    return found


@dataclass
class Outcome:
    data: bytes | None
    errno: int | None


_READER = """
import os, sys
try:
    with open(sys.argv[1], "rb", buffering=0) as file:
        size = int(sys.argv[3])
        data = file.read() if size < 0 else os.pread(file.fileno(), size, int(sys.argv[2]))
except OSError as error:
    print(error.errno)
    sys.exit(3)
sys.stdout.buffer.write(data)
"""


def read_in_child(path: Path, timeout: float, offset: int = 0, size: int = -1) -> Outcome:
    """Read a file (all of it, or `size` bytes at `offset`) in a child process, which is killed if
    it takes longer than `timeout` (a hung FUSE read would otherwise hang the test)."""
    try:
        done = subprocess.run([sys.executable, "-c", _READER, str(path), str(offset), str(size)],
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} hung for more than {timeout} s")
    if done.returncode == 3:
        return Outcome(None, int(done.stdout))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return Outcome(done.stdout, None)


def is_mounted(path: Path) -> bool:
    """True if `path` is a mountpoint, including a FUSE mount whose daemon died (ENOTCONN)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle:
            escaped = line.split(b" ")[4]
            mountpoint = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), escaped)
            if mountpoint == target:
                return True
    return False


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# Every Mount started in this session, for the end-of-session safety net (conftest.py).
STARTED: list[Mount] = []


@dataclass
class Mount:
    """One `regfs mount` of `source` at `path`; use `start()` then `unmount()`."""

    source: str
    path: Path
    cache_dir: Path
    log_file: Path
    env: dict[str, str]
    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    # None: no ERROR line allowed; True: any allowed; a regex: every ERROR line must match it.
    expect_errors: bool | str | None = None
    daemons: dict[int, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    mounted: bool = False
    result: CliResult | None = None
    create_mountpoint: bool = True
    _unmounted: bool = False
    _watchdog: threading.Timer | None = None

    def start(self) -> CliResult:
        """Run `regfs mount`; returns its result whether it succeeded or not."""
        if self.create_mountpoint:
            self.path.mkdir(parents=True, exist_ok=True)
        STARTED.append(self)
        before = regfs_processes()
        was_mounted = is_mounted(self.path)
        result = run_cli(
            ["mount", self.source, self.path, "--cache-dir", self.cache_dir,
             "--log-file", self.log_file, *self.extra_args],
            self.env, self.workdir,
        )
        # The daemon is the new regfs process that names this mountpoint; matching on the path
        # keeps other sessions' daemons (started meanwhile on the same machine) out of it.
        self.daemons = {pid: argv for pid, argv in regfs_processes().items()
                        if pid not in before and os.fspath(self.path) in argv}
        # Ours to unmount: a new mount, or (on an occupied mountpoint) one regfs claims to have made.
        self.mounted = result.returncode == 0 if was_mounted else is_mounted(self.path)
        if self.mounted and result.returncode != 0:
            self.problems.append(f"`regfs mount` failed but left {self.path} mounted: {result}")
        if self.mounted:
            self._watchdog = threading.Timer(WATCHDOG_SECONDS, self._abort)
            self._watchdog.daemon = True
            self._watchdog.start()
        return result

    def _abort(self) -> None:
        self.problems.append(f"mount still up after {WATCHDOG_SECONDS} s: watchdog killed its daemon")
        for pid in self.daemons:
            kill(pid)
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(self.path)], capture_output=True,
                       check=False)

    def unmount(self) -> None:
        """`regfs umount`; records a problem if anything (mount or daemon) is left behind."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._unmounted:
            return
        self._unmounted = True
        if self.daemons and not set(self.daemons) & set(regfs_processes()):
            self.problems.append(f"the daemon of {self.path} died while mounted; log:\n{self.log_tail()}")
        if self.mounted and is_mounted(self.path):
            result = run_cli(["umount", self.path], self.env, self.workdir, timeout=120)
            if result.returncode != 0:
                self.problems.append(f"`regfs umount {self.path}` failed: {result}")
            if is_mounted(self.path):
                self.problems.append(f"still mounted after `regfs umount`: {self.path}")
                subprocess.run(["fusermount3", "-u", "-z", os.fspath(self.path)],
                               capture_output=True, check=False)
        survivors = {pid: argv for pid, argv in regfs_processes().items() if pid in self.daemons}
        if survivors:
            # Evidence for the report: did it exit a little later, or is it stuck?
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and set(survivors) & set(regfs_processes()):
                time.sleep(0.05)
            stuck = set(survivors) & set(regfs_processes())
            later = "and had to be killed 10 s later" if stuck else "(it exited within 10 s)"
            self.problems.append(
                f"daemon still running when `regfs umount` returned {later}: {survivors}")
            for pid in stuck:
                kill(pid)
        self.mounted = False

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def error_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if ERROR_LINE.search(line)]

    def unexpected_errors(self) -> list[str]:
        if self.expect_errors is True:
            return []
        pattern = re.compile(self.expect_errors) if isinstance(self.expect_errors, str) else None
        return [line for line in self.error_lines() if pattern is None or not pattern.search(line)]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # Paths inside the mount.
    def __truediv__(self, relpath: str) -> Path:
        return self.path / relpath
