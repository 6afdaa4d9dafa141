"""The local content-addressed object cache, in DVC's own layout.

`<dir>/files/md5/ab/cdef...` for DVC 3 objects, `<dir>/ab/cdef...` for legacy (DVC 2) objects,
`.dir` manifests beside them; mode 0444, as DVC writes them. So a DVC cache directory can be used
as regfs's cache and the other way round. regfs's own state lives in `<dir>/regfs/`, which DVC
never looks at (its name is not a two-hex-digit prefix): `tmp/` (downloads in progress), `locks/`,
and the sqlite indexes of `regfs.cacheindex`.

Invariants: an object becomes visible at its final path only by an atomic rename after its bytes
were verified against its id (a `--stream` reader reads the temporary file of a download in
progress, through regfs/download.py, knowingly); one object is written by one process at a time (an
flock on a per-object lock file), so concurrent readers in any number of processes cause one
download. An object is removed (evicted, or dropped as corrupt) only while its lock is held, so
never while it is being downloaded, and never while this process holds it open (`hold`). Another
process may have it open: unlink(2) removes the name only and its descriptor keeps reading the same
bytes; a reader that found the path but had not opened it yet fetches the object again.
"""

import contextlib
import fcntl
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cachetools import LRUCache

from regfs.cacheindex import SizeIndex, UsageIndex
from regfs.dvcmeta import HASH_LEGACY, HASH_MD5
from regfs.errors import CacheError, IntegrityError, RegfsError
from regfs.hashing import CHUNK, StreamHasher

logger = logging.getLogger(__name__)

_TMP_SEPARATOR = "~"  # temporary files are named <object id>~<random>
_OPEN_ATTEMPTS = 5
_PREFIX = re.compile(r"[0-9a-f]{2}")  # fullmatch: `<dir>/ab/...`
_REST = re.compile(r"[0-9a-f]{30}(\.dir)?")  # anything else there (DVC's `*.tmp` files) is no object


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
    """What a download writes into: a temporary file, written at any offsets (by any number of
    threads, each with its own descriptor if it likes), and hashed in order of its bytes."""

    def __init__(self, fd: int, path: str, hasher: StreamHasher, what: str):
        self.fd, self.path, self._hasher, self._what = fd, path, hasher, what
        self.size = 0  # bytes hashed so far, from the first

    def write_at(self, data: bytes, offset: int, fd: int | None = None) -> None:
        """Raises CacheError, so that a full disk is never taken for a failed request. A short
        write is continued: on a filling disk pwrite(2) writes what fits and only the next call
        fails (ENOSPC), and that failure is the one to report, not bytes silently missing."""
        remaining = memoryview(data)
        try:
            while remaining:
                written = os.pwrite(self.fd if fd is None else fd, remaining, offset)
                remaining, offset = remaining[written:], offset + written
        except OSError as exc:
            raise CacheError(f"{_reason(exc)} while caching {self._what}") from exc

    def hash_through(self, end: int) -> None:
        """Hash the bytes written from where the hash stands up to `end` (they are read back from
        the page cache: memory stays bounded whatever the object's size)."""
        while self.size < end:
            chunk = os.pread(self.fd, min(CHUNK, end - self.size), self.size)
            if not chunk:
                raise CacheError(f"the temporary file of {self._what} ends at {self.size} bytes, not {end}")
            self._hasher.update(chunk)
            self.size += len(chunk)

    def hexdigest(self) -> str:
        """The hash of every byte written (those not hashed yet are, now)."""
        self.hash_through(os.fstat(self.fd).st_size)
        return self._hasher.hexdigest()


@dataclass(frozen=True)
class CachedObject:
    """An object found on disk in the cache, whoever wrote it."""

    ref: ObjectRef
    size: int
    mtime: float


class CacheWatcher:
    """Told about changes that may move the cache across a size cap (the evictor is one)."""

    def installed(self, size: int) -> None:
        pass

    def released(self) -> None:
        pass


class ObjectCache:
    def __init__(self, directory: str, shared_group: bool = False):
        self.directory = os.path.abspath(directory)
        self.state_dir = os.path.join(self.directory, "regfs")
        self.tmp_dir = os.path.join(self.state_dir, "tmp")
        self._lock_dir = os.path.join(self.state_dir, "locks")
        for path in (self.tmp_dir, self._lock_dir):
            os.makedirs(path, exist_ok=True)
        if shared_group:
            # As DVC's `cache.shared = group`: setgid directories (their subdirectories inherit the
            # group and the bit), and the caller's umask 002 keeps new files group-writable.
            for path in (self.directory, self.state_dir, self.tmp_dir, self._lock_dir):
                _share_with_group(path)
        if shared_group:
            # sqlite would create its files 0644 (their -wal/-shm files copy that mode), so another
            # user starting at the same moment would find them read-only: create them
            # group-writable (umask 002) first, and fix the mode of ones made before.
            for name in ("sizes.sqlite", "usage.sqlite"):
                index_path = os.path.join(self.state_dir, name)
                os.close(os.open(index_path, os.O_RDONLY | os.O_CREAT, 0o666))
                _share_with_group(index_path, 0o664)
        self.sizes = SizeIndex(os.path.join(self.state_dir, "sizes.sqlite"))
        self.usage = UsageIndex(os.path.join(self.state_dir, "usage.sqlite"))
        self.watcher = CacheWatcher()
        self._held: dict[ObjectRef, int] = {}  # objects open in this process, and how many times
        self._held_lock = threading.Lock()
        self._verified: LRUCache = LRUCache(maxsize=65536)  # relpath -> signature found intact here

    def path(self, ref: ObjectRef) -> str:
        return os.path.join(self.directory, ref.relpath)

    def find(self, ref: ObjectRef) -> str | None:
        """The object's path if it is in the cache; finding it counts as a use (for eviction)."""
        path = self.path(ref)
        if not os.path.isfile(path):
            return None
        self.usage.touch(ref.relpath)
        return path

    def size(self, ref: ObjectRef) -> int | None:
        try:
            return os.stat(self.path(ref)).st_size
        except FileNotFoundError:
            return None

    def install(self, ref: ObjectRef, fill: Callable[[ObjectWriter], None]) -> str:
        """The object's cache path, calling `fill` to download it unless another process did."""
        target = self.path(ref)
        if not os.path.isfile(target):
            with self._locked(ref):
                if not os.path.isfile(target):
                    self._download(ref, fill, target)
        self.usage.touch(ref.relpath)
        return target

    def _download(self, ref: ObjectRef, fill, target: str) -> None:
        tmp_path = None
        try:
            fd, tmp_path = tempfile.mkstemp(dir=self.tmp_dir, prefix=ref.object_id + _TMP_SEPARATOR)
            try:
                writer = ObjectWriter(fd, tmp_path, StreamHasher(ref.hash_name),
                                      f"object {ref.object_id} into {self.directory}")
                fill(writer)
                digest = writer.hexdigest()
            finally:
                os.close(fd)
            if digest != ref.digest:
                raise IntegrityError(f"object {ref.object_id} is corrupt: its bytes hash to {digest} "
                                     f"({ref.hash_name})")
            os.chmod(tmp_path, 0o444)
            try:
                os.replace(tmp_path, target)
            except FileNotFoundError:  # the first object of its prefix directory
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(tmp_path, target)
        except OSError as exc:  # our own writes: the remote module turns its errors into RemoteError
            raise CacheError(f"{_reason(exc)} while caching object {ref.object_id} into "
                             f"{self.directory}") from exc
        finally:
            if tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path)
        # After the rename: a full disk fails the indexes, not the read.
        self.sizes.put(ref, writer.size)
        info = os.stat(target)
        self.mark_verified(ref, (info.st_ino, info.st_size, info.st_mtime_ns))
        self.watcher.installed(writer.size)

    def open(self, ref: ObjectRef, locate: Callable[[], str]) -> int:
        """A read-only descriptor of the object at the path `locate` gives (fetching it if need be),
        whose bytes are known to hash to its id. Another process may evict the object between
        `locate` and the open, and a cache file may have been damaged: then locate it again."""
        for _ in range(_OPEN_ATTEMPTS):
            try:
                fd = os.open(locate(), os.O_RDONLY)
            except FileNotFoundError:
                logger.debug("object %s was evicted before it could be opened; fetching it again", ref.object_id)
                continue
            if self._intact(ref, fd):
                return fd
            os.close(fd)  # dropped: the next round fetches it again
        raise RegfsError(f"object {ref.object_id} was evicted from the cache, or found corrupt, "
                         f"{_OPEN_ATTEMPTS} times before it could be opened; is another process evicting "
                         f"everything (a cache size of 0), or is the remote's copy corrupt too?")

    def _intact(self, ref: ObjectRef, fd: int) -> bool:
        """Whether the open cache file holds the object's bytes: yes if it is the very file found
        intact before (same inode, size, mtime); else hashed now. A corrupt file is removed."""
        info = os.fstat(fd)
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._held_lock:
            known = self._verified.get(ref.relpath) == signature
        if known or self.sizes.verified(ref.relpath) == signature:
            with self._held_lock:
                self._verified[ref.relpath] = signature
            return True
        hasher, offset = StreamHasher(ref.hash_name), 0
        while chunk := os.pread(fd, CHUNK, offset):
            hasher.update(chunk)
            offset += len(chunk)
        digest = hasher.hexdigest()
        if digest == ref.digest:
            self.mark_verified(ref, signature)
            return True
        logger.error("cached object %s is corrupt (its bytes hash to %s, %d bytes): removing it to fetch it "
                     "again", ref.object_id, digest, offset)
        with self._locked(ref), contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(self.path(ref)), info):
                os.unlink(self.path(ref))
        self.sizes.forget([ref.relpath])
        return False

    def mark_verified(self, ref: ObjectRef, signature: tuple[int, int, int]) -> None:
        with self._held_lock:
            self._verified[ref.relpath] = signature
        self.sizes.mark_verified(ref.relpath, signature)

    def hold(self, ref: ObjectRef) -> None:
        """Keep `ref` from being removed by this process (it is open here) until `release`."""
        with self._held_lock:
            self._held[ref] = self._held.get(ref, 0) + 1

    def release(self, ref: ObjectRef) -> None:
        with self._held_lock:
            count = self._held.pop(ref) - 1
            if count:
                self._held[ref] = count
        self.watcher.released()

    def objects(self) -> Iterator[CachedObject]:
        """Every object on disk, in both layouts, whoever wrote it (regfs, DVC)."""
        for hash_name, base in ((HASH_MD5, os.path.join(self.directory, "files", "md5")),
                                (HASH_LEGACY, self.directory)):
            for prefix in _names(base):
                if not _PREFIX.fullmatch(prefix):
                    continue
                for name in _names(os.path.join(base, prefix)):
                    if not _REST.fullmatch(name):
                        continue
                    try:
                        info = os.stat(os.path.join(base, prefix, name), follow_symlinks=False)
                    except FileNotFoundError:  # removed since the listing
                        continue
                    if stat.S_ISREG(info.st_mode):
                        yield CachedObject(ObjectRef(prefix + name, hash_name), info.st_size, info.st_mtime)

    def temporary_files(self) -> list[int]:
        """Sizes of the files in regfs/tmp: downloads in progress, or of a writer that died."""
        sizes = []
        for name in _names(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                sizes.append(os.stat(os.path.join(self.tmp_dir, name)).st_size)
        return sizes

    def remove(self, ref: ObjectRef, wait: bool = False, same_as: os.stat_result | None = None) -> bool:
        """Unlink an object, unless this process holds it, or its lock is taken (a download; with
        `wait`, wait for the lock instead), or it is not the file `same_as` describes. True if the
        object is gone. Raises OSError if the file cannot be removed (permissions)."""
        with self._locked(ref, wait) as locked:
            if not locked:
                return False
            with self._held_lock:  # a `hold` comes before the holder's open, or after this unlink
                if ref in self._held:
                    return False
                path = self.path(ref)
                try:
                    if same_as is not None and not os.path.samestat(os.stat(path), same_as):
                        return False
                    os.unlink(path)
                except FileNotFoundError:
                    pass  # removed by someone else meanwhile
        return True

    def remove_stale_downloads(self) -> int:
        """Remove temporary files of downloads whose writer died (killed mid-download): a live
        writer holds its object's lock, so a temporary file whose lock is free is garbage."""
        removed = 0
        for name in os.listdir(self.tmp_dir):
            object_id = name.split(_TMP_SEPARATOR, 1)[0]
            lock_path = os.path.join(self._lock_dir, object_id + ".lock")
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.unlink(os.path.join(self.tmp_dir, name))
                removed += 1
            except (BlockingIOError, FileNotFoundError):
                continue  # being written right now, or already gone
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    @contextlib.contextmanager
    def _locked(self, ref: ObjectRef, wait: bool = True) -> Iterator[bool]:
        """An exclusive flock on the object's lock file; the file is removed while still held.
        Without `wait`, gives False at once if another process holds it."""
        path = os.path.join(self._lock_dir, ref.object_id + ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who shares it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Another holder may have unlinked the file between our open and our flock.
                if _same_file(fd, path):
                    break
            except BlockingIOError:
                os.close(fd)
                fd = None
                break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _share_with_group(path: str, mode: int = 0o2775) -> None:
    info = os.stat(path)
    if info.st_uid == os.getuid() and info.st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
