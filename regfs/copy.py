"""Reading one revision without a mount: seekable files, symlinks followed inside the tree, and
copies of files and directories to local disk (`regfs get`, `regfs cat`, the Python API).

Everything here reads through a pinned `MountView`, so it sees exactly the tree the mount shows
and reads through the same cache: an object is downloaded and verified on its first read,
never used unverified.

Invariants:
- A `RegistryFile` never returns bytes past the size the tree gives, and seeking needs no
  download (the size comes from the metafiles or the size index).
- Symlinks are followed only inside the revision: a link that is absolute or climbs above the
  root is a missing file, as it would be for a reader of a checkout moved elsewhere.
- A copy appears at its destination only once complete: it is written under a temporary name
  beside it and renamed into place; a failed copy leaves nothing behind.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from regfs.address import Address
from regfs.dvcconfig import Config
from regfs.errors import NotADirectory, PathNotFound, UsageError

if TYPE_CHECKING:  # the registry machinery is imported when a revision is opened
    from regfs.namespace import FileReader, MountView

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
BUFFER_SIZE = 256 << 10
MAX_LINKS = 40  # as Linux's ELOOP limit for one path resolution
COPY_THREADS = 8


def open_revision(address: Address, cache_dir: str, config: Config | None = None,
                  shared_group: bool = False) -> MountView:
    """A view of one commit of a freshly fetched registry (the default branch without @REV)."""
    from regfs.namespace import MountView
    from regfs.registry import Context, Registry

    registry = Registry(address.url, Context(cache_dir, shared_group), config)
    registry.update()
    return MountView(registry, registry.mirror.resolve(address.revision or "HEAD"))


# -- paths -------------------------------------------------------------------------------------


def clean_path(path) -> str:
    """A path relative to the revision root: `/`, `./` and empty components removed."""
    parts = [part for part in os.fspath(path).replace(os.sep, "/").split("/") if part not in ("", ".")]
    return "/".join(parts)


def follow_links(view: MountView, path: str, follow_last: bool = True) -> str:
    """`path` with every symlink in it (and the last component, if `follow_last`) resolved."""
    path = clean_path(path)
    pending, resolved, hops = path.split("/"), [], 0
    if ".." not in pending:
        try:
            node, _ = view.resolve(path)
            if node.kind != "link" or not follow_last:
                return path  # the common case: no link on the way
        except NotADirectory:
            pass  # perhaps a link to a directory on the way
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if not resolved:
                raise PathNotFound(f"{path} leads above the revision's root")
            resolved.pop()
            continue
        node, _ = view.resolve("/".join([*resolved, name]))
        if node.kind != "link" or (not pending and not follow_last):
            resolved.append(name)
            continue
        hops += 1
        if hops > MAX_LINKS or node.target.startswith("/"):
            raise PathNotFound(f"{path}: symlink {'/'.join([*resolved, name])} -> {node.target} "
                               f"{'loops' if hops > MAX_LINKS else 'leaves the revision'}")
        pending[:0] = node.target.split("/")
    return "/".join(resolved)


# -- files -------------------------------------------------------------------------------------


class RegistryFile(io.RawIOBase):
    """A read-only, seekable raw file over a `FileReader` (reads at offsets, like pread)."""

    def __init__(self, reader: FileReader, size: int, name: str):
        super().__init__()
        self._reader, self._size, self.name = reader, size, name
        self._position = 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self._read(self._size - self._position)

    def _read(self, size: int) -> bytes:
        self._checkClosed()
        size = min(size, self._size - self._position)
        if size <= 0:
            return b""
        data = self._reader.read(size, self._position)
        self._position += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


class BufferedRegistryFile(io.BufferedReader):
    """A buffered `RegistryFile` that tells its `size`, as fsspec's files do."""

    @property
    def size(self) -> int:
        return self.raw.size


def open_file(view: MountView, path: str) -> BufferedRegistryFile:
    """A buffered binary file for the regular file at `path` (symlinks followed)."""
    real_path = follow_links(view, path)
    size = view.attr(real_path).size
    reader = view.open(real_path)  # raises IsADirectory, PathNotFound for what is not a file
    return BufferedRegistryFile(RegistryFile(reader, size, path), BUFFER_SIZE)


def write_to(view: MountView, path: str, stream) -> int:
    """Copy the file at `path` into the binary `stream`; returns the number of bytes."""
    with open_file(view, path) as file:
        return _pump(file, stream.write)


def _pump(file: BufferedRegistryFile, write, advance=None) -> int:
    total = 0
    while chunk := file.read(CHUNK):
        write(chunk)
        total += len(chunk)
        if advance is not None:
            advance(len(chunk))
    return total


# -- copies to local disk ----------------------------------------------------------------------


def destination(path: str, out: str | None, force: bool) -> str:
    """Where `regfs get PATH [-o OUT]` writes, as `dvc get` decides it: OUT, or OUT/<name> if OUT
    is a directory, or ./<name>; an existing destination is an error unless `force`."""
    name = posixpath.basename(clean_path(path)) or "."
    target = name if not out else os.path.join(out, name) if os.path.isdir(out) else out
    if name == "." and not out:
        raise UsageError("give -o OUT to get the whole revision")
    if os.path.lexists(target) and not force:
        raise UsageError(f"{target} already exists: to replace it, run again with --force")
    return target


@dataclass
class _Job:
    path: str  # in the revision, links resolved
    local: str
    is_exec: bool
    size: int


def copy_out(view: MountView, path: str, target: str, progress: Progress | None = None) -> None:
    """Copy the file, symlink or directory at `path` to the local path `target`, replacing what
    is there only once the copy is complete."""
    real_path = follow_links(view, path, follow_last=False)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(target)}.regfs-{secrets.token_hex(4)}")
    progress = progress or Progress(None)
    try:
        jobs = _plan(view, real_path, staging)
        progress.start(len(jobs), sum(job.size for job in jobs))
        _copy_files(view, jobs, progress)
        _replace(staging, target)
    except BaseException:
        _remove(staging)
        raise
    finally:
        progress.finish()


def _plan(view: MountView, path: str, local: str) -> list[_Job]:
    """Make the directories and symlinks under `local`; return the files still to copy."""
    node, _ = view.resolve(path)
    if node.kind == "link":
        os.symlink(node.target, local)
        return []
    if node.kind != "dir":
        return [_Job(path, local, node.is_exec, view.attr(path).size)]
    os.mkdir(local, 0o777)
    jobs = []
    for name in view.listdir(path):
        jobs += _plan(view, f"{path}/{name}" if path else name, os.path.join(local, name))
    return jobs


def _copy_files(view: MountView, jobs: list[_Job], progress: Progress) -> None:
    def copy(job: _Job) -> None:
        fd = os.open(job.local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777 if job.is_exec else 0o666)
        with open(fd, "wb") as out, open_file(view, job.path) as file:
            _pump(file, out.write, progress.advance)
        progress.file_done()

    if len(jobs) <= 1:
        for job in jobs:
            copy(job)
        return
    with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="regfs-get") as pool:
        futures = [pool.submit(copy, job) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # stop at the first failure
            raise


def _replace(staging: str, target: str) -> None:
    if os.path.lexists(target):
        _remove(target)
    os.rename(staging, target)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


class Progress:
    """Counts the files and bytes of a copy or a prefetch and shows them on `stream`.

    On a terminal (`live`) one status line is redrawn at most ten times a second; elsewhere, with
    `every`, a plain line is written when a file is done and `every` seconds have passed since the
    last one; at the end, one summary line.
    `stream=None`: silent. Files already local (`skip`) and failed ones (`fail`) count towards the
    total but not towards the rate, so the ETA is the time the remaining bytes take at the rate
    seen so far. While `counting`, totals still grow (a walk or a list still being read).
    """

    def __init__(self, stream, live: bool = False, label: str = "", verb: str = "",
                 every: float | None = None):
        self._stream, self._live, self._label, self._verb, self._every = stream, live, label, verb, every
        self._lock = threading.Lock()
        self.files = self.bytes = self.total_files = self.total_bytes = 0
        self.skipped = self.skipped_bytes = self.failed = self.failed_bytes = 0
        self.counting = False
        self._started = self._drawn = time.monotonic()

    def start(self, total_files: int, total_bytes: int, counting: bool = False) -> None:
        self.total_files, self.total_bytes, self.counting = total_files, total_bytes, counting
        self._started = self._drawn = time.monotonic()

    def add_total(self, size: int) -> None:
        with self._lock:
            self.total_files += 1
            self.total_bytes += size

    def counted(self) -> None:
        """The totals are final."""
        with self._lock:
            self.counting = False

    def advance(self, size: int) -> None:
        with self._lock:
            self.bytes += size
            self._maybe_draw()

    def file_done(self, size: int = 0) -> None:
        """One more file done, with `size` bytes not yet counted by `advance`."""
        with self._lock:
            self.files += 1
            self.bytes += size
            self._maybe_draw()

    def skip(self, size: int) -> None:
        with self._lock:
            self.skipped += 1
            self.skipped_bytes += size
            self._maybe_draw()

    def fail(self, size: int, message: str) -> None:
        """A file that could not be done; `message` is written on a line of its own."""
        with self._lock:
            self.failed += 1
            self.failed_bytes += size
            if self._stream is not None:
                self._stream.write(f"\r\x1b[K{message}\n" if self._live else message + "\n")
                self._stream.flush()
            self._maybe_draw()

    def tick(self) -> None:
        """Redraw the live line if due, even without news: the rate and ETA move with the clock.
        (Plain lines come only with news, so `every=0` means one line per file.)"""
        if self._live:
            with self._lock:
                self._maybe_draw()

    def _maybe_draw(self) -> None:
        if self._stream is None:
            return
        now = time.monotonic()
        if self._live and now - self._drawn >= 0.1:
            self._stream.write(f"\r{self._status()}\x1b[K")
        elif not self._live and self._every is not None and now - self._drawn >= self._every:
            self._stream.write(self._status() + "\n")
        else:
            return
        self._drawn = now
        self._stream.flush()

    def _status(self) -> str:
        done_bytes = self.bytes + self.skipped_bytes + self.failed_bytes
        more = "+" if self.counting else ""
        status = (f"{self._label}{self.files + self.skipped + self.failed}/{self.total_files}{more} files, "
                  f"{_human(done_bytes)}/{_human(self.total_bytes)}{more}, {self._rate()}")
        if not self.counting and self.bytes and done_bytes < self.total_bytes:
            status += f", ETA {_duration((self.total_bytes - done_bytes) / self._speed())}"
        return status

    def _speed(self) -> float:
        return self.bytes / max(time.monotonic() - self._started, 1e-6)

    def _rate(self) -> str:
        return f"{_human(self._speed())}/s"

    def finish(self) -> None:
        if self._stream is None:
            return
        summary = f"{self._label}{self.files} file{'' if self.files == 1 else 's'}"
        if self._verb:  # a run that may skip and fail: say how many of each, even none
            summary += f" {self._verb}, {self.skipped} already cached, {self.failed} failed"
        summary += f", {_human(self.bytes)} in {time.monotonic() - self._started:.1f}s ({self._rate()})"
        self._stream.write(f"\r{summary}\x1b[K\n" if self._live else summary + "\n")
        self._stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
