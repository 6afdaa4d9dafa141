"""The mount daemon's lifecycle: set up, mount, report readiness, refresh refs, unmount cleanly.

`regfs mount` (without -f) starts this same program in the foreground as a detached child with a
readiness pipe, and exits only when the child writes `ready` (exit 0) or an error line (exit 1), so
a successful `regfs mount` always leaves a usable mount. The child gets its arguments in its
environment, not on its command line (see `spawn`). Once mounted, a background thread prepares what
the first requests need (`MountView.warm`). The daemon records its pid per mountpoint so that
`regfs umount` can wait for it to exit. SIGTERM/SIGINT make libfuse leave its loop and unmount;
nothing is left behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from regfs.address import Address, public_url
from regfs.cachectl import Evictor, format_size
from regfs.dvcconfig import MAX_REQUESTS, Config, parse_override
from regfs.errors import RegfsError, UsageError
from regfs.readahead import DEFAULT_FILES as DEFAULT_READAHEAD_FILES

if TYPE_CHECKING:  # imported by the daemon only: `umount` and `status` start faster without them
    from regfs.namespace import MountView

logger = logging.getLogger(__name__)


@dataclass
class MountOptions:
    address: Address
    mountpoint: str
    cache_dir: str
    refresh: float = 60.0
    remote: str | None = None
    remote_config: list[str] = field(default_factory=list)
    log_file: str | None = None
    debug: bool = False
    allow_other: bool = False
    shared_group: bool = False
    cache_size: int | None = None  # bytes; None: no cap
    max_requests: int = MAX_REQUESTS  # requests to remotes in flight at once
    stream: bool = False  # serve large objects' bytes as they arrive, verified at the end
    dir_readahead: int = DEFAULT_READAHEAD_FILES  # entries fetched ahead of an in-order reader, at most


def overrides(remote: str | None, remote_config: list[str]) -> Config:
    """The command line's config level: `--remote` and `--remote-config NAME.KEY=VALUE`."""
    config = Config()
    if remote:
        config.core["remote"] = remote.lower()
    for item in remote_config:
        name, key, value = parse_override(item)
        config.remotes.setdefault(name, {})[key] = value
    return config


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a missing or busy mountpoint; clean a regfs mount whose daemon died."""
    try:
        info = os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):  # a FUSE daemon that died
            raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from exc
        _clean_dead_mount(mountpoint)
        info = os.stat(mountpoint)
    if not os.path.isdir(mountpoint) or info is None:
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is busy: something is already mounted there")


def _clean_dead_mount(mountpoint: str) -> None:
    """A FUSE mount whose daemon is gone answers ENOTCONN ("transport endpoint is not
    connected") until unmounted; if it was a regfs mount and no daemon holds its record, unmount it."""
    if mount_type(mountpoint) != "fuse.regfs" or _daemon_alive(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is a dead FUSE mount (transport endpoint is not "
                         f"connected) that regfs did not make; unmount it with: fusermount3 -u {mountpoint}")
    logger.warning("%s is a regfs mount whose daemon died; unmounting it first", mountpoint)
    unmount(mountpoint, lazy=True)


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted at `mountpoint` (the mount on top), or None."""
    record = _mount_record(mountpoint)
    return record[1] if record else None


def _mount_record(mountpoint: str) -> tuple[str, str] | None:
    """(MAJOR:MINOR, type) of the mount on top at `mountpoint`, per /proc/self/mountinfo; reading
    it never touches the mount itself, so the daemon can ask while its own INIT is pending."""
    target = os.fsencode(os.path.abspath(mountpoint))
    found = None
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:  # the last match is the mount on top
            fields = line.split(b" ")
            path = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), fields[4])
            if path == target:
                fstype = fields[fields.index(b"-", 6) + 1]
                found = fields[2].decode(), fstype.decode(errors="replace")
    return found


def _raise_readahead(mountpoint: str, kib: int) -> None:
    """Give the new mount `kib` of readahead where this process may (root): the kernel takes the
    lower of its backing device's knob and INIT's max_readahead (see fuse.READAHEAD_KIB)."""
    record = _mount_record(mountpoint)
    if record is None:
        return
    knob = f"/sys/class/bdi/{record[0]}/read_ahead_kb"
    try:
        with open(knob, "w") as file:
            file.write(str(kib))
    except OSError as exc:  # not root, or no sysfs: the kernel's 128 KiB stays
        logger.debug("readahead stays at the kernel's default: cannot write %s: %s", knob, exc.strerror)
    else:
        logger.debug("readahead of %s: %d KiB", mountpoint, kib)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", *(["-z"] if lazy else []), mountpoint] if tool else \
        ["umount", *(["-l"] if lazy else []), mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unknown reason"])[-1]
        raise RegfsError(f"cannot unmount {mountpoint}: {reason}")


def _warm(view) -> None:
    """`MountView.warm` in the background: a failure here is met again, and said, by the request
    that needs what failed."""
    started = time.monotonic()
    try:
        view.warm()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the first request meets it again
        logger.debug("could not prepare the default revision ahead of the first request: %s", exc)
        return
    logger.debug("default revision and its remotes ready in %.2fs", time.monotonic() - started)


def pid_file(mountpoint: str) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/regfs-{os.getuid()}"
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]
    return os.path.join(runtime, f"regfs-{key}.pid")


def default_log_file(cache_dir: str, mountpoint: str) -> str:
    name = os.path.realpath(mountpoint).strip("/").replace("/", "_") or "root"
    return os.path.join(cache_dir, "regfs", "logs", f"{name[-100:]}.log")


def serve(options: MountOptions, ready_fd: int | None = None) -> int:
    """Run the daemon in this process until the filesystem is unmounted."""
    from regfs import fuse  # libfuse is loaded only by processes that mount
    from regfs.namespace import MountView
    from regfs.registry import Context, Registry

    report = _Readiness(ready_fd)
    try:
        check_mountpoint(options.mountpoint)
        _hold_pid_file(options)
        context = Context(options.cache_dir, options.shared_group, options.max_requests, options.stream,
                          options.dir_readahead)
        registry = Registry(options.address.url, context,
                            overrides(options.remote, options.remote_config))
        removed = context.cache.remove_stale_downloads()
        if removed:
            logger.info("removed %d temporary files of interrupted downloads", removed)
        registry.update_or_reuse()
        pinned = registry.mirror.resolve(options.address.revision) if options.address.revision else None
        view = MountView(registry, pinned)
    except RegfsError as exc:
        logger.error("%s", exc)
        report.failed(str(exc))
        return 1
    logger.info("mounting %s at %s (cache %s)", options.address.public, options.mountpoint, options.cache_dir)
    stop = threading.Event()
    if pinned is None and options.refresh > 0:
        threading.Thread(target=_refresh_loop, args=(view, options.refresh, stop), daemon=True,
                         name="regfs-refresh").start()
    if options.cache_size is not None:
        logger.info("keeping the cache under %s (LRU eviction)", format_size(options.cache_size))
        Evictor(context.cache, options.cache_size).start(stop)
    try:
        def ready() -> None:  # called from libfuse's INIT, before any other request is served
            _raise_readahead(options.mountpoint, fuse.READAHEAD_KIB)
            report.ready()
            threading.Thread(target=_warm, args=(view,), daemon=True, name="regfs-warm").start()

        fuse.mount(view, options.mountpoint, f"regfs:{registry.public_url}", on_ready=ready,
                   debug=options.debug, allow_other=options.allow_other)
    except RuntimeError as exc:
        # libfuse returns non-zero both when it cannot mount and when a signal ended its loop
        # (after unmounting); only the first is a failure.
        if not report.was_ready:
            logger.error("libfuse could not mount %s (status %s)", options.mountpoint, exc)
    finally:
        stop.set()
    if not report.was_ready:
        report.failed(f"libfuse could not mount {options.mountpoint}; see the daemon log for its reason")
        return 1
    logger.info("unmounted %s", options.mountpoint)
    return 0


def _refresh_loop(view: MountView, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            view.refresh()
        except RegfsError as exc:
            logger.warning("refresh failed, keeping the previous refs: %s", exc)


DAEMON_COMMAND, DAEMON_ARGV = "daemon", "REGFS_DAEMON_ARGV"  # how `spawn` starts a daemon (see there)


def spawn(argv: list[str], options: MountOptions) -> int:
    """Start the daemon detached and wait until it reports the mount ready or failed."""
    log_file = options.log_file or default_log_file(options.cache_dir, options.mountpoint)
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    read_fd, write_fd = os.pipe()
    # The arguments go to the daemon in its environment (readable by its user only), not on its
    # command line, which every user of the machine can read (ps): they may hold credentials
    # (`--remote-config NAME.password=...`, a URL with a token). The command line shows what is
    # mounted where.
    env = {**os.environ, DAEMON_ARGV: json.dumps([*argv, "--foreground", "--ready-fd", str(write_fd)])}
    with open(log_file, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "regfs", DAEMON_COMMAND, options.address.public, options.mountpoint],
            env=env, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace").strip()
    if message == "ready":
        return 0
    if message.startswith("error: "):
        child.wait()
        raise RegfsError(message[len("error: "):])
    status = child.wait()
    raise RegfsError(f"the daemon exited (status {status}) before the mount was ready; see {log_file}")


_pid_fds: list[int] = []  # held open, and flock-ed, until this process exits


def _hold_pid_file(options: MountOptions) -> None:
    """Record this daemon (JSON) and hold an flock on the record for the life of the process.

    The kernel drops the lock only when the process is gone, which is what `regfs umount` waits
    for and how `regfs status` tells live daemons from stale records; a pid alone could be
    reused, and a file removed on the way out comes before the exit.
    """
    fd = os.open(pid_file(options.mountpoint), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"mountpoint {options.mountpoint} is busy: another regfs daemon serves it") from None
    record = {"pid": os.getpid(), "mountpoint": options.mountpoint, "source": public_url(options.address.url),
              "revision": options.address.revision, "cache_dir": options.cache_dir,
              "started": int(time.time())}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    _pid_fds.append(fd)


def _daemon_alive(mountpoint: str) -> bool:
    try:
        fd = os.open(pid_file(mountpoint), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def running_mounts() -> list[dict]:
    """Records of this user's live daemons (stale records of dead ones are removed)."""
    runtime = os.path.dirname(pid_file("/"))
    found = []
    for name in sorted(os.listdir(runtime)):
        if not (name.startswith("regfs-") and name.endswith(".pid")):
            continue
        path = os.path.join(runtime, name)
        with open(path, "rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: the daemon is alive
                try:
                    found.append(json.loads(file.read() or b"{}"))
                except ValueError:
                    logger.warning("unreadable daemon record %s", path)
                continue
        _remove(path)
    return found


def wait_for_exit(mountpoint: str, timeout: float = 30.0) -> None:
    """After an unmount, wait for the daemon that served `mountpoint` to exit."""
    path = pid_file(mountpoint)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegfsError(f"the daemon of {mountpoint} did not exit after unmount") from None
                time.sleep(0.02)
        _remove(path)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Readiness:
    """The write end of the readiness pipe from `spawn`, if any."""

    def __init__(self, fd: int | None):
        self._fd = fd
        self.was_ready = False

    def ready(self) -> None:
        self.was_ready = True
        self._send("ready")

    def failed(self, message: str) -> None:
        self._send(f"error: {message}")

    def _send(self, message: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, message.encode() + b"\n")
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None
