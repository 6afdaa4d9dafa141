"""The FUSE adapter (the only mfusepy user): translates kernel requests into `MountView` calls.

No logic lives here: each callback asks the view and maps the answer to a stat dict, bytes or an
errno. A read has the view fill libfuse's reply buffer itself (`_Fuse.read`): the bytes of a cache
file go from the kernel into it once, with no copy in Python.

Listings: readdir resumes at the kernel's offset and, when the kernel asks for READDIRPLUS, hands it
the attributes of each entry the view knows them for, so `ls -l` of a directory output costs a few
readdir requests instead of a lookup per entry (mfusepy 3.1 gives libfuse every name at once with
offset 0, which makes libfuse drop attributes). libfuse 3.14 counts a lookup for the entry that no
longer fits in a reply, so one node per reply (a few hundred bytes) stays until unmount. Extended
attributes exist in `user.` only: others (SELinux labels, POSIX ACLs, which `ls -l` asks for on every
entry) are ENOTSUP, which tells `ls` the filesystem has none, so it stops asking.

Kernel caching: everything below `@<sha>` is immutable, so the kernel keeps entries, attributes and
negative lookups for a month (`KERNEL_CACHE_SECONDS`) and pages for good: `open` answers ENOSYS,
which the kernel takes as "opens need no daemon" (FUSE_NO_OPEN_SUPPORT): it stops sending OPEN and
RELEASE and keeps each file's page cache across opens (FOPEN_KEEP_CACHE). Reads then arrive by
path. (Not for `opendir`: ENOSYS there crashed libfuse 3.14's high-level API.) Only the ref
symlinks change: after each refresh, the names that changed, appeared or were missed at the root
are invalidated with fuse_lowlevel_notify_inval_entry(3), so they never outlive the refresh. `RegfsError`s carry their errno; failures that a reader sees as EIO are logged once here,
with the path, since the core's message already names the object and the remote. Every write
operation is EROFS, and the mount is also made with `ro` so the kernel refuses most of them first.

Threads: libfuse runs each request in one of its worker threads, at most `MAX_THREADS` of them
(`-o max_threads`, libfuse >= 3.12; its default of 10 would let ten readers waiting for downloads
hold every thread, and a read of a cached file would wait behind them). A read waits only for
its own object's download, or with `--stream` for its own range of it. After a streamed download
failed, the kernel's cached pages of the paths read from it are dropped with
fuse_invalidate_path(3), from the thread that saw the failure, never from a request's.
"""

import ctypes
import errno
import functools
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator

# mfusepy loads libfuse2 when both are installed unless told otherwise; libfuse2 caps reads at
# 128 KiB and lacks the libfuse3 config. Our packages and docs install fuse3.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy

from regfs.errors import ReadOnly, RegfsError
from regfs.manifest import Row
from regfs.namespace import Attr, MountView

logger = logging.getLogger(__name__)

XATTR_PREFIX = "user.regfs."
# Getting this attribute of a file makes its object cached and answers a short JSON object (under
# the 128 bytes of the buffer os.getxattr tries first, so one request does it): `regfs prefetch`
# asks for it by name. Never listed, so `getfattr -d`, `cp --preserve=xattr` or `rsync -X` never
# trigger a download.
FETCH_XATTR = XATTR_PREFIX + "fetch"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
KERNEL_CACHE_SECONDS = 30 * 86400.0
_READDIR_PLUS, _FILL_DIR_PLUS = 1, 2  # fuse.h: FUSE_READDIR_PLUS (asked), FUSE_FILL_DIR_PLUS (given)
_TYPE_BITS = {"dir": stat.S_IFDIR, "link": stat.S_IFLNK, "file": stat.S_IFREG}
MAX_BACKGROUND = 64
# A FUSE mount gets the kernel's default 128 KiB of readahead, and the kernel takes the lower of
# its backing device's knob (/sys/class/bdi/MAJOR:MINOR/read_ahead_kb, root only; the daemon writes
# it before answering INIT) and the max_readahead of INIT's answer (set here). At 128 KiB a first
# read of a big file costs a daemon round trip per 128 KiB: 1 MiB gave about 1.5x its throughput.
READAHEAD_KIB = 1024
MAX_THREADS = 64
_ROOT_INODE = 1  # FUSE_ROOT_ID: the high-level API numbers the root 1, as the kernel does


def _translated(operation: Callable) -> Callable:
    name = operation.__name__.removesuffix("_into")  # as the kernel's request is named, in logs

    @functools.wraps(operation)
    def wrapper(self, path, *args):
        try:
            return operation(self, path, *args)
        except RegfsError as exc:
            if exc.errno == errno.EIO and not getattr(exc, "reported", False):
                exc.reported = True  # one log line per failure, however often the kernel retries
                self._view.stats.add("errors")
                logger.error("%s %s: %s", name, path, exc)
            raise mfusepy.FuseOSError(exc.errno) from exc
        except mfusepy.FuseOSError:
            raise  # already an answer for the kernel
        except OSError as exc:
            self._view.stats.add("errors")
            logger.error("%s %s: %s", name, path, exc)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    return wrapper


def _read_only(*_args) -> int:
    raise mfusepy.FuseOSError(errno.EROFS)


class Operations(mfusepy.Operations):
    use_ns = True

    def __init__(self, view: MountView, on_ready: Callable[[], None] | None = None):
        self._view = view
        self._on_ready = on_ready
        self._uid, self._gid = os.getuid(), os.getgid()
        self._stats = view.stats
        self._kernel = _KernelCache()
        self._shape_tables: list[dict] = []  # stat structures for listings, one table per reply at a time
        self._templates: dict[tuple[str, bool, int, int], mfusepy.c_stat] = {}  # for getattr_into

    def init_with_config(self, conn, config) -> None:
        if config is not None:
            config.entry_timeout = config.attr_timeout = config.negative_timeout = KERNEL_CACHE_SECONDS
        if conn is not None:
            # Room for many readers' requests at once (readahead and async reads are background
            # requests; the kernel's default of 12 queues DataLoader workers behind each other).
            conn.max_background, conn.congestion_threshold = MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4
            conn.max_readahead = max(conn.max_readahead, READAHEAD_KIB * 1024)
        self._kernel.attach()
        self._view.on_root_changed = self._kernel.forget
        self._view.on_wrong_bytes = self._kernel.forget_pages
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        self._view.on_root_changed = None
        self._view.on_wrong_bytes = None
        self._kernel.detach()

    @_translated
    def getattr(self, path: str, fh: int | None = None) -> dict:
        return self._stat(self._view.attr(path))

    @_translated
    def getattr_into(self, path: str, status: mfusepy.c_stat) -> None:
        """`getattr` written into libfuse's stat structure: a copy of the structure of the entries
        of that kind, exec bit and mtime, then the size (no dict, no setattr per field)."""
        attr = self._view.attr(path)
        ctypes.pointer(status)[0] = self._template(attr.kind, attr.is_exec, attr.mtime, attr.block_size)
        status.st_size = attr.size
        status.st_blocks = (attr.size + 511) >> 9

    def _template(self, kind: str, is_exec: bool, mtime: int, block_size: int = 0) -> mfusepy.c_stat:
        """The stat structure of an empty entry of that kind, exec bit, mtime and block size (never
        written to: callers copy it, then set the size)."""
        key = (kind, is_exec, mtime, block_size)
        template = self._templates.get(key)
        if template is None:
            template = mfusepy.c_stat()
            mfusepy.set_st_attrs(template, self._stat(Attr(kind, 0, is_exec, mtime, block_size)), use_ns=True)
            if len(self._templates) > 256:  # a few per commit mtime
                self._templates.clear()
            self._templates[key] = template
        return template

    @_translated
    def readdir(self, path: str, offset: int, buf, filler, plus: bool) -> None:
        """The entries from `offset` on: ".", "..", then the view's; an entry's offset is the next's."""
        start = max(offset, 2)
        rows, mtime = self._view.entries(path, start - 2)
        tables = self._shape_tables
        try:  # list.pop and list.append are atomic: no two replies fill one table at once
            shapes = tables.pop()
        except IndexError:
            shapes = {}
        try:
            add = _Entries(buf, filler, mtime if plus else None, self._template, shapes)
            for position, name in ((1, "."), (2, "..")):
                if offset < position and add.name(name, "dir", position):
                    return
            add.rows(rows, start + 1)
        finally:
            if len(shapes) < 64:  # a few per mtime; a table grown past that is dropped
                tables.append(shapes)

    @_translated
    def readlink(self, path: str) -> str:
        return self._view.readlink(path)

    @_translated
    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise ReadOnly(f"read-only: {path}")
        raise mfusepy.FuseOSError(errno.ENOSYS)  # see the module docstring: no opens, kept pages

    @_translated
    def read(self, path: str, buffer: memoryview, offset: int) -> int:
        """Fills libfuse's reply `buffer` (see `_Fuse.read`); returns the count of bytes."""
        count = self._view.read_into(path, buffer, offset)
        self._stats.served(count)
        return count

    @_translated
    def listxattr(self, path: str) -> list[str]:
        return [XATTR_PREFIX + name for name in self._xattrs(path)]

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith("user."):  # see the module docstring
            raise mfusepy.FuseOSError(errno.ENOTSUP)
        if name == FETCH_XATTR:  # asked for by name only (`regfs prefetch`): listxattr never shows it
            return json.dumps(self._view.fetch(path), separators=(",", ":")).encode()
        value = self._xattrs(path).get(name.removeprefix(XATTR_PREFIX)) if name.startswith(XATTR_PREFIX) \
            else None
        if value is None:
            raise mfusepy.FuseOSError(errno.ENODATA)
        return value.encode()

    def _xattrs(self, path: str) -> dict[str, str]:
        """Provenance of every entry; the root also carries the mount's statistics as JSON."""
        values = self._view.provenance(path)
        if path.strip("/") == "":
            values["stats"] = json.dumps(self._view.report(), sort_keys=True)
        return values

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    chmod = chown = create = mkdir = rmdir = unlink = rename = symlink = link = _read_only
    truncate = utimens = write = setxattr = removexattr = mknod = _read_only

    def _stat(self, attr: Attr) -> dict:
        if attr.kind == "dir":
            mode, nlink = stat.S_IFDIR | 0o555, 2
        elif attr.kind == "link":
            mode, nlink = stat.S_IFLNK | 0o777, 1
        else:
            mode, nlink = stat.S_IFREG | (0o555 if attr.is_exec else 0o444), 1
        mtime_ns = attr.mtime * 1_000_000_000
        status = {"st_mode": mode, "st_nlink": nlink, "st_size": attr.size, "st_uid": self._uid,
                  "st_gid": self._gid, "st_mtime": mtime_ns, "st_ctime": mtime_ns, "st_atime": mtime_ns,
                  "st_blocks": (attr.size + 511) >> 9}
        if attr.block_size:
            status["st_blksize"] = attr.block_size
        return status


class _Entries:
    """One readdir reply being filled through libfuse's filler; each method says when it is full.

    Attributes go to the kernel only when it asked for them (READDIRPLUS) and the view gave them
    (an mtime, the size of a non-empty file or a directory's row); otherwise only the type (ino 0
    then tells the kernel to look the name up). The stat structures are reused: one per type, and
    one per mtime, kind and exec bit of the entries that have attributes (`shapes`: a table kept
    across replies, but used by one reply at a time, since a filler call reads the structure whose
    size the loop just set). A listing of 100k entries makes 100k filler calls: the loop stays lean.
    """

    def __init__(self, buf, filler, mtime: int | None, template_of: Callable[[str, bool, int], mfusepy.c_stat],
                 shapes: dict[tuple[int, str, bool], mfusepy.c_stat]):
        self._buf, self._filler, self._mtime, self._template_of = buf, filler, mtime, template_of
        self._types: dict[str, mfusepy.c_stat] = {}
        self._shapes = shapes

    def name(self, name: str, kind: str, offset: int) -> bool:
        return self._filler(self._buf, name.encode("utf-8", "surrogateescape"), self._type(kind), offset, 0) != 0

    def rows(self, rows: Iterator[Row], offset: int) -> bool:
        """The rows (name, kind, size or None, exec bit), the first at `offset`. An empty file's
        attributes are left to a lookup, as an unknown size's (see `MountView.entries`)."""
        buf, filler, shapes, mtime = self._buf, self._filler, self._shapes, self._mtime
        for name, kind, size, is_exec in rows:
            if mtime is not None and size is not None and (size or kind == "dir"):
                status = shapes.get((mtime, kind, is_exec)) or self._shape(kind, is_exec)
                status.st_size = size
                status.st_blocks = (size + 511) >> 9
                flags = _FILL_DIR_PLUS
            else:
                status, flags = self._type(kind), 0
            if filler(buf, name.encode("utf-8", "surrogateescape"), status, offset, flags):
                return True
            offset += 1
        return False

    def _type(self, kind: str) -> mfusepy.c_stat:
        status = self._types.get(kind)
        if status is None:
            status = self._types[kind] = mfusepy.c_stat(st_mode=_TYPE_BITS[kind])
        return status

    def _shape(self, kind: str, is_exec: bool) -> mfusepy.c_stat:
        template = self._template_of(kind, is_exec, self._mtime)
        status = self._shapes[self._mtime, kind, is_exec] = type(template).from_buffer_copy(template)
        return status


class _Fuse(mfusepy.FUSE):
    """mfusepy's FUSE with a read into libfuse's buffer, and a readdir that works by offset and can
    give attributes (see the module docstring): libfuse calls it once per kernel request, with the
    offset to resume at.

    Every callback comes from one of libfuse's threads, which Python does not know: ctypes makes a
    Python thread state for the call and destroys it after (with its frame stack, an mmap and a
    munmap each time). The first callback on a thread takes one more hold on its state
    (PyGILState_Ensure), so the state lives as long as the thread, for every later request.
    """

    def _wrapper(self, func, *args, **kwargs):
        if not getattr(_thread_state, "kept", False):
            ctypes.pythonapi.PyGILState_Ensure()  # never released: see the class docstring
            _thread_state.kept = True
        return super()._wrapper(func, *args, **kwargs)

    def read(self, path: bytes | None, buf, size: int, offset: int, fip) -> int:
        """mfusepy's read has the operation return bytes, then copies them into `buf`: here the
        operation is handed `buf` itself, which the kernel fills (preadv(2)) with the GIL released."""
        if size == 0:
            return 0
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        buffer = _writable_memory(ctypes.addressof(buf.contents), size, _PYBUF_WRITE)
        try:
            return self.operations.read(decoded, buffer, offset)
        finally:
            buffer.release()

    def fgetattr(self, path: bytes | None, buf, fip) -> int:
        """mfusepy's fills `buf` from a dict, one setattr per field: `getattr_into` copies one."""
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        self.operations.getattr_into(decoded, buf.contents)
        return 0

    def readdir_fuse_3(self, path: bytes | None, buf, filler, offset: int, fip, flags: int) -> int:
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        self.operations.readdir(decoded, offset, buf, filler, bool(flags & _READDIR_PLUS))
        return 0


_thread_state = threading.local()  # what lives in it lives as long as its thread's state

# A memoryview of libfuse's reply buffer, in one C call. A ctypes array over it (c_char * size)
# makes a new array type for each new size: about 14 µs per read, reads of many sizes.
_writable_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_writable_memory.restype = ctypes.py_object
_writable_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200


class _KernelCache:
    """Drops the kernel's cached lookups of names at the mount root (libfuse's notify API).

    The session pointer is valid between `init` and `destroy`; a lock keeps a notification from
    racing the teardown.
    """

    def __init__(self):
        self._fuse: int | None = None
        self._session: int | None = None
        self._lock = threading.Lock()

    def attach(self) -> None:
        fuse_pointer = mfusepy._libfuse.fuse_get_context().contents.fuse
        with self._lock:
            self._fuse = fuse_pointer
            self._session = _libfuse_session(fuse_pointer)

    def detach(self) -> None:
        with self._lock:
            self._fuse = self._session = None

    def forget_pages(self, paths: set[str]) -> None:
        """Drop the kernel's cached pages and attributes of these paths (never call this from a
        request's thread: the kernel waits for reads of those pages in flight)."""
        with self._lock:
            if self._fuse is None:
                return
            for path in paths:
                status = _invalidate_path(self._fuse, os.fsencode(path))
                if status not in (0, -errno.ENOENT):  # ENOENT: libfuse does not know the path (any more)
                    logger.warning("cannot drop the kernel's cached pages of %s: %s", path,
                                   os.strerror(-status))

    def forget(self, names: set[str]) -> None:
        with self._lock:
            if self._session is None:
                return
            for name in names:
                encoded = os.fsencode(name)
                status = _inval_entry(self._session, _ROOT_INODE, encoded, len(encoded))
                if status not in (0, -errno.ENOENT):  # ENOENT: the kernel had nothing cached
                    logger.warning("cannot drop the kernel's cached entry %r: %s", name,
                                   os.strerror(-status))
            _inval_inode(self._session, _ROOT_INODE, 0, 0)  # the root's attributes and listing


def _libfuse_function(name: str, restype, *argtypes):
    function = getattr(mfusepy._libfuse, name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


_libfuse_session = _libfuse_function("fuse_get_session", ctypes.c_void_p, ctypes.c_void_p)
_invalidate_path = _libfuse_function("fuse_invalidate_path", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
_inval_entry = _libfuse_function("fuse_lowlevel_notify_inval_entry", ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t)
_inval_inode = _libfuse_function("fuse_lowlevel_notify_inval_inode", ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64)


def mount(view: MountView, mountpoint: str, fsname: str, on_ready: Callable[[], None] | None = None,
          debug: bool = False, allow_other: bool = False) -> None:
    """Serve `view` at `mountpoint` until unmounted or signalled (SIGTERM/SIGINT unmount).

    `default_permissions` always: with `allow_other` the kernel then enforces the 0444/0555 modes
    for every user (mount.fuse3(8)), so sharing a mount never grants more than reading.
    """
    safe_name = "".join(char if char.isalnum() or char in "/:._-@" else "_" for char in fsname)
    _Fuse(Operations(view, on_ready), mountpoint, foreground=True, nothreads=False, debug=debug, ro=True,
          default_permissions=True, allow_other=allow_other, fsname=safe_name, subtype="regfs",
          max_threads=MAX_THREADS)
