"""The FUSE adapter (the only mfusepy user): translates kernel requests into `MountView` calls.

No logic lives here: each callback asks the view and maps the answer to a stat dict, bytes or an
errno. `RegfsError`s carry their errno; failures that a reader sees as EIO are logged once here,
with the path, since the core's message already names the object and the remote. Every write
operation is EROFS, and the mount is also made with `ro` so the kernel refuses most of them first.
"""

import errno
import functools
import itertools
import json
import logging
import os
import stat
import threading
from collections.abc import Callable

# mfusepy loads libfuse2 when both are installed unless told otherwise; libfuse2 caps reads at
# 128 KiB and lacks the libfuse3 config. Our packages and docs install fuse3.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy

from regfs.errors import ReadOnly, RegfsError
from regfs.namespace import Attr, FileReader, MountView

logger = logging.getLogger(__name__)

XATTR_PREFIX = "user.regfs."
# Getting this attribute of a file makes its object cached and answers a short JSON object (under
# the 128 bytes of the buffer os.getxattr tries first, so one request does it): `regfs prefetch`
# asks for it by name. Never listed, so `getfattr -d`, `cp --preserve=xattr` or `rsync -X` never
# trigger a download.
FETCH_XATTR = XATTR_PREFIX + "fetch"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _translated(operation: Callable) -> Callable:
    @functools.wraps(operation)
    def wrapper(self, path, *args):
        try:
            return operation(self, path, *args)
        except RegfsError as exc:
            if exc.errno == errno.EIO and not getattr(exc, "reported", False):
                exc.reported = True  # one log line per failure, however often the kernel retries
                self._view.stats.add("errors")
                logger.error("%s %s: %s", operation.__name__, path, exc)
            raise mfusepy.FuseOSError(exc.errno) from exc
        except mfusepy.FuseOSError:
            raise  # already an answer for the kernel
        except OSError as exc:
            self._view.stats.add("errors")
            logger.error("%s %s: %s", operation.__name__, path, exc)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    return wrapper


def _read_only(*_args) -> int:
    raise mfusepy.FuseOSError(errno.EROFS)


class Operations(mfusepy.Operations):
    use_ns = True

    def __init__(self, view: MountView, on_ready: Callable[[], None] | None = None):
        self._view = view
        self._on_ready = on_ready
        self._handles: dict[int, FileReader] = {}
        self._handle_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._uid, self._gid = os.getuid(), os.getgid()
        self._stats = view.stats

    def init(self, path: str) -> None:
        if self._on_ready is not None:
            self._on_ready()

    @_translated
    def getattr(self, path: str, fh: int | None = None) -> dict:
        return self._stat(self._view.attr(path))

    @_translated
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self._view.listdir(path)]

    @_translated
    def readlink(self, path: str) -> str:
        return self._view.readlink(path)

    @_translated
    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise ReadOnly(f"read-only: {path}")
        reader = self._view.open(path)
        with self._lock:
            handle = next(self._handle_ids)
            self._handles[handle] = reader
        return handle

    @_translated
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        data = self._handles[fh].read(size, offset)
        self._stats.served(len(data))
        return data

    @_translated
    def listxattr(self, path: str) -> list[str]:
        return [XATTR_PREFIX + name for name in self._xattrs(path)]

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
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

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            reader = self._handles.pop(fh, None)
        if reader is not None:
            reader.close()
        return 0

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
        return {"st_mode": mode, "st_nlink": nlink, "st_size": attr.size, "st_uid": self._uid,
                "st_gid": self._gid, "st_mtime": mtime_ns, "st_ctime": mtime_ns, "st_atime": mtime_ns,
                "st_blocks": (attr.size + 511) // 512}


def mount(view: MountView, mountpoint: str, fsname: str, on_ready: Callable[[], None] | None = None,
          debug: bool = False, allow_other: bool = False) -> None:
    """Serve `view` at `mountpoint` until unmounted or signalled (SIGTERM/SIGINT unmount).

    `default_permissions` always: with `allow_other` the kernel then enforces the 0444/0555 modes
    for every user (mount.fuse3(8)), so sharing a mount never grants more than reading.
    """
    safe_name = "".join(char if char.isalnum() or char in "/:._-@" else "_" for char in fsname)
    mfusepy.FUSE(Operations(view, on_ready), mountpoint, foreground=True, nothreads=False, debug=debug,
                 ro=True, default_permissions=True, allow_other=allow_other, fsname=safe_name,
                 subtype="regfs")
