"""The local content-addressed object cache, in DVC's own layout.

`<dir>/files/md5/ab/cdef...` for DVC 3 objects, `<dir>/ab/cdef...` for legacy (DVC 2) objects,
`.dir` manifests beside them; mode 0444, as DVC writes them. So a DVC cache directory can be used
as regfs's cache and the other way round. regfs's own state lives in `<dir>/regfs/`, which DVC
never looks at (its name is not a two-hex-digit prefix): `tmp/` (downloads in progress),
`objects.lock`, `manifests/` (packed copies of parsed `.dir` manifests, see regfs/manifest.py), and
the sqlite indexes of `regfs.cacheindex`.

Invariants: an object becomes visible at its final path only by an atomic rename after its bytes
were verified against its id (a `--stream` reader reads the temporary file of a download in
progress, through regfs/download.py, knowingly); one object is written by one process at a time (a
lock on the object's own byte of `objects.lock`, see `locked`), so concurrent readers in any number
of processes cause one download. An object is removed (evicted, or dropped as corrupt) only while
its lock is held, so never while it is being downloaded, and never while this process holds it open
(`hold`). Another process may have it open: unlink(2) removes the name only and its descriptor
keeps reading the same bytes; a reader that found the path but had not opened it yet fetches the
object again.
"""

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import stat
import struct
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

    def __hash__(self) -> int:  # a ref is hashed several times per read: its id's hash is kept by str
        return hash(self.object_id)

    @property
    def digest(self) -> str:
        return self.object_id.removesuffix(".dir")

    @functools.cached_property
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

    def append(self, data: bytes, offset: int) -> None:
        """Write bytes that start where the hash stands, hashing them on the way (no read back).
        Only for the thread that hashes (`hash_through`), when it also writes."""
        if offset != self.size:
            raise ValueError(f"appending at {offset}, but the hash stands at {self.size}")
        self.write_at(data, offset)
        self._hasher.update(data)
        self.size += len(data)

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
        self._locks_file = os.path.join(self.state_dir, "objects.lock")
        self._packed_dir = os.path.join(self.state_dir, "manifests")
        os.makedirs(self.tmp_dir, exist_ok=True)
        if shared_group:
            # As DVC's `cache.shared = group`: setgid directories (their subdirectories inherit the
            # group and the bit), and the caller's umask 002 keeps new files group-writable.
            for path in (self.directory, self.state_dir, self.tmp_dir):
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
        """The object's cache path, calling `fill` to download it unless another process did
        (callers looked for it first: it is looked for again under its lock only)."""
        target = self.path(ref)
        with self.locked(ref):
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
            tmp_path = None  # nothing left to remove
        except OSError as exc:  # our own writes: the remote module turns its errors into RemoteError
            raise CacheError(f"{_reason(exc)} while caching object {ref.object_id} into "
                             f"{self.directory}") from exc
        finally:
            if tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path)
        # After the rename: a full disk fails the indexes, not the read.
        info = os.stat(target)
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        self._remember_verified(ref, signature)
        self.sizes.put_installed(ref, writer.size, signature)
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
        with self.locked(ref), contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(self.path(ref)), info):
                os.unlink(self.path(ref))
        self.sizes.forget([ref.relpath])
        return False

    def mark_verified(self, ref: ObjectRef, signature: tuple[int, int, int]) -> None:
        self._remember_verified(ref, signature)
        self.sizes.mark_verified(ref.relpath, signature)

    def _remember_verified(self, ref: ObjectRef, signature: tuple[int, int, int]) -> None:
        with self._held_lock:
            self._verified[ref.relpath] = signature

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

    def state_bytes(self) -> int:
        """Bytes of regfs's own files besides downloads in progress: the indexes, the Git mirrors,
        the packed manifests, the locks file, daemons' logs kept here. That is everything in
        `regfs/` but `tmp/` and the indexes' write-ahead logs, which come and go with the processes
        using them."""
        total = 0
        for directory, dirnames, filenames in os.walk(self.state_dir):
            if directory == self.state_dir and "tmp" in dirnames:
                dirnames.remove("tmp")
            for name in filenames:
                if name.endswith(("-wal", "-shm")):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(directory, name)).st_size
        return total

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
        with self.locked(ref, wait) as locked:
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
        if ref.object_id.endswith(".dir"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._packed_path(ref))
        return True

    def packed_manifest(self, ref: ObjectRef) -> bytes | None:
        """The packed copy of the manifest `ref` kept by `keep_packed_manifest`, as stored (the
        caller checks it: `manifest.load_packed`), or None."""
        try:
            with open(self._packed_path(ref), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # the manifest is parsed instead: slower, never wrong
            logger.warning("cannot read the packed copy of manifest %s: %s", ref.object_id, _reason(exc))
            return None

    def keep_packed_manifest(self, ref: ObjectRef, parts: list) -> None:
        """Keep a packed copy of a parsed manifest (`Manifest.packed_parts`) in `regfs/manifests/`
        (written whole, then renamed into place); removed with the manifest's object."""
        tmp_path = None
        try:
            os.makedirs(self._packed_dir, exist_ok=True)
            fd, tmp_path = tempfile.mkstemp(dir=self._packed_dir, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                for part in parts:
                    file.write(part)
            os.chmod(tmp_path, 0o444)
            os.replace(tmp_path, self._packed_path(ref))
            tmp_path = None
        except OSError as exc:  # a full disk, say: the manifest is parsed again next time
            logger.warning("cannot keep a packed copy of manifest %s: %s", ref.object_id, _reason(exc))
        finally:
            if tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path)

    def _packed_path(self, ref: ObjectRef) -> str:
        return os.path.join(self._packed_dir, f"{ref.object_id}-{ref.hash_name}")

    def remove_stale_downloads(self) -> int:
        """Remove temporary files of downloads whose writer died (killed mid-download): a live
        writer holds its object's lock, so a temporary file whose lock is free is garbage."""
        removed = 0
        names = os.listdir(self.tmp_dir)
        if not names:
            return 0
        fd = self._open_locks()
        try:
            for name in names:
                object_id = name.split(_TMP_SEPARATOR, 1)[0]
                if not _lock_byte(fd, object_id, fcntl.F_RDLCK, wait=False):
                    continue  # being written right now
                with contextlib.suppress(FileNotFoundError):  # else already gone
                    os.unlink(os.path.join(self.tmp_dir, name))
                    removed += 1
                _lock_byte(fd, object_id, fcntl.F_UNLCK, wait=False)
        finally:
            os.close(fd)
        return removed

    @contextlib.contextmanager
    def locked(self, ref: ObjectRef, wait: bool = True) -> Iterator[bool]:
        """An exclusive lock on the object, across processes and threads: an open file
        description lock (fcntl(2), F_OFD_SETLKW) on the object's own byte of `objects.lock`,
        taken through a descriptor of its own and released by closing it. One file for every
        object: a lock file made and removed per object cost two file creations per download.
        Without `wait`, gives False at once if someone else holds it."""
        fd = self._open_locks()
        try:
            yield _lock_byte(fd, ref.object_id, fcntl.F_WRLCK, wait)
        finally:
            os.close(fd)

    def _open_locks(self) -> int:
        return os.open(self._locks_file, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who shares it


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


# struct flock of fcntl(2) on 64-bit Linux: type, whence (short), start, length (off_t), pid (pid_t)
_FLOCK = struct.Struct("hhqqi4x")


def _lock_byte(fd: int, object_id: str, kind: int, wait: bool) -> bool:
    """Lock (F_WRLCK, F_RDLCK) or unlock (F_UNLCK) the byte of `object_id` in the locks file open
    at `fd`: a byte at 62 bits of a hash of the id, so two objects practically never share one.
    False if it is held by someone else and not `wait`."""
    offset = int.from_bytes(hashlib.blake2b(object_id.encode(), digest_size=8).digest(), "big") >> 2
    request = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)  # l_pid must be 0 for OFD locks
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
