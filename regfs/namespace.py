"""What a mount shows: the ref symlinks and `@<sha>` trees of a registry, or one pinned commit.

    MOUNT/main -> @3f2a...      one symlink per branch and tag, `HEAD` for the default branch;
    MOUNT/feature/x -> ../@..   refs with '/' become directories holding the symlink
    MOUNT/@<sha>/...            any commit by full sha or unique 7+ hex prefix, resolved on lookup

Only the ref symlinks change (on `refresh`); everything below `@<sha>` is immutable. The view
answers in core terms (`Attr`, names, `FileReader`) and raises `RegfsError`s; the FUSE adapter
translates.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass

from regfs.errors import IsADirectory, NotADirectory, PathNotFound, RegfsError
from regfs.registry import Registry
from regfs.stats import Stats
from regfs.tree import BlobNode, DirNode, ImportedFileNode, LinkNode, Node, ObjectNode, OutputDirNode, lookup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attr:
    kind: str  # "file", "dir", "link"
    size: int
    is_exec: bool
    mtime: int


class MountView:
    def __init__(self, registry: Registry, pinned_sha: str | None = None):
        self.registry = registry
        self.pinned_sha = pinned_sha
        self._refs_root = DirNode()
        self._refs_time = int(time.time())
        self._commits: dict[str, str] = {}  # `@<sha or prefix>` names already resolved
        self._lock = threading.Lock()
        if pinned_sha is None:
            self._rebuild_refs()

    def refresh(self) -> None:
        """Fetch the registry and point the ref symlinks at the new commits."""
        self.registry.update()
        if self.pinned_sha is None:
            self._rebuild_refs()

    def _rebuild_refs(self) -> None:
        refs = self.registry.mirror.refs()
        default = self.registry.mirror.default_branch()
        if default in refs:
            refs["HEAD"] = refs[default]
        root = DirNode()
        for name, commit_sha in sorted(refs.items()):
            _add_ref(root, name, commit_sha)
        with self._lock:
            self._refs_root, self._refs_time = root, int(time.time())

    def resolve(self, path: str) -> tuple[Node, int]:
        """The node at `path` (relative to the mount root) and its mtime."""
        node, mtime, _ = self.locate(path)
        return node, mtime

    def locate(self, path: str) -> tuple[Node, int, str | None]:
        """The node at `path`, its mtime, and the commit it belongs to (None above the commits)."""
        path = path.strip("/")
        if self.pinned_sha is not None:
            return self._in_commit(self.pinned_sha, path)
        first, _, rest = path.partition("/")
        if first.startswith("@"):
            return self._in_commit(self._commit(first[1:]), rest)
        with self._lock:
            root, mtime = self._refs_root, self._refs_time
        return lookup(root, path), mtime, None

    def _commit(self, name: str) -> str:
        commit_sha = self._commits.get(name)
        if commit_sha is None:
            try:
                commit_sha = self.registry.mirror.find_commit(name)
            except RegfsError as exc:
                raise PathNotFound(f"no commit {name!r}") from exc
            with self._lock:
                if len(self._commits) > 4096:
                    self._commits.clear()
                self._commits[name] = commit_sha
        return commit_sha

    def _in_commit(self, commit_sha: str, path: str) -> tuple[Node, int, str]:
        snapshot = self.registry.tree(commit_sha)
        return lookup(snapshot.root, path), snapshot.commit_time, commit_sha

    def provenance(self, path: str) -> dict[str, str]:
        """Where the entry at `path` comes from: `commit`, `hash`, `remote`, `url` (as known)."""
        node, _, commit_sha = self.locate(path)
        info = {"commit": commit_sha} if commit_sha else {}
        imported = isinstance(node, ImportedFileNode)
        if imported:
            node = node.target()
        if isinstance(node, (ObjectNode, OutputDirNode)):
            info["hash"] = f"{node.ref.hash_name}:{node.ref.object_id}"
            try:
                info["url"] = node.store.url(node.ref)
                info["remote"] = node.store.remote().name
            except RegfsError as exc:  # no usable remote: the other facts still stand
                logger.debug("no remote for %s: %s", path, exc)
        elif isinstance(node, BlobNode):
            info["hash"] = f"git-blob:{node.blob_id}"
            info["remote"] = "git"
            if not imported:
                info["url"] = self.registry.url
        return info

    @property
    def stats(self) -> Stats:
        return self.registry.context.fetcher.stats

    def report(self) -> dict:
        """What `regfs stats` shows: the mount's source and the process's counters."""
        return {"source": self.registry.url, "pinned_commit": self.pinned_sha,
                "cache_dir": self.registry.context.cache.directory, **self.stats.snapshot()}

    def attr(self, path: str) -> Attr:
        node, mtime = self.resolve(path)
        return attr_of(node, mtime)

    def listdir(self, path: str) -> list[str]:
        node, _ = self.resolve(path)
        if not isinstance(node, DirNode):
            raise NotADirectory(f"not a directory: {path}")
        return sorted(node.children())

    def readlink(self, path: str) -> str:
        node, _ = self.resolve(path)
        if not isinstance(node, LinkNode):
            raise PathNotFound(f"not a symlink: {path}")
        return node.target

    def open(self, path: str) -> "FileReader":
        node, _ = self.resolve(path)
        return open_reader(node)

    def fetch(self, path: str) -> dict:
        """Make the regular file at `path` local without reading it (`regfs prefetch`): its object
        cached, downloaded from its remote (an import's, from its source) unless already there.

        Returns `size`, `object` (`HASH:ID`, `git-blob:ID` for bytes that come with Git) and
        `cached`: whether the object was local before this call (Git bytes always are).
        """
        node, _ = self.resolve(path)
        if isinstance(node, ImportedFileNode):
            node = node.target()
        if isinstance(node, BlobNode):
            return {"size": node.size, "object": f"git-blob:{node.blob_id}", "cached": True}
        if isinstance(node, DirNode):
            raise IsADirectory(f"is a directory: {path}")
        if not isinstance(node, ObjectNode):
            raise PathNotFound(f"not a regular file: {path}")
        cached = self.registry.context.cache.find(node.ref) is not None
        local = node.store.path_of_empty(node.ref) if node.known_size == 0 else node.store.path(node.ref)
        return {"size": os.path.getsize(local), "object": f"{node.ref.hash_name}:{node.ref.object_id}",
                "cached": cached}


def attr_of(node: Node, mtime: int) -> Attr:
    return Attr(node.kind, 0 if isinstance(node, DirNode) else node.size, node.is_exec, mtime)


def _add_ref(root: DirNode, name: str, commit_sha: str) -> None:
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.startswith("@") for part in parts):
        logger.warning("not showing ref %r: its name cannot be a path in the mount", name)
        return
    node = root
    for part in parts[:-1]:
        child = node.children().setdefault(part, DirNode())
        if not isinstance(child, DirNode):
            logger.warning("not showing ref %r: %r is also a ref", name, part)
            return
        node = child
    if parts[-1] in node.children():
        logger.warning("not showing ref %r: another ref uses that path", name)
        return
    node.children()[parts[-1]] = LinkNode("../" * (len(parts) - 1) + "@" + commit_sha)


class FileReader:
    """Reads of one open file."""

    def read(self, size: int, offset: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class BytesReader(FileReader):
    def __init__(self, data: bytes):
        self._data = data

    def read(self, size: int, offset: int) -> bytes:
        return self._data[offset:offset + size]


class ObjectReader(FileReader):
    """Reads a cached object with pread; the object is fetched on the first read, not at open.

    While open, the object is held in the cache, so this process's evictor leaves it alone; another
    process (`regfs cache gc`, another mount) may unlink it, and the descriptor keeps reading.
    """

    def __init__(self, node: ObjectNode):
        self._node = node
        self._fd: int | None = None
        self._error: RegfsError | None = None
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        with self._lock:
            if self._error is not None:
                raise self._error  # the kernel retries failed reads: fail them alike, fetch once
            if self._fd is None:
                store, ref = self._node.store, self._node.ref
                store.cache.hold(ref)  # before the lookup: an eviction afterwards cannot pick it
                try:
                    self._fd = store.cache.open(ref, lambda: store.path(ref))
                except RegfsError as exc:
                    self._error = exc
                    raise
                finally:
                    if self._fd is None:
                        store.cache.release(ref)
            return self._fd

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self._descriptor(), size, offset)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._node.store.cache.release(self._node.ref)


class LazyReader(FileReader):
    """Opens its real reader on first read (imports resolve their source only when read)."""

    def __init__(self, opener):
        self._opener, self._reader, self._lock = opener, None, threading.Lock()

    def read(self, size: int, offset: int) -> bytes:
        with self._lock:
            if self._reader is None:
                self._reader = self._opener()
        return self._reader.read(size, offset)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def open_reader(node: Node) -> FileReader:
    if isinstance(node, DirNode):
        raise IsADirectory("is a directory")
    if isinstance(node, BlobNode):
        return BytesReader(node.data())
    if isinstance(node, ObjectNode):
        if node.known_size == 0:
            # The kernel sends no read for an empty file, so cache it now: its bytes are known, and
            # DVC sharing this cache would otherwise miss the object.
            node.store.path_of_empty(node.ref)
        return ObjectReader(node)
    if isinstance(node, ImportedFileNode):
        return LazyReader(lambda: open_reader(node.target()))
    raise PathNotFound("not a regular file")

