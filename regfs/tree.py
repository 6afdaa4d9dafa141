"""The tree of one commit: its Git files with every DVC output laid over them.

A commit's tree is what `git checkout REV && dvc pull` leaves in a workspace, minus `.git/` and
`.dvc/`. Git entries come from the commit; outputs of `.dvc` files and pipelines (`dvc.lock` with
its `dvc.yaml`) that `.dvcignore` does not exclude replace or add entries at their paths (`cache:
false` outputs keep their Git bytes), in the registry and in each sub-repository (a directory with
its own `.dvc/`), whose metafiles may only name outputs inside it. Directory outputs and
imports are lazy nodes, expanded from their manifest or their source registry on first use, so
building a tree reads no object. Nodes are immutable once built, because commits are.

A directory's `children()` is a mapping of names to nodes. Below a directory output it is a view of
the packed manifest (`ManifestDirectory`) that makes a node for each name looked up, so a million
entries are never a million nodes. `DirNode.listing` gives a directory's entries in a fixed order
with what is known of them without I/O (a readdir that hands the kernel attributes).
"""

import logging
import os
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from regfs.cache import ObjectRef
from regfs.dvcignore import DvcIgnore
from regfs.dvcmeta import CloudEntry, Output, Parsed, parse_dvc_file, parse_pipeline
from regfs.errors import MetafileError, NotADirectory, PathNotFound, RegfsError
from regfs.git import TreeItem
from regfs.manifest import Listing, Row

logger = logging.getLogger(__name__)


# A directory of many entries reports large blocks (`st_blksize`): glibc sizes a reader's getdents
# buffer from it (32 KiB by default, at most 1 MiB), and the kernel asks FUSE for a buffer's worth
# of entries per request, so an `ls -l` of 100k entries takes about 20 requests, not 500. Only for
# many entries: the kernel asks for every entry's attributes in a directory's first request (a
# libfuse node and a kernel inode each), which for a names-only listing of small directories would
# be most of their entries instead of about 200 each.
MANY_ENTRIES = 4096
LARGE_BLOCK = 1 << 20


class Node:
    kind = "file"
    is_exec = False
    block_size = 0  # what the directory reports as st_blksize (0: the kernel's default)

    @property
    def size(self) -> int:
        return 0

    @property
    def known_size(self) -> int | None:
        """The size if known without I/O (asking a remote, another registry, or Git)."""
        return self.size


class DirNode(Node):
    kind = "dir"

    def __init__(self, children: Mapping[str, Node] | None = None):
        self._children = {} if children is None else children
        self._names: list[str] | None = None

    def children(self) -> Mapping[str, Node]:
        return self._children

    def listing(self, start: int = 0) -> Iterator[Row]:
        """The entries from the `start`th on, in an order that never changes."""
        children = self.children()
        if isinstance(children, ManifestDirectory):
            return children.rows(start)
        if self._names is None:  # built once the node is: it never changes after
            self._names = sorted(children)
        return _rows(children, self._names, start)


def _rows(children: Mapping[str, Node], names: list[str], start: int) -> Iterator[Row]:
    for position in range(start, len(names)):
        node = children[names[position]]
        # A directory's row gives its attributes, but not its block size: a lookup does (size None).
        size = (None if node.block_size else 0) if isinstance(node, DirNode) else node.known_size
        yield names[position], node.kind, size, node.is_exec


class LazyDirNode(DirNode):
    """A directory whose entries are loaded on first use.

    A load that failed because the content is bad (MetafileError: the manifest is content
    addressed, so it stays bad) fails the same way forever; other failures are retried.
    """

    def __init__(self, load: Callable[[], Mapping[str, Node]], what: str):
        super().__init__(None)
        self._children = None
        self._load = load
        self._error: MetafileError | None = None
        self._lock = threading.Lock()
        self.what = what

    def children(self) -> Mapping[str, Node]:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._children is None:
                try:
                    self._children = self._load()
                except MetafileError as exc:
                    self._error = exc
                    raise
            return self._children


class OutputDirNode(LazyDirNode):
    """A directory output: its entries come from the `.dir` manifest object `ref` in `store`."""

    def __init__(self, load: Callable[[], Mapping[str, Node]], what: str, ref: ObjectRef, store,
                 entries: int | None = None):
        super().__init__(load, what)
        self.ref, self.store = ref, store
        if entries is not None and entries >= MANY_ENTRIES:  # its top directory may hold them all
            self.block_size = LARGE_BLOCK


class ManifestDirectory(Mapping):
    """A directory of a directory output: its entries in the packed manifest, as nodes made on
    lookup (`file_node` makes a file's from its entry index)."""

    def __init__(self, listing: Listing, file_node: Callable[[int], Node]):
        self._listing, self._file_node = listing, file_node

    def get(self, name: str, default: Node | None = None) -> Node | None:
        found = self._listing.lookup(name)
        if found is None:
            return default
        if isinstance(found, int):
            return self._file_node(found)
        return DirNode(ManifestDirectory(found, self._file_node))

    def __getitem__(self, name: str) -> Node:
        node = self.get(name)
        if node is None:
            raise KeyError(name)
        return node

    def __iter__(self) -> Iterator[str]:
        return self._listing.names()

    def __len__(self) -> int:
        return len(self._listing)

    def rows(self, start: int) -> Iterator[Row]:
        return self._listing.rows(start)


class LinkNode(Node):
    kind = "link"

    def __init__(self, target: str):
        self.target = target

    @property
    def size(self) -> int:
        return len(os.fsencode(self.target))


class BlobNode(Node):
    """A file whose bytes are in Git."""

    def __init__(self, read_blob: Callable[[str], bytes], blob_size: Callable[[str], int],
                 blob_id: str, is_exec: bool):
        self._read_blob, self._blob_size = read_blob, blob_size
        self.blob_id, self.is_exec = blob_id, is_exec
        self._size: int | None = None

    @property
    def size(self) -> int:
        if self._size is None:  # libgit2 inflates the blob to learn its size: once is enough
            self._size = self._blob_size(self.blob_id)
        return self._size

    @property
    def known_size(self) -> int | None:
        return self._size  # a listing does not inflate blobs nobody stat'ed

    def data(self) -> bytes:
        return self._read_blob(self.blob_id)


class ObjectNode(Node):
    """A file whose bytes are a content-addressed object on a remote (`store`)."""

    def __init__(self, ref: ObjectRef, store, size: int | None, is_exec: bool):
        self.ref, self.store, self._size, self.is_exec = ref, store, size, is_exec

    @property
    def known_size(self) -> int | None:
        return self._size

    @property
    def size(self) -> int:
        if self._size is None:
            # Only old metafiles lack sizes; the store asks the index, the cache, then the remote.
            self._size = self.store.sizes([self.ref]).get(self.ref)
        if self._size is None:
            raise RegfsError(f"size of object {self.ref.object_id} is unknown: it is missing from "
                             f"{self.store.label}")
        return self._size


class EntryNode(ObjectNode):
    """A file of a directory output, which also knows its place among the output's files (by its
    index in the manifest: regfs/readahead.py fetches the ones after it for readers going in order)."""

    def __init__(self, ref: ObjectRef, store, size: int | None, is_exec: bool, entries, index: int):
        super().__init__(ref, store, size, is_exec)
        self.entries, self.index = entries, index


class ImportedFileNode(Node):
    """A `dvc import` file output: its bytes are those of a path in another registry."""

    def __init__(self, resolve: Callable[[], Node], size: int | None, is_exec: bool):
        self._resolve, self._size, self.is_exec = resolve, size, is_exec
        self._target: Node | None = None
        self._lock = threading.Lock()

    def target(self) -> Node:
        with self._lock:
            if self._target is None:
                self._target = self._resolve()
            return self._target

    @property
    def size(self) -> int:
        return self._size if self._size is not None else self.target().size

    @property
    def known_size(self) -> int | None:
        return self._size


def entry_children(entries: Iterable[CloudEntry], file_node: Callable[[CloudEntry], Node]) -> dict[str, Node]:
    """Nested directory nodes for the files a cloud-versioned output lists in its metafile (already
    validated; such outputs have no `.dir` object to pack)."""
    root = DirNode()
    for entry in entries:
        *parents, name = entry.relpath.split("/")
        node = root
        for part in parents:
            node = node.children().setdefault(part, DirNode())
        node.children()[name] = file_node(entry)
    return root.children()


def lookup(root: Node, path: str) -> Node:
    """The node at `path` (POSIX, relative to `root`; "" is the root)."""
    node = root
    for name in path.split("/") if path else ():
        node = child(node, name, path)
    return node


def child(node: Node, name: str, path: str) -> Node:
    """The entry `name` of the directory `node`, on the way to `path` (named in errors)."""
    if not isinstance(node, DirNode):
        raise NotADirectory(f"not a directory: {path}")
    found = node.children().get(name)
    if found is None:
        raise PathNotFound(f"no such file or directory: {path}")
    return found


class TreeBuilder:
    """Builds the root node of a commit from its Git items and an `output_node` factory."""

    def __init__(self, items: Iterable[TreeItem], read_blob: Callable[[str], bytes],
                 blob_size: Callable[[str], int], output_node: Callable[[Output], Node | None]):
        self._read_blob, self._blob_size, self._output_node = read_blob, blob_size, output_node
        self.root = DirNode()
        self._metafiles: dict[str, str] = {}  # path -> blob id
        self._dvcignores: dict[str, str] = {}  # directory ("" or "a/b/") -> blob id
        self._subrepos: list[str] = []  # "sub/" of each directory holding its own `.dvc/`
        self.dvcignore: DvcIgnore | None = None  # the commit's ignore rules, once built
        self._add_git_items(items)

    def build(self) -> DirNode:
        outputs = sorted(self._outputs(), key=lambda output: output.path)
        for output in outputs:
            if output.cache:
                self._overlay(output)
        return self.root

    def _add_git_items(self, items: Iterable[TreeItem]) -> None:
        dirs: dict[str, DirNode] = {"": self.root}
        for item in items:
            parent_path, name = posixpath.split(item.path)
            parent = dirs.get(parent_path)
            if parent is None or item.path == ".dvc":  # inside .dvc/, or .dvc/ itself
                continue
            if name == ".dvc" and item.kind == "dir":
                self._subrepos.append(parent_path + "/")
            if item.kind == "dir":
                dirs[item.path] = parent.children()[name] = DirNode()
            elif item.kind == "link":
                parent.children()[name] = LinkNode(os.fsdecode(self._read_blob(item.blob_id)))
            else:
                parent.children()[name] = BlobNode(self._read_blob, self._blob_size, item.blob_id,
                                                   item.is_exec)
                if name.endswith(".dvc") or name == "dvc.lock":
                    self._metafiles[item.path] = item.blob_id
                elif name == ".dvcignore":
                    self._dvcignores[parent_path + "/" if parent_path else ""] = item.blob_id

    def _outputs(self) -> list[Output]:
        outputs = []
        self.dvcignore = DvcIgnore({directory: self._read_blob(blob_id)
                                    for directory, blob_id in self._dvcignores.items()}, self._subrepos)
        for path, blob_id in sorted(self._metafiles.items()):
            collected = path if path.endswith(".dvc") else posixpath.join(posixpath.dirname(path), "dvc.yaml")
            if self.dvcignore.is_ignored(collected):
                logger.debug("not collecting %s: .dvcignore excludes it", collected)
                continue
            try:
                parsed = self._parse(path, blob_id)
            except MetafileError as exc:
                logger.warning("skipping outputs of %s: %s", path, exc)
                continue
            for what, reason in parsed.skipped:
                logger.warning("skipping output %s: %s", what, reason)
            root = self.dvcignore.repo_root(path)  # each (sub-)repository holds its own outputs
            for output in parsed.outputs:
                if self.dvcignore.repo_root(output.path) == root:
                    outputs.append(output)
                else:
                    logger.warning("skipping output %s (%s): it is not in the repository of its metafile",
                                   output.path, output.metafile)
        return outputs

    def _parse(self, path: str, blob_id: str) -> Parsed:
        text = self._read_blob(blob_id)
        if path.endswith(".dvc"):
            return parse_dvc_file(text, path)
        spec_path = posixpath.join(posixpath.dirname(path), "dvc.yaml")
        spec = lookup_optional(self.root, spec_path)
        spec_text = spec.data() if isinstance(spec, BlobNode) else None
        return parse_pipeline(spec_text, text, path, self._git_file)

    def _git_file(self, path: str) -> bytes | None:
        """The bytes of a Git file of the commit (a vars file of a `dvc.yaml`), None if absent."""
        node = lookup_optional(self.root, path)
        return node.data() if isinstance(node, BlobNode) else None

    def _overlay(self, output: Output) -> None:
        *parents, name = output.path.split("/")
        node = self.root
        for part in parents:
            child = node.children().get(part)
            if child is None:
                child = node.children()[part] = DirNode()
            elif type(child) is not DirNode:
                logger.warning("skipping output %s (%s): it overlaps %s", output.path, output.metafile,
                               "another output" if isinstance(child, LazyDirNode) else "a file")
                return
            node = child
        output_node = self._output_node(output)
        if output_node is not None:
            node.children()[name] = output_node


def lookup_optional(root: Node, path: str) -> Node | None:
    try:
        return lookup(root, path)
    except (PathNotFound, NotADirectory):
        return None
