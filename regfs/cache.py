"""The local content-addressed object cache, in DVC's own layout.

`<dir>/files/md5/ab/cdef...` for DVC 3 objects, `<dir>/ab/cdef...` for legacy (DVC 2) objects,
`.dir` manifests beside them; mode 0444, as DVC writes them. So a DVC cache directory can be used
as regfs's cache and the other way round. regfs's own state lives in `<dir>/regfs/`, which DVC
never looks at (its name is not a two-hex-digit prefix).

Invariants: an object becomes visible at its final path only by an atomic rename after its bytes
were verified against its id; one object is written by one process at a time (an flock on a
per-object lock file), so concurrent readers in any number of processes cause one download.
"""

import contextlib
import fcntl
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from regfs.dvcmeta import HASH_LEGACY
from regfs.errors import CacheError, IntegrityError
from regfs.hashing import StreamHasher

logger = logging.getLogger(__name__)

_TMP_SEPARATOR = "~"  # temporary files are named <object id>~<random>


@dataclass(frozen=True)
class ObjectRef:
    """One object: its id (md5 hex, `.dir` suffix for manifests) and the hash that named it."""

    object_id: str
    hash_name: str

    @property
    def digest(self) -> str:
        return self.object_id.removesuffix(".dir")

    @property
    def relpath(self) -> str:
        """Path below a cache or remote root; legacy objects use the pre-3.0 layout."""
        prefix = "" if self.hash_name == HASH_LEGACY else "files/md5/"
        return f"{prefix}{self.object_id[:2]}/{self.object_id[2:]}"


class ObjectWriter:
    """What a download writes into: a temporary file, hashed on the way."""

    def __init__(self, file, hasher: StreamHasher):
        self._file, self._hasher, self.size = file, hasher, 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hasher.update(data)
        self.size += len(data)


class ObjectCache:
    def __init__(self, directory: str, shared_group: bool = False):
        self.directory = os.path.abspath(directory)
        self.state_dir = os.path.join(self.directory, "regfs")
        self._tmp_dir = os.path.join(self.state_dir, "tmp")
        self._lock_dir = os.path.join(self.state_dir, "locks")
        for path in (self._tmp_dir, self._lock_dir):
            os.makedirs(path, exist_ok=True)
        if shared_group:
            # As DVC's `cache.shared = group`: setgid directories (their subdirectories inherit the
            # group and the bit), and the caller's umask 002 keeps new files group-writable.
            for path in (self.directory, self.state_dir, self._tmp_dir, self._lock_dir):
                _share_with_group(path)
        self.sizes = SizeIndex(os.path.join(self.state_dir, "sizes.sqlite"))
        if shared_group:
            # sqlite creates its files 0644 whatever the umask; its -wal/-shm files copy this mode.
            _share_with_group(self.sizes.path, 0o664)

    def path(self, ref: ObjectRef) -> str:
        return os.path.join(self.directory, ref.relpath)

    def find(self, ref: ObjectRef) -> str | None:
        path = self.path(ref)
        return path if os.path.isfile(path) else None

    def size(self, ref: ObjectRef) -> int | None:
        try:
            return os.stat(self.path(ref)).st_size
        except FileNotFoundError:
            return None

    def install(self, ref: ObjectRef, fill: Callable[[ObjectWriter], None]) -> str:
        """The object's cache path, calling `fill` to download it unless another process did."""
        target = self.path(ref)
        if os.path.isfile(target):
            return target
        with self._locked(ref):
            if os.path.isfile(target):
                return target
            self._download(ref, fill, target)
        return target

    def _download(self, ref: ObjectRef, fill, target: str) -> None:
        tmp_path = None
        try:
            fd, tmp_path = tempfile.mkstemp(dir=self._tmp_dir, prefix=ref.object_id + _TMP_SEPARATOR)
            hasher = StreamHasher(ref.hash_name)
            with os.fdopen(fd, "wb") as file:
                writer = ObjectWriter(file, hasher)
                fill(writer)
            digest = hasher.hexdigest()
            if digest != ref.digest:
                raise IntegrityError(f"object {ref.object_id} is corrupt: its bytes hash to {digest} "
                                     f"({ref.hash_name})")
            os.chmod(tmp_path, 0o444)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp_path, target)
        except OSError as exc:  # our own writes: the remote module turns its errors into RemoteError
            reason = (exc.strerror or type(exc).__name__).lower()
            raise CacheError(f"{reason} while caching object {ref.object_id} into {self.directory}") from exc
        finally:
            if tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path)
        self.sizes.put(ref, writer.size)  # after the rename: a full disk fails the index, not the read

    def remove_stale_downloads(self) -> int:
        """Remove temporary files of downloads whose writer died (killed mid-download): a live
        writer holds its object's lock, so a temporary file whose lock is free is garbage."""
        removed = 0
        for name in os.listdir(self._tmp_dir):
            object_id = name.split(_TMP_SEPARATOR, 1)[0]
            lock_path = os.path.join(self._lock_dir, object_id + ".lock")
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.unlink(os.path.join(self._tmp_dir, name))
                removed += 1
            except (BlockingIOError, FileNotFoundError):
                continue  # being written right now, or already gone
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    @contextlib.contextmanager
    def _locked(self, ref: ObjectRef) -> Iterator[None]:
        """An exclusive flock on the object's lock file; the file is removed while still held."""
        path = os.path.join(self._lock_dir, ref.object_id + ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who shares it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # Another holder may have unlinked the file between our open and our flock.
                if _same_file(fd, path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)


def _share_with_group(path: str, mode: int = 0o2775) -> None:
    info = os.stat(path)
    if info.st_uid == os.getuid() and info.st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class SizeIndex:
    """Persistent object sizes (an object's size never changes), shared by processes via sqlite."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        try:
            self._connection()
        except sqlite3.Error as exc:  # a full disk, say: sizes are asked of remotes until it opens
            logger.warning("cannot open size index %s: %s", self.path, exc)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the table made) on first use; retried after a
        failure, since a full disk (sqlite cannot create its -wal and -shm files) may be freed."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                with connection:
                    connection.execute("CREATE TABLE IF NOT EXISTS sizes "
                                       "(object TEXT PRIMARY KEY, size INTEGER)")
            except sqlite3.Error:
                connection.close()
                raise
            self._local.connection = connection
        return connection

    def get_many(self, refs: list[ObjectRef]) -> dict[ObjectRef, int]:
        found = {}
        try:
            connection = self._connection()
            for start in range(0, len(refs), 500):
                batch = {ref.relpath: ref for ref in refs[start:start + 500]}
                marks = ",".join("?" * len(batch))
                rows = connection.execute(f"SELECT object, size FROM sizes WHERE object IN ({marks})", list(batch))
                found.update((batch[key], size) for key, size in rows)
        except sqlite3.Error as exc:  # a lost index costs remote lookups, never data
            logger.warning("cannot read object sizes from %s: %s", self.path, exc)
        return found

    def put(self, ref: ObjectRef, size: int) -> None:
        self.put_many({ref: size})

    def put_many(self, sizes: dict[ObjectRef, int]) -> None:
        if not sizes:
            return
        try:
            with self._connection() as connection:
                connection.executemany("INSERT OR REPLACE INTO sizes VALUES (?, ?)",
                                       [(ref.relpath, size) for ref, size in sizes.items()])
        except sqlite3.Error as exc:
            # The index only saves round trips: losing an entry costs a remote lookup, not data.
            logger.warning("cannot record object sizes in %s: %s", self.path, exc)
