"""What a mount shows: the ref symlinks and `@<sha>` trees of a registry, or one pinned commit.

    MOUNT/main -> @3f2a...      one symlink per branch and tag, `HEAD` for the default branch;
    MOUNT/feature/x -> ../@..   refs with '/' become directories holding the symlink
    MOUNT/@<sha>/...            any commit by full sha or unique 7+ hex prefix, resolved on lookup

Only the ref symlinks change (on `refresh`); everything below `@<sha>` is immutable, so the nodes
found there are kept (the last `_KEPT_NODES`, most recently used): the kernel asks for a file by
path in each request (a lookup, then its reads), and a path below a directory already found costs
one step, not a walk from the root through its manifest. The view
answers in core terms (`Attr`, names, `FileReader`) and raises `RegfsError`s; the FUSE adapter
translates. `entries` lists a directory with the attributes of its entries where they are known
without I/O and cannot change (below a commit), so that a listing costs no request per entry.
"""

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from cachetools import LRUCache

from regfs.errors import IsADirectory, NotADirectory, PathNotFound, RegfsError
from regfs.files import OpenFiles
from regfs.manifest import Row
from regfs.registry import Registry
from regfs.stats import Stats
from regfs.tree import (
    BlobNode,
    DirNode,
    ImportedFileNode,
    LinkNode,
    Node,
    ObjectNode,
    OutputDirNode,
    child,
    lookup,
)

logger = logging.getLogger(__name__)

_MAX_REMEMBERED_MISSES = 10_000  # more misses between two refreshes are not remembered (nor dropped)
_KEPT_NODES = 16_384  # nodes below commits kept by (commit, path): a few MB


class Attr(NamedTuple):
    kind: str  # "file", "dir", "link"
    size: int
    is_exec: bool
    mtime: int
    block_size: int = 0  # st_blksize, or 0 for the kernel's default


class MountView:
    def __init__(self, registry: Registry, pinned_sha: str | None = None):
        self.registry = registry
        self.pinned_sha = pinned_sha
        self._refs_root = DirNode()
        self._refs_time = int(time.time())
        self._commits: dict[str, str] = {}  # `@<sha or prefix>` names already resolved
        self._lock = threading.Lock()
        self._nodes: LRUCache = LRUCache(maxsize=_KEPT_NODES)  # (commit sha, path) -> node
        self._nodes_lock = threading.Lock()
        # Root names whose kernel cache entries a refresh may have made wrong: refs that moved,
        # came or went, and names looked up in vain (a new tag, a commit not fetched yet).
        self.on_root_changed: Callable[[set[str]], None] | None = None
        self._root_refs: dict[str, frozenset] = {}
        self._root_misses: set[str] = set()
        if pinned_sha is None:
            self._rebuild_refs()

    @property
    def on_wrong_bytes(self) -> Callable[[set[str]], None] | None:
        """Called with the paths read from a `--stream` download whose bytes then proved wrong
        (regfs/files.py), so that the kernel's cached pages of them can be dropped."""
        return self.registry.context.files.on_wrong_bytes

    @on_wrong_bytes.setter
    def on_wrong_bytes(self, callback: Callable[[set[str]], None] | None) -> None:
        self.registry.context.files.on_wrong_bytes = callback

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
        by_root_name: dict[str, set] = {}
        for name, commit_sha in refs.items():
            by_root_name.setdefault(name.split("/", 1)[0], set()).add((name, commit_sha))
        root_refs = {name: frozenset(pairs) for name, pairs in by_root_name.items()}
        with self._lock:
            self._refs_root, self._refs_time = root, int(time.time())
            changed = {name for name in root_refs.keys() | self._root_refs.keys()
                       if root_refs.get(name) != self._root_refs.get(name)}
            self._root_refs, changed_too, self._root_misses = root_refs, self._root_misses, set()
        notify = self.on_root_changed
        if notify is not None:
            notify(changed | changed_too)

    def warm(self) -> None:
        """Prepare what the first requests will need: the tree of the pinned commit (else of the
        default branch) and the clients of its remotes (`Registry.warm`)."""
        self.registry.warm(self.pinned_sha or self.registry.mirror.resolve("HEAD"))

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
            try:
                commit_sha = self._commit(first[1:])
            except PathNotFound:
                self._missed(first)
                raise
            return self._in_commit(commit_sha, rest)
        with self._lock:
            root, mtime = self._refs_root, self._refs_time
        if first and first not in root.children():
            self._missed(first)
        return lookup(root, path), mtime, None

    def _missed(self, name: str) -> None:
        with self._lock:
            if len(self._root_misses) < _MAX_REMEMBERED_MISSES:
                self._root_misses.add(name)

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
        return self._node(snapshot.root, commit_sha, path), snapshot.commit_time, commit_sha

    def _node(self, root: DirNode, commit_sha: str, path: str) -> Node:
        """The node at `path` in the commit whose tree is `root`: kept, or found from its parent's."""
        key = (commit_sha, path)
        with self._nodes_lock:
            node = self._nodes.get(key)
        if node is not None:
            return node
        parent, slash, name = path.rpartition("/")
        node = child(self._node(root, commit_sha, parent), name, path) if slash else lookup(root, path)
        with self._nodes_lock:
            self._nodes[key] = node
        return node

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
                info["url"] = self.registry.public_url
        return info

    @property
    def stats(self) -> Stats:
        return self.registry.context.fetcher.stats

    def report(self) -> dict:
        """What `regfs stats` shows: the mount's source and the process's counters."""
        return {"source": self.registry.public_url, "pinned_commit": self.pinned_sha,
                "cache_dir": self.registry.context.cache.directory, **self.stats.snapshot()}

    def attr(self, path: str) -> Attr:
        node, mtime = self.resolve(path)
        if isinstance(node, ObjectNode) and node.known_size == 0:
            # No read ever reaches an empty file (the kernel knows its size), so cache it when
            # seen: its bytes are known without any remote, and DVC checking out from this cache
            # needs the object like any other.
            node.store.path_of_empty(node.ref)
        return attr_of(node, mtime)

    def listdir(self, path: str) -> list[str]:
        node, _ = self.resolve(path)
        if not isinstance(node, DirNode):
            raise NotADirectory(f"not a directory: {path}")
        return sorted(node.children())

    def entries(self, path: str, start: int = 0) -> tuple[Iterator[Row], int | None]:
        """The entries of the directory at `path` from the `start`th on, in an order that never
        changes, as rows (name, kind, size, exec bit), and the mtime of their attributes. A listing
        gives attributes only where they are known without I/O and below a commit (immutable): the
        mtime is None above the commits (the ref symlinks change), and a row's size is None if not
        known yet (a lookup asks the remote, or Git). A listing leaves an empty file (size 0) to a
        lookup too, which caches it (see `attr`)."""
        node, mtime, commit_sha = self.locate(path)
        if not isinstance(node, DirNode):
            raise NotADirectory(f"not a directory: {path}")
        return node.listing(start), None if commit_sha is None else mtime

    def readlink(self, path: str) -> str:
        node, _ = self.resolve(path)
        if not isinstance(node, LinkNode):
            raise PathNotFound(f"not a symlink: {path}")
        return node.target

    def open(self, path: str) -> "FileReader":
        node, _ = self.resolve(path)
        return open_reader(self.registry.context.files, node)

    def read_into(self, path: str, buffer: memoryview, offset: int) -> int:
        """Bytes at `offset` of the file at `path` into `buffer` (as many as it holds, fewer at the
        end), their count; fetches its object on first use."""
        node, _ = self.resolve(path)
        return self.registry.context.files.read_into(node, buffer, offset, path)

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
        local = node.store.path_of_empty(node.ref) if node.known_size == 0 \
            else node.store.path(node.ref, node.known_size)
        return {"size": os.path.getsize(local), "object": f"{node.ref.hash_name}:{node.ref.object_id}",
                "cached": cached}


def attr_of(node: Node, mtime: int) -> Attr:
    return Attr(node.kind, 0 if isinstance(node, DirNode) else node.size, node.is_exec, mtime, node.block_size)


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
    """Reads of one open file by the API or `regfs get` (the kernel reads by path instead)."""

    def __init__(self, files: OpenFiles, node: Node):
        self._files, self._node = files, node

    def read(self, size: int, offset: int) -> bytes:
        return self._files.read(self._node, size, offset)

    def close(self) -> None:
        pass  # descriptors belong to the process-wide OpenFiles


def open_reader(files: OpenFiles, node: Node) -> FileReader:
    if isinstance(node, DirNode):
        raise IsADirectory("is a directory")
    if not isinstance(node, (BlobNode, ObjectNode, ImportedFileNode)):
        raise PathNotFound("not a regular file")
    return FileReader(files, node)
