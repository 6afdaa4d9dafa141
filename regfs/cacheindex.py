"""The cache's sqlite indexes in `<cache-dir>/regfs/`, shared by every process using the cache.

`SizeIndex` (`sizes.sqlite`): object sizes, so listings need no download, and per `.dir` manifest
whose entries' sizes are all known a record of them (see `Manifest.sizes_record`), so a listing of
a 100k-entry output reads one row, not 100k. `UsageIndex`
(`usage.sqlite`): when each object was last used and which remote regfs fetched it from, for LRU
eviction and `regfs cache status`. Rows are keyed by the object's path below the cache
(`files/md5/ab/cdef...`), so DVC 3 and legacy objects of one id stay apart.

Both are hints, never the truth about the cache: an object may be on disk without a row (DVC
wrote it) or have a row and be gone (evicted, `dvc gc`). A broken index degrades (a logged
warning, a remote lookup, an mtime instead of a last use), it never fails a read. Uses, origins
and what a download of a small object records are kept in memory (where this process reads them
too) and written by one background thread every few seconds, many in one transaction: reads and
downloads never wait on sqlite.
"""

import atexit
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from regfs.errors import RegfsError

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0  # how long a use may wait in memory before it is written
_POOL = 4  # idle connections kept open per database
_BATCH = 500  # sqlite allows 999 parameters per statement in old builds
_ERRORS = (sqlite3.Error, RegfsError)  # a database that cannot be opened, or a failed statement
_PUT_SIZE = "INSERT OR REPLACE INTO sizes VALUES (?, ?)"
_PUT_VERIFIED = "INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?)"


WRITE_AT_ONCE = 1 << 20  # a download of this many bytes or more records its object at once


class _Flusher:
    """Calls `flush` every FLUSH_SECONDS from a thread of this process (started by the first
    `start`, again in a forked child), and at the exit of the process that made it: not at a
    forked child's, which has a copy of what its parent holds (and of its sqlite connections,
    which sqlite forbids using after a fork)."""

    def __init__(self, flush: Callable[[], None]):
        self._flush = flush
        self._pid: int | None = None
        self._owner = os.getpid()
        self._lock = threading.Lock()
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if os.getpid() == self._owner:
            self._flush()

    def start(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._loop, daemon=True, name="regfs-index").start()

    def _loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self._flush()


class _SqliteIndex:
    """One sqlite database, used through a small pool of connections.

    Not one connection per thread: threads come and go (downloads' part threads, the CLI's
    pools), and a thread-local connection would stay open after its thread ended until the
    garbage collector found it. A connection serves one thread at a time.
    """

    def __init__(self, path: str, schema: tuple[str, ...]):
        self.path, self._schema = path, schema
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        try:
            with self._connection():
                pass
        except RegfsError as exc:  # a full disk, say: the index is opened again on each use
            logger.warning("%s", exc)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection of the pool, in a transaction (committed unless the block fails)."""
        with self._pool_lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._open()
        try:
            with connection:
                yield connection
        except BaseException:
            connection.close()  # it may be broken: a failed statement costs a new connection
            raise
        with self._pool_lock:
            if len(self._idle) < _POOL:
                self._idle.append(connection)
                return
        connection.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A transaction that writes: one at a time in this process. sqlite lets one writer in
        at a time and makes the others sleep on its lock (1 ms, then 2, 5, 10... whatever the
        wait); this lock hands the database to the next thread as soon as a commit is done, and
        leaves sqlite's sleeps to writers of other processes."""
        with self._write_lock, self._connection() as connection:
            yield connection

    def _open(self) -> sqlite3.Connection:
        """A new connection, the tables made; retried on each use after a failure, since a full
        disk (sqlite cannot create its -wal and -shm files) may be freed."""
        try:
            connection = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                # No fsync per commit (about 1.5 ms each, three per download): in WAL mode a crash
                # of the machine may lose the last commits, never the database, and these are hints.
                connection.execute("PRAGMA synchronous=NORMAL")
                with connection:
                    for statement in self._schema:
                        connection.execute(statement)
            except sqlite3.Error:
                connection.close()
                raise
        except sqlite3.Error as exc:
            raise RegfsError(f"cannot open cache index {self.path}: {exc}") from exc
        return connection

    def _select(self, query: str, keys: list[str]) -> list[tuple]:
        """`query` (with `{marks}` for an IN list) run over `keys` in batches."""
        rows = []
        with self._connection() as connection:
            for start in range(0, len(keys), _BATCH):
                batch = keys[start:start + _BATCH]
                rows += connection.execute(query.format(marks=",".join("?" * len(batch))), batch).fetchall()
        return rows

    def _delete(self, tables: tuple[str, ...], keys: list[str]) -> None:
        with self._writing() as connection:
            for start in range(0, len(keys), _BATCH):
                batch = keys[start:start + _BATCH]
                marks = ",".join("?" * len(batch))
                for table in tables:
                    connection.execute(f"DELETE FROM {table} WHERE object IN ({marks})", batch)


class SizeIndex(_SqliteIndex):
    """Persistent object sizes (an object's size never changes), and the files found intact.

    `verified`: the (inode, size, mtime) of a cache file when its bytes last hashed to its name (at
    download, or by `regfs cache verify`). A file that still has them is trusted; any write or
    truncation changes them, and the file is hashed again before a byte of it is served.
    """

    def __init__(self, path: str):
        super().__init__(path, (
            "CREATE TABLE IF NOT EXISTS sizes (object TEXT PRIMARY KEY, size INTEGER)",
            "CREATE TABLE IF NOT EXISTS verified (object TEXT PRIMARY KEY, inode INTEGER, size INTEGER, mtime_ns INTEGER)",
            "CREATE TABLE IF NOT EXISTS manifest_sizes (manifest TEXT PRIMARY KEY, record BLOB)",
        ))
        # Downloads recorded but not written yet: relpath -> (size, signature). They stay here
        # until written, so that this process finds them all along.
        self._unwritten: dict[str, tuple[int, tuple[int, int, int]]] = {}
        self._unwritten_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flusher = _Flusher(self.flush)

    def verified(self, relpath: str) -> tuple[int, int, int] | None:
        unwritten = self._unwritten.get(relpath)
        if unwritten is not None:
            return unwritten[1]
        try:
            with self._connection() as connection:
                row = connection.execute("SELECT inode, size, mtime_ns FROM verified WHERE object = ?",
                                         (relpath,)).fetchone()
        except _ERRORS as exc:  # the file is hashed again: slower, never wrong
            logger.warning("cannot read %s: %s", self.path, exc)
            return None
        return tuple(row) if row else None

    def mark_verified(self, relpath: str, signature: tuple[int, int, int]) -> None:
        with self._unwritten_lock:
            unwritten = self._unwritten.get(relpath)
            if unwritten is not None:  # the flusher writes the new signature, not the one it had
                self._unwritten[relpath] = (unwritten[0], signature)
                return
        try:
            with self._writing() as connection:
                connection.execute(_PUT_VERIFIED, (relpath, *signature))
        except _ERRORS as exc:
            logger.warning("cannot record a verified object in %s: %s", self.path, exc)

    def put_installed(self, ref, size: int, signature: tuple[int, int, int]) -> None:
        """A downloaded object's size and verified signature. A small object's wait in memory for
        the flusher, which writes those of many downloads in one transaction (downloads running
        at once queued for the database, one transaction each: a third of their time). A large
        object's are written at once: another process opening it before the flush would hash it
        again, and its download took far longer than a transaction."""
        with self._unwritten_lock:
            self._unwritten[ref.relpath] = (size, signature)
        if size >= WRITE_AT_ONCE:
            self.flush()
        else:
            self._flusher.start()

    def flush(self) -> None:
        """Write what downloads recorded; it stays readable in memory until committed."""
        with self._flush_lock:
            with self._unwritten_lock:
                batch = dict(self._unwritten)
            if not batch:
                return
            try:
                with self._writing() as connection:
                    connection.executemany(_PUT_SIZE, [(relpath, size) for relpath, (size, _) in batch.items()])
                    connection.executemany(_PUT_VERIFIED, [(relpath, *signature)
                                                           for relpath, (_, signature) in batch.items()])
            except _ERRORS as exc:
                logger.warning("cannot record object sizes in %s: %s", self.path, exc)
            with self._unwritten_lock:  # written, or given up (a hint only): not kept
                for relpath, record in batch.items():
                    if self._unwritten.get(relpath) == record:
                        del self._unwritten[relpath]

    def get_many(self, refs: list) -> dict:
        by_key = {ref.relpath: ref for ref in refs}
        found = {}
        if self._unwritten:
            with self._unwritten_lock:
                for key in [key for key in by_key if key in self._unwritten]:
                    found[by_key.pop(key)] = self._unwritten[key][0]
        if not by_key:
            return found
        try:
            rows = self._select("SELECT object, size FROM sizes WHERE object IN ({marks})", list(by_key))
        except _ERRORS as exc:  # a lost index costs remote lookups, never data
            logger.warning("cannot read object sizes from %s: %s", self.path, exc)
            return found
        found.update((by_key[key], size) for key, size in rows)
        return found

    def put(self, ref, size: int) -> None:
        self.put_many({ref: size})

    def put_many(self, sizes: dict) -> None:
        if not sizes:
            return
        try:
            with self._writing() as connection:
                connection.executemany(_PUT_SIZE,
                                       [(ref.relpath, size) for ref, size in sizes.items()])
        except _ERRORS as exc:
            # The index only saves round trips: losing an entry costs a remote lookup, not data.
            logger.warning("cannot record object sizes in %s: %s", self.path, exc)

    def manifest_sizes(self, relpath: str) -> bytes | None:
        """The record of the sizes of the entries of the manifest at `relpath`, as stored: the
        caller checks it (`Manifest.load_sizes`)."""
        try:
            with self._connection() as connection:
                row = connection.execute("SELECT record FROM manifest_sizes WHERE manifest = ?", (relpath,)).fetchone()
        except _ERRORS as exc:  # the sizes are looked up one by one: slower, never wrong
            logger.warning("cannot read manifest sizes from %s: %s", self.path, exc)
            return None
        return bytes(row[0]) if row and isinstance(row[0], bytes) else None

    def put_manifest_sizes(self, relpath: str, record: bytes) -> None:
        try:
            with self._writing() as connection:
                connection.execute("INSERT OR REPLACE INTO manifest_sizes VALUES (?, ?)", (relpath, record))
        except _ERRORS as exc:
            logger.warning("cannot record manifest sizes in %s: %s", self.path, exc)

    def forget(self, relpaths: list[str]) -> None:
        """Drop sizes that may have been learned from a corrupt cached copy, with every manifest's
        record (any of them may hold such a size; each is rebuilt from the index on its next use)."""
        with self._flush_lock:  # not after a flush that copied the records, before it wrote them
            with self._unwritten_lock:
                for relpath in relpaths:
                    self._unwritten.pop(relpath, None)
            try:
                self._delete(("sizes", "verified"), relpaths)
                with self._writing() as connection:
                    connection.execute("DELETE FROM manifest_sizes")
            except _ERRORS as exc:
                logger.warning("cannot remove object sizes from %s: %s", self.path, exc)


class UsageIndex(_SqliteIndex):
    """Last use (a Unix time) and origin (a remote's description: name and URL) of objects."""

    def __init__(self, path: str):
        super().__init__(path, ("CREATE TABLE IF NOT EXISTS last_use (object TEXT PRIMARY KEY, used REAL)",
                                "CREATE TABLE IF NOT EXISTS origin (object TEXT PRIMARY KEY, remote TEXT)"))
        self._pending: dict[str, float] = {}
        self._origins: dict[str, str] = {}  # origins not written yet, as uses
        self._lock = threading.Lock()
        self._flusher = _Flusher(self.flush)

    def touch(self, relpath: str) -> None:
        """Record a use now; written within FLUSH_SECONDS by this process's flusher thread."""
        with self._lock:
            self._pending[relpath] = time.time()
        self._flusher.start()

    def set_origin(self, relpath: str, remote: str) -> None:
        """Record where an object came from; written as uses are (one transaction for many
        downloads, not one each)."""
        with self._lock:
            self._origins[relpath] = remote
        self._flusher.start()

    def flush(self) -> None:
        """Write the uses and origins kept in memory (the evictor calls this before it orders
        objects)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            origins, self._origins = self._origins, {}
        if not pending and not origins:
            return
        try:
            with self._writing() as connection:
                # A use never moves back in time, whichever process writes last.
                connection.executemany(
                    "INSERT INTO last_use VALUES (?, ?) ON CONFLICT(object) "
                    "DO UPDATE SET used = max(used, excluded.used)", list(pending.items()))
                connection.executemany("INSERT OR REPLACE INTO origin VALUES (?, ?)", list(origins.items()))
        except _ERRORS as exc:  # eviction falls back on mtimes: a worse order, no lost data
            logger.warning("cannot record object uses and origins in %s: %s", self.path, exc)

    def last_uses(self) -> dict[str, float]:
        return self._table("SELECT object, used FROM last_use")

    def origins(self) -> dict[str, str]:
        return self._table("SELECT object, remote FROM origin")

    def _table(self, query: str) -> dict:
        try:
            with self._connection() as connection:
                return dict(connection.execute(query).fetchall())
        except _ERRORS as exc:
            logger.warning("cannot read %s: %s", self.path, exc)
            return {}

    def forget(self, relpaths: Iterable[str]) -> None:
        """Drop the rows of objects that left the cache."""
        try:
            self._delete(("last_use", "origin"), list(relpaths))
        except _ERRORS as exc:
            logger.warning("cannot remove rows from %s: %s", self.path, exc)
