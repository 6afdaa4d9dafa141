"""Read-ahead across a directory output: a reader going through its files in order finds the next
ones fetched, or on their way, by the time it opens them.

A file's object is fetched when a read first needs it (regfs/files.py). A reader that goes through
a directory output one file after another (`cp -r`, `tar`, `rsync`, a loader over a sorted list)
would then wait for one download per file, one at a time, however fast the remote could serve many
at once. `ReadAhead` watches which entries of each output the daemon opens, by their index in the
output's manifest (sorted by path: the order `ls` shows, and, on a fresh mount, the order of inode
numbers that `cp` sorts a directory by). Once a reader opens two entries in a row going forward
(each at most `GAP` entries after the one before), the entries after the last one opened are
fetched in the background: a window of `START` entries that doubles with each further step in
order, up to `files` entries and `WINDOW_BYTES` bytes ahead of the reader. A reader in order
through files that were cached before (a second epoch, a copy of a pulled directory) counts its
steps but fetches nothing ahead until it opens one that is not cached: checking the next entries
would only take CPU from the reads. Opening entries in any
other order (a shuffled epoch, a lookup here and there) fetches nothing ahead; a jump backwards or
far ahead starts over. `files=0` turns read-ahead off: nothing is then fetched before a read needs
it.

Fetches ahead are ordinary fetches (the same cache, verification and per-object deduplication: a
reader that opens a file being fetched ahead waits for that download, never starts a second one),
made by at most `WORKERS` threads of the process (half the remote request slots, if that is fewer),
so they leave the other slots to readers; a remote may allow fewer at once (`Remote.ahead_slots`:
one per CPU from a local directory). A fetch ahead that fails is logged at debug level
only: the reader that reaches that file fetches it itself, and hears of the failure then.
"""

import logging
import queue
import threading
import weakref
from collections.abc import Sized
from typing import Protocol

logger = logging.getLogger(__name__)

DEFAULT_FILES = 64  # entries ahead of a reader, at most (the mount's --dir-readahead)
START = 4  # entries ahead after the first step in order
GAP = 8  # a step "in order" is to an entry at most this many after the last one opened
WINDOW_BYTES = 128 << 20  # bytes ahead of a reader, at most
WORKERS = 8  # threads fetching ahead, per process


class Entries(Sized, Protocol):
    """The files of one directory output, by their index in its manifest (regfs/registry.py)."""

    def size(self, index: int) -> int | None: ...

    def fetch_ahead(self, index: int) -> None:
        """Cache the entry's object unless it is there already."""


class _Run:
    """What one output's reader did last: the entry it opened, its steps in order, how far ahead
    entries were handed to the workers, and the bytes of those after the one it opened (each
    entry's size is asked for once as the window grows over it, once as the reader passes it)."""

    __slots__ = ("ahead", "ahead_bytes", "last", "steps")

    def __init__(self, index: int):
        self.last, self.steps, self.ahead, self.ahead_bytes = index, 0, index, 0


class ReadAhead:
    def __init__(self, files: int = DEFAULT_FILES, workers: int = WORKERS):
        if files < 0:
            raise ValueError(f"read-ahead must be 0 or more files, not {files}")
        self.files, self._max_workers = files, workers
        self._runs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # by output, while its tree lives
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = 0
        self._lock = threading.Lock()

    def opened(self, entries: Entries, index: int, cached: bool = False) -> None:
        """The daemon opens entry `index` of `entries` for a reader (`cached`: its object is in
        the cache already): fetch ahead if it reads in order, and is not reading cached files."""
        if not self.files:
            return
        with self._lock:
            run = self._runs.get(entries)
            if run is None or not 0 < index - run.last <= GAP:
                self._runs[entries] = _Run(index)
                return
            self._passed(entries, run, index)
            run.last, run.steps = index, run.steps + 1
            if cached and index > run.ahead:  # cached before, not by read-ahead: the next ones likely are too
                return
            start = max(run.ahead, index) + 1
            end = self._grow(entries, run, start, min(self.files, START << min(run.steps - 1, 16)))
            if start >= end:
                return
            run.ahead = end - 1
            for ahead in range(start, end):
                self._queue.put((entries, ahead))
            self._start_workers(end - start)

    @staticmethod
    def _passed(entries: Entries, run: _Run, index: int) -> None:
        """The reader went from `run.last` to `index`: the entries it passed are no longer ahead."""
        if index >= run.ahead:
            run.ahead_bytes = 0
            return
        for passed in range(run.last + 1, index + 1):
            run.ahead_bytes -= entries.size(passed) or 0  # known: the window grew over it

    @staticmethod
    def _grow(entries: Entries, run: _Run, start: int, files: int) -> int:
        """One past the last entry to have ahead of the reader (at `run.last`), the window grown
        from `start` by entries of known size within `files` entries and `WINDOW_BYTES` bytes."""
        end = start
        while end < min(len(entries), run.last + 1 + files):
            size = entries.size(end)
            if size is None or size > WINDOW_BYTES - run.ahead_bytes:
                break
            run.ahead_bytes += size
            end += 1
        return end

    def _start_workers(self, jobs: int) -> None:
        """Enough workers for `jobs` more entries, up to the maximum (called with the lock held)."""
        for _ in range(min(jobs, self._max_workers - self._workers)):
            self._workers += 1
            threading.Thread(target=self._work, daemon=True, name="regfs-readahead").start()

    def _work(self) -> None:
        while True:
            entries, index = self._queue.get()
            try:
                entries.fetch_ahead(index)
            except Exception as exc:  # noqa: BLE001 - the reader of that file fetches it and is told
                logger.debug("read-ahead of entry %d of %s failed: %s", index, entries, exc)
