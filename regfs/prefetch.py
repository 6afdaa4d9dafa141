"""`regfs prefetch`: make files local before a job reads them (a training epoch's data, say).

Two kinds of target:
- Paths inside a regfs mount. The mount's daemon fetches: it has the remote options and
  credentials the mount was given, and its statistics and its cache see the fetches. This process
  walks the mounted tree itself (a mount's metadata is local: no download) and asks for each file
  by getting its `user.regfs.fetch` attribute, which the daemon answers once the file's object is
  cached (fuse.py, `MountView.fetch`).
- `URL@REV PATH...`: this process opens the revision as `regfs get` does and fetches into the
  cache directory itself, so that a later mount on that cache finds the objects there.

Invariants: files start in the order given (a `--files-from` list keeps its order; a directory is
walked depth first in name order), at most `jobs` at a time; symlinks named are followed, those
met on a walk are not (their targets are in the tree or outside it); a file that fails is reported
with its path and the others still go on; an object is counted as fetched once per run, however
many files share it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from regfs.address import Address, is_local_url, parse_address
from regfs.copy import Progress, clean_path, follow_links
from regfs.daemon import mount_type
from regfs.errors import RegfsError, UsageError

if TYPE_CHECKING:
    from regfs.namespace import MountView

FETCH_XATTR = "user.regfs.fetch"  # the daemon's side: fuse.py
DEFAULT_JOBS = 4
TICK = 0.1  # seconds between redraws of a live progress line while waiting


@dataclass(frozen=True)
class Job:
    path: str
    size: int


class MountedFiles:
    """Files inside regfs mounts, fetched by the mounts' daemons."""

    def join(self, root: str, relpath: str) -> str:
        return os.path.join(root, relpath.lstrip("/"))

    def stat(self, path: str, follow: bool = True) -> tuple[str, int]:
        """Kind and size of the entry at `path` (`follow`: of a symlink's target)."""
        info = os.stat(path) if follow else os.lstat(path)
        return _kind(info.st_mode), info.st_size

    def names(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def fetch(self, path: str) -> dict:
        return json.loads(os.getxattr(path, FETCH_XATTR))

    def reason(self, error: Exception, path: str) -> str:
        if not isinstance(error, OSError):
            return f"unexpected answer from the mount's daemon: {error}"
        if error.errno in (errno.ENODATA, errno.ENOTSUP):
            return "not a file of a regfs mount that can prefetch (mounted by an older regfs?)"
        reason = error.strerror or str(error)
        return f"{reason} (the mount's log names the object and the remote)" if error.errno == errno.EIO \
            else reason


class RevisionFiles:
    """Files of one revision opened by this process (`URL@REV`), fetched into its cache."""

    def __init__(self, view: MountView):
        self._view = view

    def join(self, root: str, relpath: str) -> str:
        return clean_path(f"{root}/{relpath}")

    def stat(self, path: str, follow: bool = True) -> tuple[str, int]:
        attr = self._view.attr(follow_links(self._view, path, follow_last=follow))
        return attr.kind, attr.size

    def names(self, path: str) -> list[str]:
        return self._view.listdir(follow_links(self._view, path))

    def fetch(self, path: str) -> dict:
        return self._view.fetch(follow_links(self._view, path))

    def reason(self, error: Exception, path: str) -> str:
        return str(error).removesuffix(f": {path}")  # the error line names the path already


Files = MountedFiles | RevisionFiles


def run(targets: list[str], files_from: str | None, jobs: int, progress: Progress,
        open_revision: Callable[[Address], MountView], revision_options: list[str]) -> int:
    """Prefetch what `targets` name (or, with `files_from`, what its lines name below the one
    target); returns the exit status: 1 if any file failed."""
    if jobs < 1:
        raise UsageError("-j needs at least 1")
    with contextlib.ExitStack() as stack:
        lines = None
        if files_from is not None:  # opened first: a wrong name fails before any fetch of the registry
            try:
                lines = sys.stdin.buffer if files_from == "-" else stack.enter_context(open(files_from, "rb"))
            except OSError as exc:
                raise UsageError(f"cannot read --files-from {files_from}: {exc.strerror}") from exc
        files, roots = _targets(targets, lines is not None, open_revision, revision_options)
        paths = roots if lines is None else _listed(files, roots[0], lines)
        return _Prefetch(files, jobs, progress).run(paths)


def _targets(targets: list[str], listed: bool, open_revision: Callable[[Address], MountView],
             revision_options: list[str]) -> tuple[Files, list[str]]:
    """Where the files come from, and the paths named: paths in mounts, or paths in URL@REV."""
    if is_local_url(targets[0]) and regfs_mountpoint(targets[0]) is not None:
        for target in targets:
            if regfs_mountpoint(target) is None:
                raise UsageError(f"{target} is not inside a regfs mount")
        if revision_options:
            raise UsageError(f"{', '.join(revision_options)}: for URL@REV only; a mount's daemon fetches "
                             f"with the options it was mounted with")
        if listed and len(targets) != 1:
            raise UsageError("with --files-from, give one directory: the list's paths are relative to it")
        return MountedFiles(), targets
    address = parse_address(targets[0])
    if address.revision is None:
        raise UsageError(f"{targets[0]} is not inside a regfs mount (nor a URL@REV)")
    paths = [clean_path(path) for path in targets[1:]]
    if listed and len(paths) > 1:
        raise UsageError("with --files-from, give at most one PATH: the list's paths are relative to it")
    if not listed and not paths:
        raise UsageError(f"give the paths to prefetch after {targets[0]} ('.' for the whole revision)")
    return RevisionFiles(open_revision(address)), paths or [""]


def regfs_mountpoint(path: str) -> str | None:
    """The regfs mount that `path` (symlinks resolved) is in, if any: the innermost mount wins."""
    current = os.path.realpath(path)
    while True:
        found = mount_type(current)
        if found is not None:
            return current if found == "fuse.regfs" else None
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _listed(files: Files, root: str, lines: Iterable[bytes]) -> Iterator[str]:
    """The paths of a `--files-from` list, below `root`, in its order (blank lines skipped)."""
    for line in lines:
        name = os.fsdecode(line.rstrip(b"\n").removesuffix(b"\r"))
        if name:
            yield files.join(root, name)


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else \
        "link" if stat.S_ISLNK(mode) else "other"


class _Prefetch:
    """One run: this thread walks and queues jobs while `jobs` workers fetch them in queue order."""

    def __init__(self, files: Files, jobs: int, progress: Progress):
        self._files, self._progress = files, progress
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fetched: set[str] = set()  # objects this run downloaded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._work, name=f"regfs-prefetch-{number}", daemon=True)
                         for number in range(jobs)]

    def run(self, paths: Iterable[str]) -> int:
        self._progress.start(0, 0, counting=True)
        for worker in self._workers:
            worker.start()
        try:
            for path in paths:
                for job in self._walk(path):
                    self._progress.add_total(job.size)
                    self._queue.put(job)
                    self._progress.tick()
            self._progress.counted()
            for _ in self._workers:
                self._queue.put(None)
            for worker in self._workers:
                while worker.is_alive():
                    worker.join(TICK)
                    self._progress.tick()
        except KeyboardInterrupt:
            raise RegfsError("interrupted; what was fetched stays cached") from None
        finally:
            self._stop.set()  # workers still running (interrupted) take no new job
            self._progress.finish()
        progress = self._progress
        finished = progress.files + progress.skipped + progress.failed == progress.total_files
        return 0 if finished and not progress.failed else 1  # unfinished: a worker died (its traceback said why)

    def _walk(self, path: str) -> Iterator[Job]:
        """The file at `path`, or the files below it (depth first, by name)."""
        try:
            kind, size = self._files.stat(path)
        except (OSError, RegfsError) as exc:
            self._failed(path, self._files.reason(exc, path))
            return
        if kind != "dir":
            if kind == "file":
                yield Job(path, size)
            else:
                self._failed(path, "not a regular file or a directory")
            return
        stack = [self._children(path)]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            try:  # one entry at a time: an entry whose size is unknown fails alone
                kind, size = self._files.stat(child, follow=False)
            except (OSError, RegfsError) as exc:
                self._failed(child, self._files.reason(exc, child))
                continue
            if kind == "dir":
                stack.append(self._children(child))
            elif kind == "file":
                yield Job(child, size)

    def _children(self, directory: str) -> Iterator[str]:
        try:
            names = self._files.names(directory)
        except (OSError, RegfsError) as exc:
            self._failed(directory, self._files.reason(exc, directory))
            return iter(())
        return iter([self._files.join(directory, name) for name in names])

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                return
            try:
                answer = self._files.fetch(job.path)
            except (OSError, RegfsError, ValueError) as exc:
                self._failed(job.path, self._files.reason(exc, job.path), job.size)
                continue
            with self._lock:
                fresh = not answer["cached"] and answer["object"] not in self._fetched
                if fresh:
                    self._fetched.add(answer["object"])
            if fresh:
                self._progress.file_done(answer["size"])
            else:  # cached before, or by another file of this run with the same object
                self._progress.skip(answer["size"])

    def _failed(self, path: str, reason: str, size: int | None = None) -> None:
        if size is None:  # failed before it was counted: a walk's failure
            self._progress.add_total(0)
        self._progress.fail(size or 0, f"regfs: error: {path}: {reason}")
