"""One object's download into its temporary cache file: ranged requests in parallel, written in
place, hashed in order.

An object of at most `PART` bytes is one request, made by the calling thread. A larger one is cut
into parts of `PART` bytes, fetched by up to `WINDOW` threads at once, lowest offset first; each
part's pieces are written at their offsets (pwrite) as they arrive, and the calling thread hashes
the contiguous prefix of written bytes as it grows (reading it back from the page cache), so the
memory a download needs is its pieces in flight, whatever the object's size. Every part is one
`Remote.read`, with its own retry budget; the first part that fails fails the download, and the
others stop at their next piece.
"""

import os
import threading
from dataclasses import dataclass

from regfs.backends import CHUNK
from regfs.cache import ObjectRef, ObjectWriter
from regfs.remotes import Remote

PART = CHUNK  # bytes per ranged request of a large object
WINDOW = 8  # parts of one object in flight at once: half the default cap on requests


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

    def __init__(self, ref: ObjectRef, size: int | None):
        self.ref, self.size = ref, size
        self.fetched = False  # bytes came from the remote (not: another process cached it meanwhile)
        self._changed = threading.Condition()
        self._parts: list[_Part] = []
        self._pending: list[int] = []  # indexes of parts nobody fetches yet, in order
        self._stop: BaseException | None = None  # why the parts stop early
        self._outcome: tuple[str | None, BaseException | None] | None = None  # (path, error) at the end

    def fill(self, writer: ObjectWriter, remote: Remote) -> None:
        """Write the object into `writer` and hash it (the cache checks the hash and renames)."""
        size = self.size if self.size is not None else remote.size(self.ref.relpath)
        with self._changed:
            self.size, self.fetched = size, True
            self._parts = [_Part(start, min(start + PART, size)) for start in range(0, size, PART)]
            self._pending = list(range(len(self._parts))) if len(self._parts) > 1 else []
            self._changed.notify_all()
        if len(self._parts) == 1:
            self._fetch(self._parts[0], writer, remote, writer.fd)
        for _ in range(min(WINDOW, len(self._pending))):
            threading.Thread(target=self._work, args=(writer, remote, os.dup(writer.fd)), daemon=True,
                             name="regfs-part").start()
        self._hash(writer)

    def finish(self, path: str | None, error: BaseException | None) -> None:
        """The end: the object's cache path, or why it failed (for every waiter)."""
        with self._changed:
            self._outcome = (path, error)
            if self._stop is None:
                self._stop = error or _Stopped()
            self._changed.notify_all()

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
            return self._parts[self._pending.pop(0)]

    def _fetch(self, part: _Part, writer: ObjectWriter, remote: Remote, fd: int) -> None:
        def write(offset: int, piece: bytes) -> None:
            if self._stop is not None:
                raise _Stopped()
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

    def wait(self) -> str:
        """The object's cache path once downloaded (by another thread); raises the failure."""
        with self._changed:
            while self._outcome is None:
                self._changed.wait()
            path, error = self._outcome
        if error is not None:
            raise error
        return path
