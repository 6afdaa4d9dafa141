"""A registry: one Git URL, its mirror, and the trees of its commits with their object stores.

`Context` holds what every registry of a process shares: the object cache, the fetcher, the open
files, the cap on requests in flight, the user's DVC config levels, opened remotes, and the
registries that imports lead to. The config of a commit is its committed `.dvc/config` (a
sub-repository's own, for its outputs) over the user's system/global levels, under the overrides
given on the command line (or recorded by an import); relative local remote URLs resolve against
the repository's `.dvc/`, which only exists for a registry given as a local directory. Such a
registry without a default remote reads its objects from its own cache, as DVC does when it opens
a local repository. Imports are followed into their sources, imports of imports too; a cycle is an
error, not a hang.
"""

import logging
import os
import posixpath
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cachetools import LRUCache

from regfs import readahead
from regfs.address import is_local_url, local_path, public_url
from regfs.cache import ObjectCache, ObjectRef
from regfs.dvcconfig import (
    MAX_REQUESTS,
    Config,
    RemoteSpec,
    absolutize,
    config_from_mapping,
    parse_config,
    user_levels,
)
from regfs.dvcignore import DvcIgnore
from regfs.dvcmeta import CloudEntry, ImportSource, Output
from regfs.errors import (
    ConfigError,
    IntegrityError,
    MetafileError,
    RegfsError,
    RemoteError,
    RevisionNotFound,
    SourceError,
)
from regfs.fetch import Fetcher, ObjectStore, whole_limit
from regfs.files import OpenFiles
from regfs.git import Mirror
from regfs.manifest import Manifest
from regfs.remotes import Location, Remote, RequestSlots, open_remote
from regfs.tree import (
    DirNode,
    EntryNode,
    ImportedFileNode,
    LazyDirNode,
    ManifestDirectory,
    Node,
    ObjectNode,
    OutputDirNode,
    TreeBuilder,
    entry_children,
    lookup_optional,
)

logger = logging.getLogger(__name__)

LOCAL_CACHE_REMOTE = "local-cache"  # the default remote of a local registry that names none
_MAX_IMPORT_CHAIN = 16
_MAX_CONFIG_FILE = 1 << 20
_resolving = threading.local()  # the imports this thread is resolving, outermost first


def _import_chain() -> list:
    if not hasattr(_resolving, "chain"):
        _resolving.chain = []
    return _resolving.chain


@dataclass(frozen=True)
class Snapshot:
    commit_sha: str
    commit_time: int
    root: DirNode
    dvcignore: DvcIgnore  # which paths DVC ignores (what `dvc list` leaves out)
    outputs: dict[str, Output]  # the outputs shown, by path (their recorded hash and size)


class Context:
    def __init__(self, cache_dir: str, shared_group: bool = False, max_requests: int = MAX_REQUESTS,
                 stream: bool = False, dir_readahead: int = readahead.DEFAULT_FILES):
        self.shared_group = shared_group
        self.cache = ObjectCache(cache_dir, shared_group)
        self.fetcher = Fetcher(self.cache)
        self.reads_ahead = dir_readahead > 0
        workers = min(readahead.WORKERS, max(1, max_requests // 2))  # the other half is for readers
        self.files = OpenFiles(stream=stream, readahead=readahead.ReadAhead(dir_readahead, workers))
        self.request_slots = RequestSlots(max_requests)
        self.mirrors_dir = os.path.join(self.cache.state_dir, "git")
        self.user_config = Config()
        for level in user_levels():
            self.user_config = self.user_config.merged(level)
        self._remotes: dict[tuple, Remote] = {}
        self._registries: dict[tuple, Registry] = {}
        self._lock = threading.Lock()

    def remote(self, spec: RemoteSpec) -> Remote:
        key = (spec.name, spec.url, repr(sorted(spec.options.items())))
        with self._lock:
            if key not in self._remotes:
                self._remotes[key] = open_remote(spec, self.request_slots)
            return self._remotes[key]

    def registry(self, url: str, overrides: Config | None = None) -> "Registry":
        overrides = overrides or Config()
        key = (url, repr(overrides))
        with self._lock:
            if key not in self._registries:
                self._registries[key] = Registry(url, self, overrides)
            return self._registries[key]


class Registry:
    def __init__(self, url: str, context: Context, overrides: Config | None = None):
        self.local_dir = local_path(url) if is_local_url(url) else None
        self.url = self.local_dir or url
        self.public_url = public_url(self.url)  # in messages, stats and xattrs
        self.context = context
        self.overrides = overrides or Config()
        self.mirror = Mirror(self.url, context.mirrors_dir, context.shared_group)
        self._trees: LRUCache = LRUCache(maxsize=32)
        self._configs: dict[tuple, Config] = {}  # (repository root, config blob) -> config
        self._stores: dict[tuple, ObjectStore] = {}
        self._lock = threading.RLock()
        self._fetched = False
        self._unreachable = False  # the last fetch failed

    def update(self) -> None:
        """Fetch the mirror from the URL; the first success after a failure is logged."""
        try:
            if self.local_dir is not None and not os.path.exists(self.local_dir):
                raise SourceError(f"registry {self.public_url} does not exist")
            self.mirror.fetch()
        except SourceError:
            self._unreachable = True
            raise
        if self._unreachable:
            logger.info("fetched %s again: its refs are current", self.public_url)
            self._unreachable = False
        self._fetched = True

    def update_or_reuse(self) -> None:
        """Fetch the mirror; if the URL cannot be reached but a mirror exists, serve it, and say so."""
        try:
            self.update()
        except SourceError as exc:
            fetched_at = self.mirror.last_fetch()
            if fetched_at is None:
                raise
            logger.warning("%s; serving the mirror as fetched at %s", exc,
                           time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fetched_at)))

    def resolve(self, revision: str) -> str:
        """A commit sha; fetches the mirror once if the revision is not known yet."""
        if not self._fetched and not os.path.isdir(self.mirror.path):
            self.update()
        try:
            return self.mirror.resolve(revision)
        except (RevisionNotFound, SourceError):
            if self._fetched:
                raise
        self.update()
        return self.mirror.resolve(revision)

    def tree(self, commit_sha: str) -> Snapshot:
        with self._lock:
            snapshot = self._trees.get(commit_sha)
            if snapshot is None:
                snapshot = self._build(commit_sha)
                self._trees[commit_sha] = snapshot
            return snapshot

    def warm(self, commit_sha: str) -> None:
        """Build the commit's tree and set up the clients of the remotes its outputs use, so that
        the first listing and the first read do not wait for them."""
        self.tree(commit_sha)
        with self._lock:
            stores = list(self._stores.values())
        for store in stores:
            store.remote().warm()

    def _build(self, commit_sha: str) -> Snapshot:
        items = self.mirror.walk(commit_sha)
        # The registry and each sub-repository (a directory with its own `.dvc/`) read their
        # outputs with their own `.dvc/config`, relative URLs resolving against their own `.dvc/`.
        config_blobs: dict[str, str | None] = {}
        for item in items:
            if item.kind == "dir" and posixpath.basename(item.path) == ".dvc":
                config_blobs.setdefault(_repo_root(item.path), None)
            elif item.kind == "file" and posixpath.basename(item.path) == "config" \
                    and posixpath.basename(posixpath.dirname(item.path)) == ".dvc":
                config_blobs[_repo_root(posixpath.dirname(item.path))] = item.blob_id
        roots = sorted(config_blobs, key=len, reverse=True)
        outputs: dict[str, Output] = {}

        def output_node(output: Output) -> Node | None:
            root = next((root for root in roots if output.metafile.startswith(root)), "")
            config_key = (root, config_blobs.get(root))
            node = self._output_node(output, self._config(*config_key), config_key)
            if node is not None:
                outputs[output.path] = output
            return node

        builder = TreeBuilder(items, self.mirror.read_blob, self.mirror.blob_size, output_node)
        root_node = builder.build()
        return Snapshot(commit_sha, self.mirror.commit_time(commit_sha), root_node, builder.dvcignore, outputs)

    def _config(self, root: str, config_blob: str | None) -> Config:
        """The config of the repository at `root` ("" or "sub/") whose `.dvc/config` is `config_blob`."""
        key = (root, config_blob)
        if key not in self._configs:
            repo_level = Config()
            if config_blob is not None:
                text = self.mirror.read_blob(config_blob).decode("utf-8", "replace")
                base = os.path.join(self.local_dir, root, ".dvc") if self.local_dir else None
                try:
                    repo_level = parse_config(text, base)
                except ConfigError as exc:
                    logger.error("ignoring %s.dvc/config of %s: %s", root, self.public_url, exc)
            config = self.context.user_config.merged(repo_level).merged(self.overrides)
            if self.local_dir and not config.core.get("remote"):
                # As DVC opens a local repository without a default remote (dvc get, dvc import):
                # its own cache is the store.
                cache_dir = config.cache.get("dir") or os.path.join(self.local_dir, root, ".dvc", "cache")
                config.core["remote"] = LOCAL_CACHE_REMOTE
                config.remotes[LOCAL_CACHE_REMOTE] = {"url": cache_dir}
            self._configs[key] = config
        return self._configs[key]

    def store(self, config: Config, config_key: tuple, remote_name: str | None) -> ObjectStore:
        key = (config_key, remote_name)
        if key not in self._stores:
            where = f"{self.public_url} (sub-repository {config_key[0]})" if config_key[0] else self.public_url
            label = f"remote '{remote_name or config.core.get('remote') or '(default)'}' of {where}"
            self._stores[key] = ObjectStore(self.context.fetcher,
                                            lambda: self.context.remote(config.remote(remote_name)), label)
        return self._stores[key]

    def _output_node(self, output: Output, config: Config, config_key: tuple) -> Node | None:
        if output.import_source is not None:
            return self._import_node(output)
        if output.object_id is None and output.files is None:
            logger.warning("skipping output %s (%s): it has no md5, so there is nothing to pull",
                           output.path, output.metafile)
            return None
        store = self.store(config, config_key, output.remote)
        versioned = _versioned_remote(config, output.remote)
        if output.files is not None:  # cloud versioning: the entries are in the metafile, no `.dir` object
            entries = output.files
            return LazyDirNode(lambda: entry_children(
                entries, lambda entry: _file_node(output, entry, store, versioned)), output.path)
        ref = ObjectRef(output.object_id, output.hash_name)
        if not output.is_dir:
            if versioned is not None:
                store.locate(ref, Location(output.path, _version(output.versions, versioned)))
            return ObjectNode(ref, store, output.size, output.is_exec)
        return OutputDirNode(lambda: self._dir_children(ref, store, output.path, output.size), output.path, ref,
                             store, output.nfiles)

    def _dir_children(self, ref: ObjectRef, store: ObjectStore, path: str, total: int | None) -> Mapping[str, Node]:
        try:
            manifest = store.manifest(ref)
        except MetafileError as exc:
            logger.error("skipping output %s of %s: %s", path, self.public_url, exc)
            exc.reported = True
            raise

        # An output of small files may have them fetched with their sizes (read-ahead: not with it off).
        whole = whole_limit(total, len(manifest)) if self.context.reads_ahead else 0
        try:
            store.fill_sizes(ref, manifest, whole)
        except (RemoteError, ConfigError) as exc:
            # The remote cannot be asked (offline, say): each entry learns its size when stat'ed,
            # from the cache if it is there; only the others fail then, not the whole directory.
            logger.warning("sizes of the entries of %s in %s are not known yet: %s", path, self.public_url, exc)

        entries = OutputEntries(manifest, ref.hash_name, store, path)

        def file_node(index: int) -> Node:
            return EntryNode(entries.ref(index), store, manifest.size(index), manifest.is_exec(index), entries, index)

        return ManifestDirectory(manifest.root(), file_node)

    def _import_node(self, output: Output) -> Node | None:
        source = output.import_source

        def resolve() -> Node:
            return self._resolve_import(source, output)

        if output.object_id is None:
            # `dvc import --no-download`: no hash, so not even whether it is a directory is
            # known without the source; DVC pulls it from there, and so does this, at once.
            try:
                return resolve()
            except RegfsError as exc:
                logger.warning("skipping import %s (%s): %s", output.path, output.metafile, exc)
                return None
        if output.is_dir:
            return LazyDirNode(lambda: _children_of(resolve(), output.path), output.path)
        return ImportedFileNode(resolve, output.size, output.is_exec)

    def _resolve_import(self, source: ImportSource, output: Output) -> Node:
        """The source's node of an import; imports of imports are followed, a cycle is an error."""
        url = source.url
        if is_local_url(url) and not os.path.isabs(local_path(url)) and self.local_dir:
            url = os.path.normpath(os.path.join(self.local_dir, local_path(url)))
        step = (url, source.rev_lock or source.rev, source.path, repr(source.remote), repr(source.config))
        chain = _import_chain()
        if step in chain or len(chain) >= _MAX_IMPORT_CHAIN:
            raise SourceError(f"import {output.path}: {url}:{source.path} is a cycle or a chain of more "
                              f"than {_MAX_IMPORT_CHAIN} imports")
        chain.append(step)
        try:
            registry = self.context.registry(url, self._import_overrides(source, output))
            commit_sha = registry.resolve(source.rev_lock or source.rev or "HEAD")
            node = lookup_optional(registry.tree(commit_sha).root, posixpath.normpath(source.path))
            if node is None:
                raise SourceError(f"import {output.path}: {source.path} not found in {url}@{commit_sha[:12]}")
            while isinstance(node, ImportedFileNode):  # an import of an import: read its source
                node = node.target()
            if isinstance(node, DirNode):
                node.children()  # loaded here, so that a cycle through directories is seen too
        finally:
            chain.pop()
        if isinstance(node, ObjectNode) and node.ref.hash_name == output.hash_name and output.object_id \
                and node.ref.object_id != output.object_id and not output.is_dir:
            raise IntegrityError(f"import {output.path}: {url}@{commit_sha[:12]}:{source.path} is object "
                                 f"{node.ref.object_id}, the import recorded {output.object_id}")
        return node

    def _import_overrides(self, source: ImportSource, output: Output) -> Config:
        """What `dvc import --config/--remote/--remote-config` recorded, as a config level over
        the source's own (dvc/dependency/repo.py)."""
        if isinstance(source.config, dict):
            overrides = config_from_mapping(source.config)
        elif isinstance(source.config, str):
            overrides = self._config_file(source.config, output)
        else:
            overrides = Config()
        if isinstance(source.remote, str):
            overrides.core["remote"] = source.remote.lower()
        elif isinstance(source.remote, dict):
            overrides.default_options = {str(key).lower(): value for key, value in source.remote.items()}
        if self.local_dir:  # DVC ran in the importing registry: relative paths are relative to it
            absolutize(overrides, self.local_dir)
        return overrides

    def _config_file(self, path: str, output: Output) -> Config:
        """A config file named by an import; relative to the importing registry, where DVC ran."""
        if not os.path.isabs(path) and self.local_dir is None:
            raise ConfigError(f"import {output.path}: config file {path} is relative to a registry "
                              f"that is not a local directory")
        path = os.path.join(self.local_dir or "", path)
        what = f"import {output.path}: cannot use config file {path}"
        try:
            # Whatever path a metafile names: never a device, a FIFO or a huge file.
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_CONFIG_FILE:
                raise ConfigError(f"{what}: not a regular file of at most 1 MiB")
            with open(path, encoding="utf-8") as file:
                text = file.read(_MAX_CONFIG_FILE)
        except OSError as exc:
            raise ConfigError(f"{what}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what}: not UTF-8") from exc
        try:
            return parse_config(text)
        except ConfigError as exc:  # not the parser's message: it quotes the file's lines
            raise ConfigError(f"{what}: not a DVC config file") from exc


def _repo_root(dvc_dir: str) -> str:
    """"" or "sub/" for the `.dvc` directory `dvc_dir` of a repository."""
    parent = posixpath.dirname(dvc_dir)
    return parent + "/" if parent else ""


def _versioned_remote(config: Config, name: str | None) -> str | None:
    """The name of the remote of an output if it is cloud-versioned (`version_aware` or
    `worktree`): its objects are then at their path in the registry, not content-addressed."""
    try:
        spec = config.remote(name)
    except ConfigError:
        return None  # reading fails later, with this error
    return spec.name if spec.is_versioned else None


def _version(versions: tuple[tuple[str | None, str], ...], remote: str) -> str | None:
    """The version recorded for `remote`, else the one of the older flat form, else the first
    (as DVC takes it); None: read the current version (a worktree remote without versioning)."""
    by_remote = dict(versions)
    if remote in by_remote:
        return by_remote[remote]
    return by_remote.get(None, versions[0][1] if versions else None)


def _file_node(output: Output, entry: CloudEntry, store: ObjectStore, versioned: str | None) -> Node:
    """A file of a cloud-versioned directory output; content-addressed if its remote is not versioned."""
    ref = ObjectRef(entry.object_id, output.hash_name)
    if versioned is not None:
        location = Location(posixpath.join(output.path, entry.relpath), _version(entry.versions, versioned))
        store.locate(ref, location)
    return ObjectNode(ref, store, entry.size, entry.is_exec)


class OutputEntries:
    """The files of one directory output by their index in its manifest (regfs/readahead.py)."""

    def __init__(self, manifest: Manifest, hash_name: str, store: ObjectStore, path: str):
        self._manifest, self._hash_name, self._store, self._path = manifest, hash_name, store, path

    def __len__(self) -> int:
        return len(self._manifest)

    def __repr__(self) -> str:
        return f"output {self._path} ({self._store.label})"

    def ref(self, index: int) -> ObjectRef:
        return ObjectRef(self._manifest.object_id(index), self._hash_name)

    def size(self, index: int) -> int | None:
        return self._manifest.size(index)

    def fetch_ahead(self, index: int) -> None:
        self._store.fetch_ahead(self.ref(index), self.size(index))


def _children_of(node: Node, path: str) -> Mapping[str, Node]:
    if not isinstance(node, DirNode):
        raise MetafileError(f"import {path}: its source is not a directory")
    return node.children()
