"""Serving reads of immutable files: one process-wide table of open cache files (the fd cache).

A file below `@<sha>` never changes, so a read needs no per-open state: the kernel sends reads by
path (regfs answers `open` with ENOSYS, see regfs/fuse.py), and every reader of one object, in any
open, shares one descriptor of its cache file, read with `os.pread`, or `os.preadv` straight into
the FUSE reply buffer (`read_into`): positional, so sharing needs no lock around the read itself.

The kernel says nothing when a file is closed, so "in use" means "read in the last `idle`
seconds": while its descriptor is here, an object is held in the cache (this process's evictor
leaves it alone); descriptors idle for longer are closed by a sweeper thread, which releases them.

Invariants:
- A descriptor is closed only when no read uses it: entries are reference-counted; idle ones are
  closed after `idle` seconds, or sooner, oldest first, beyond `max_open` (busy ones are closed by
  their last user once dropped).
- An object is fetched on the first read that needs it, never at lookup or open, unless a reader
  going through a directory output in order has it fetched ahead (regfs/readahead.py). A fetch that
  failed is remembered for `failure_ttl` seconds, so the kernel's retries of one failed read (a
  readahead, then the read itself) fail alike instead of downloading again.
- A cache file removed between fetch and open (evicted by `regfs cache gc`, or by another daemon)
  is fetched again (`ObjectCache.open`); one already open keeps serving its bytes, as unlinked
  files do.

Streaming (`stream`, the mount's `--stream`): the first read of a large object that is not cached
opens the temporary file of its download (regfs/download.py) and every read waits for its own
range only, not for the whole object. The paths read that way are remembered until the download
ends: if its hash then proves wrong, the failure is remembered as any other, the descriptor is
dropped, and `on_wrong_bytes(paths)` lets the FUSE layer drop the kernel's cached pages of those
paths, so every later read reaches the daemon and fails with EIO.
"""

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from cachetools import LRUCache

from regfs.cache import ObjectCache, ObjectRef
from regfs.download import Download
from regfs.errors import PathNotFound, RegfsError
from regfs.readahead import ReadAhead
from regfs.tree import BlobNode, EntryNode, ImportedFileNode, Node, ObjectNode


class _Descriptor:
    """An open cache file, holding its object in the cache until closed."""

    __slots__ = ("cache", "download", "dropped", "fd", "ref", "used", "users")

    def __init__(self, fd: int, cache: ObjectCache, ref: ObjectRef, download: Download | None = None):
        self.fd, self.cache, self.ref = fd, cache, ref
        self.download = download  # while it streams in: reads wait for their range
        self.users, self.dropped, self.used = 0, False, time.monotonic()

    def close(self) -> None:
        os.close(self.fd)
        self.cache.release(self.ref)


class OpenFiles:
    def __init__(self, max_open: int = 512, idle: float = 5.0, failure_ttl: float = 1.0,
                 blob_bytes: int = 64 << 20, stream: bool = False, readahead: ReadAhead | None = None):
        self._max_open, self._idle, self._failure_ttl = max_open, idle, failure_ttl
        self._stream = stream
        self._readahead = readahead or ReadAhead(0)
        self._streamed_paths: dict[ObjectRef, set[str]] = {}  # paths read of downloads in progress
        self.on_wrong_bytes: Callable[[set[str]], None] | None = None
        self._open: OrderedDict[ObjectRef, _Descriptor] = OrderedDict()
        self._failures: dict[ObjectRef, tuple[float, RegfsError]] = {}
        self._blobs: LRUCache = LRUCache(maxsize=blob_bytes, getsizeof=len)
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None

    def read(self, node: Node, size: int, offset: int, path: str | None = None) -> bytes:
        """`size` bytes at `offset` (fewer at the end); `path` is the one the kernel asked for (it
        may cache them)."""
        node = _regular(node)
        if isinstance(node, BlobNode):
            return self._blob(node)[offset:offset + size]
        with self._reading(node, offset, offset + size, path) as fd:
            return os.pread(fd, size, offset)

    def read_into(self, node: Node, buffer: memoryview, offset: int, path: str | None = None) -> int:
        """`read` into `buffer` (as many bytes as it holds, at most), with no copy in Python: the
        kernel writes an object's bytes straight into it. Returns the count read."""
        node = _regular(node)
        if isinstance(node, BlobNode):
            data = self._blob(node)[offset:offset + len(buffer)]
            buffer[:len(data)] = data
            return len(data)
        with self._reading(node, offset, offset + len(buffer), path) as fd:
            return os.preadv(fd, [buffer], offset)

    @contextlib.contextmanager
    def _reading(self, node: ObjectNode, start: int, end: int, path: str | None) -> Iterator[int]:
        """The descriptor to read bytes `start` to `end` of the object from, once they are there."""
        descriptor = self._acquire(node)
        try:
            if descriptor.download is not None:
                self._wait_streamed(descriptor, start, end, path)
            yield descriptor.fd
        finally:
            self._release(descriptor)

    def in_use(self) -> set[ObjectRef]:
        """Objects with an open cache file here (eviction may still unlink them: reads go on)."""
        with self._lock:
            return set(self._open)

    def close_all(self) -> None:
        with self._lock:
            for descriptor in self._open.values():
                self._drop(descriptor)
            self._open.clear()

    def _blob(self, node: BlobNode) -> bytes:
        with self._lock:
            data = self._blobs.get(node.blob_id)
        if data is None:
            data = node.data()
            with self._lock:
                if len(data) <= self._blobs.maxsize:
                    self._blobs[node.blob_id] = data
        return data

    def _acquire(self, node: ObjectNode) -> _Descriptor:
        ref = node.ref
        with self._lock:
            descriptor = self._open.get(ref)
            if descriptor is not None:
                self._open.move_to_end(ref)
                descriptor.users += 1
                descriptor.used = time.monotonic()
        if descriptor is not None:
            descriptor.cache.usage.touch(ref.relpath)  # recency for eviction, as a cache lookup
            return descriptor
        with self._lock:
            failed = self._failures.get(ref)
            if failed is not None:
                if time.monotonic() - failed[0] < self._failure_ttl:
                    raise failed[1]
                del self._failures[ref]
        if isinstance(node, EntryNode):  # before its own fetch: the ones after it start meanwhile
            self._readahead.opened(node.entries, node.index, node.store.cache.size(ref) is not None)
        try:
            fresh = self._open_object(node)
        except RegfsError as exc:
            with self._lock:
                self._failures[ref] = (time.monotonic(), exc)
            raise
        with self._lock:
            descriptor = self._open.get(ref)
            if descriptor is None:  # else another reader opened it meanwhile: use theirs
                descriptor = self._open[ref] = fresh
                fresh = None
                self._trim()
                self._start_sweeper()
            descriptor.users += 1
        if fresh is not None:
            fresh.close()
        return descriptor

    def _open_object(self, node: ObjectNode) -> _Descriptor:
        store, ref, size = node.store, node.ref, node.known_size
        store.cache.hold(ref)  # before the lookup: an eviction after it cannot pick the object
        try:
            descriptor = self._open_streamed(node) if self._stream and size else None
            if descriptor is not None:
                return descriptor
            if size == 0:  # its bytes are known: no remote needed
                fd = os.open(store.path_of_empty(ref), os.O_RDONLY)
            else:
                fd = store.cache.open(ref, lambda: store.path(ref, size))
        except BaseException:
            store.cache.release(ref)
            raise
        return _Descriptor(fd, store.cache, ref)

    def _open_streamed(self, node: ObjectNode) -> _Descriptor | None:
        """A descriptor of the download in progress of a large object, or None (cached, small,
        cached meanwhile by another process, or not to be streamed)."""
        download = node.store.stream(node.ref, node.known_size)
        fd = download.reader() if download is not None else None
        if fd is None:
            return None
        with self._lock:
            if node.ref not in self._streamed_paths and download.when_finished(
                    lambda error: self._streamed(download, error)):
                self._streamed_paths[node.ref] = set()
        return _Descriptor(fd, node.store.cache, node.ref, download)

    def _wait_streamed(self, descriptor: _Descriptor, start: int, end: int, path: str | None) -> None:
        with self._lock:  # before the wait: a failure after it finds the path (see `_streamed`)
            paths = self._streamed_paths.get(descriptor.ref)
            if paths is not None and path is not None:
                paths.add(path)
        try:
            descriptor.download.wait_for(start, end)
        except RegfsError as exc:
            with self._lock:
                self._forget_streamed(descriptor.download, exc)
            raise

    def _streamed(self, download: Download, error: BaseException | None) -> None:
        """The end of a download that readers read while it ran (in a thread of its own): after a
        failure, its unverified bytes must leave the kernel's page cache too."""
        with self._lock:
            paths = self._streamed_paths.pop(download.ref, set())
            if error is None:
                return
            self._forget_streamed(download, error)
        if paths and self.on_wrong_bytes is not None:
            self.on_wrong_bytes(paths)

    def _forget_streamed(self, download: Download, error: BaseException) -> None:
        """Remember the failure and drop the descriptor of the failed download (lock held)."""
        ref = download.ref
        if isinstance(error, RegfsError):
            self._failures[ref] = (time.monotonic(), error)
        descriptor = self._open.get(ref)
        if descriptor is not None and descriptor.download is download:
            del self._open[ref]
            self._drop(descriptor)

    def _release(self, descriptor: _Descriptor) -> None:
        with self._lock:
            descriptor.users -= 1
            if descriptor.dropped and descriptor.users == 0:
                descriptor.close()

    def _trim(self) -> None:
        """Close idle descriptors beyond the cap, oldest first (called with the lock held)."""
        excess = len(self._open) - self._max_open
        if excess <= 0:
            return
        idle = []  # oldest first, and no more than needed: not a copy of the whole table per open
        for ref, descriptor in self._open.items():
            if len(idle) == excess:
                break
            if descriptor.users == 0:
                idle.append(ref)
        for ref in idle:
            self._drop(self._open.pop(ref))

    @staticmethod
    def _drop(descriptor: _Descriptor) -> None:
        descriptor.dropped = True
        if descriptor.users == 0:
            descriptor.close()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="regfs-files")
            self._sweeper.start()

    def _sweep(self) -> None:
        while True:
            time.sleep(self._idle / 2)
            cutoff = time.monotonic() - self._idle
            with self._lock:
                idle = [ref for ref, descriptor in self._open.items()
                        if descriptor.users == 0 and descriptor.used < cutoff]
                for ref in idle:
                    self._drop(self._open.pop(ref))


def _regular(node: Node) -> BlobNode | ObjectNode:
    """The node whose bytes a regular file shows (an import's is its source's)."""
    if isinstance(node, ImportedFileNode):
        node = node.target()
    if not isinstance(node, (BlobNode, ObjectNode)):
        raise PathNotFound("not a regular file")
    return node
