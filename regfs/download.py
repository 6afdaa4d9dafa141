"""One object's download into its temporary cache file: ranged requests in parallel, written in
place, hashed in order; and the ranges that streaming readers wait for.

An object of at most `PART` bytes is one request, made by the calling thread. A larger one is cut
into parts of `PART` bytes, fetched by up to `WINDOW` threads at once, lowest offset first (for
streaming readers, the first part alone until its first bytes arrive, `HEAD_START` seconds at most,
so that they are not slowed by the others); each part's pieces are written at their offsets
(pwrite) as they arrive, and the calling thread hashes the contiguous prefix of written bytes as it
grows (reading it back from the page cache), so the memory a download needs is its pieces in
flight, whatever the object's size. Every part is one `Remote.read`, with its own retry budget; the
first part that fails fails the download, and the others stop at their next piece.

Streaming readers (`--stream`) read the temporary file through their own descriptor (`reader`)
once `wait_for` says their range is there: the parts that hold a range someone waits for are
fetched before any other. Those bytes are not verified yet; the cache renames the file into place
only once its hash matches, and a failed download fails every reader waiting and every later one.
"""

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from regfs.backends import CHUNK
from regfs.cache import ObjectRef, ObjectWriter
from regfs.remotes import Remote

PART = CHUNK  # bytes per ranged request of a large object
WINDOW = 8  # parts of one object in flight at once: half the default cap on requests
HEAD_START = 0.5  # seconds the first part of a streamed download has alone, at most


class _Stopped(Exception):
    """Ends a part's request: the download failed elsewhere (never leaves this module)."""


@dataclass
class _Part:
    start: int
    end: int
    delivered: int = 0  # bytes from `start` written, in order

    @property
    def written_end(self) -> int:
        return self.start + self.delivered


class Download:
    """One object on its way into the cache, shared by every thread of this process that wants it."""

    def __init__(self, ref: ObjectRef, size: int | None, streamed: bool = False):
        self.ref, self.size, self.streamed = ref, size, streamed
        self.fetched = False  # bytes came from the remote (not: another process cached it meanwhile)
        self._changed = threading.Condition()
        self._parts: list[_Part] = []
        self._pending: list[int] = []  # indexes of parts nobody fetches yet, in order
        self._wanted: set[int] = set()  # parts a streaming reader waits for
        self._stop: BaseException | None = None  # why the parts stop early
        self._outcome: tuple[str | None, BaseException | None] | None = None  # (path, error) at the end
        self._reader_fd: int | None = None
        self._callbacks: list[Callable[[BaseException | None], None]] = []

    # -- the downloading side --------------------------------------------------------------------

    def fill(self, writer: ObjectWriter, remote: Remote) -> None:
        """Write the object into `writer` and hash it (the cache checks the hash and renames)."""
        size = self.size if self.size is not None else remote.size(self.ref.relpath)
        reader_fd = os.open(writer.path, os.O_RDONLY) if size > PART else None  # only large ones stream
        with self._changed:
            self.size, self.fetched, self._reader_fd = size, True, reader_fd
            self._parts = [_Part(start, min(start + PART, size)) for start in range(0, size, PART)]
            self._pending = list(range(len(self._parts))) if len(self._parts) > 1 else []
            self._changed.notify_all()
        if len(self._parts) == 1:  # this thread writes it all, in order: hashed as it comes
            self._fetch(self._parts[0], writer, remote, writer.fd, hashing=True)
        for number in range(min(WINDOW, len(self._pending))):
            threading.Thread(target=self._work, args=(writer, remote, os.dup(writer.fd)), daemon=True,
                             name="regfs-part").start()
            if number == 0 and self.streamed:  # the bytes a reader waits for first come unhindered
                with self._changed:
                    self._changed.wait_for(lambda: self._stop or any(part.delivered for part in self._parts),
                                           HEAD_START)
        self._hash(writer)

    def take(self, writer: ObjectWriter, body: bytes) -> None:
        """Fill from bytes already here: the whole object came with its size (`Fetcher.keep`)."""
        with self._changed:
            self.size, self.fetched = len(body), True
        writer.append(body, 0)

    def finish(self, path: str | None, error: BaseException | None) -> None:
        """The end: the object's cache path, or why it failed (for every waiter, and later ones).
        The `when_finished` callbacks run in a thread of their own: never in a FUSE request's."""
        with self._changed:
            self._outcome = (path, error)
            if self._stop is None:
                self._stop = error or _Stopped()
            if self._reader_fd is not None:
                os.close(self._reader_fd)
                self._reader_fd = None
            callbacks, self._callbacks = self._callbacks, []
            self._changed.notify_all()
        if callbacks:
            threading.Thread(target=lambda: [callback(error) for callback in callbacks], daemon=True,
                             name="regfs-finished").start()

    def _work(self, writer: ObjectWriter, remote: Remote, fd: int) -> None:
        """A part thread: fetch parts until none is left or the download failed. Its own descriptor
        outlives the cache's, so a late piece never lands in a file that reused the number."""
        try:
            while (part := self._claim()) is not None:
                self._fetch(part, writer, remote, fd)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed over: the hashing thread raises it
            with self._changed:
                if self._stop is None:
                    self._stop = exc
                self._changed.notify_all()
        finally:
            os.close(fd)

    def _claim(self) -> _Part | None:
        with self._changed:
            if self._stop is not None or not self._pending:
                return None
            wanted = [index for index in self._pending if index in self._wanted]
            index = wanted[0] if wanted else self._pending[0]
            self._pending.remove(index)
            return self._parts[index]

    def _fetch(self, part: _Part, writer: ObjectWriter, remote: Remote, fd: int, hashing: bool = False) -> None:
        def write(offset: int, piece: bytes) -> None:
            if self._stop is not None:
                raise _Stopped()
            if hashing:
                writer.append(piece, offset)
            else:
                writer.write_at(piece, offset, fd)
            with self._changed:
                part.delivered = offset + len(piece) - part.start
                self._changed.notify_all()

        remote.read(self.ref.relpath, part.start, part.end, write)

    def _hash(self, writer: ObjectWriter) -> None:
        """Hash the written prefix as it grows, until the whole object is hashed."""
        while writer.size < self.size:
            with self._changed:
                while (end := self._prefix_end()) <= writer.size and self._stop is None:
                    self._changed.wait()
                if self._stop is not None:
                    raise self._stop
            writer.hash_through(end)

    def _prefix_end(self) -> int:
        """Where the bytes written from the first one stop (called with the lock held)."""
        end = 0
        for part in self._parts:
            end = part.written_end
            if end < part.end:
                break
        return end

    # -- the reading side ------------------------------------------------------------------------

    def wait(self) -> str:
        """The object's cache path once downloaded; raises the failure."""
        with self._changed:
            while self._outcome is None:
                self._changed.wait()
            path, error = self._outcome
        if error is not None:
            raise error
        return path

    def reader(self) -> int | None:
        """A new descriptor of the file being written, for a streaming reader: None once the object
        is in the cache (or was cached by another process: no bytes came through here)."""
        with self._changed:
            while self._reader_fd is None and self._outcome is None:
                self._changed.wait()
            self._raise_failure()
            return None if self._reader_fd is None else os.dup(self._reader_fd)

    def wait_for(self, start: int, end: int) -> None:
        """Until bytes `start` to `end` are written (or the object is cached); raises the failure.
        The parts that hold them are fetched next."""
        with self._changed:
            while True:
                self._raise_failure()
                if self._outcome is not None or start >= self.size:
                    return
                indexes = range(start // PART, (min(end, self.size) - 1) // PART + 1)
                parts = [self._parts[index] for index in indexes] if self._parts else []
                if parts and all(part.written_end >= min(end, part.end) for part in parts):
                    return
                self._wanted.update(indexes)
                self._changed.wait()

    def when_finished(self, callback: Callable[[BaseException | None], None]) -> bool:
        """Call `callback(error)` (None: success) at the end; False if it came already."""
        with self._changed:
            if self._outcome is not None:
                return False
            self._callbacks.append(callback)
            return True

    def _raise_failure(self) -> None:
        if self._outcome is not None and self._outcome[1] is not None:
            raise self._outcome[1]
