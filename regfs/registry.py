"""A registry: one Git URL, its mirror, and the trees of its commits with their object stores.

`Context` holds what every registry of a process shares: the object cache, the fetcher, the open
files, the cap on requests in flight, the user's DVC config levels, opened remotes, and the
registries that imports lead to. The config of
a commit is its committed `.dvc/config` over the user's system/global levels, under the overrides
given on the command line; relative local remote URLs resolve against the registry's `.dvc/`,
which only exists for a registry given as a local directory.
"""

import logging
import os
import posixpath
import threading
import time
from dataclasses import dataclass

from cachetools import LRUCache

from regfs.address import is_local_url, local_path, public_url
from regfs.cache import ObjectCache, ObjectRef
from regfs.dvcconfig import Config, RemoteSpec, parse_config, user_levels
from regfs.dvcmeta import DirEntry, ImportSource, Output
from regfs.errors import (
    ConfigError,
    IntegrityError,
    MetafileError,
    RemoteError,
    RevisionNotFound,
    SourceError,
)
from regfs.fetch import Fetcher, ObjectStore
from regfs.files import OpenFiles
from regfs.git import Mirror
from regfs.remotes import MAX_REQUESTS, Remote, RequestSlots, open_remote
from regfs.tree import (
    DirNode,
    ImportedFileNode,
    LazyDirNode,
    Node,
    ObjectNode,
    OutputDirNode,
    TreeBuilder,
    lookup_optional,
    manifest_children,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    commit_sha: str
    commit_time: int
    root: DirNode


class Context:
    def __init__(self, cache_dir: str, shared_group: bool = False, max_requests: int = MAX_REQUESTS,
                 stream: bool = False):
        self.shared_group = shared_group
        self.cache = ObjectCache(cache_dir, shared_group)
        self.fetcher = Fetcher(self.cache)
        self.files = OpenFiles(stream=stream)
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
        self._configs: dict[str | None, Config] = {}
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

    def _build(self, commit_sha: str) -> Snapshot:
        config_blob = None
        items = self.mirror.walk(commit_sha)
        for item in items:
            if item.path == ".dvc/config" and item.kind == "file":
                config_blob = item.blob_id
        config = self._config(config_blob)
        builder = TreeBuilder(items, self.mirror.read_blob, self.mirror.blob_size,
                              lambda output: self._output_node(output, config, config_blob))
        return Snapshot(commit_sha, self.mirror.commit_time(commit_sha), builder.build())

    def _config(self, config_blob: str | None) -> Config:
        if config_blob not in self._configs:
            repo_level = Config()
            if config_blob is not None:
                text = self.mirror.read_blob(config_blob).decode("utf-8", "replace")
                base = os.path.join(self.local_dir, ".dvc") if self.local_dir else None
                try:
                    repo_level = parse_config(text, base)
                except ConfigError as exc:
                    logger.error("ignoring .dvc/config of %s: %s", self.public_url, exc)
            self._configs[config_blob] = self.context.user_config.merged(repo_level).merged(self.overrides)
        return self._configs[config_blob]

    def store(self, config: Config, config_key: str | None, remote_name: str | None) -> ObjectStore:
        key = (config_key, remote_name)
        if key not in self._stores:
            label = f"remote '{remote_name or config.core.get('remote') or '(default)'}' of {self.public_url}"
            self._stores[key] = ObjectStore(self.context.fetcher,
                                            lambda: self.context.remote(config.remote(remote_name)), label)
        return self._stores[key]

    def _output_node(self, output: Output, config: Config, config_key: str | None) -> Node | None:
        if output.import_source is not None:
            return self._import_node(output)
        if output.object_id is None:
            logger.warning("skipping output %s (%s): it has no md5, so there is nothing to pull",
                           output.path, output.metafile)
            return None
        store = self.store(config, config_key, output.remote)
        ref = ObjectRef(output.object_id, output.hash_name)
        if not output.is_dir:
            return ObjectNode(ref, store, output.size, output.is_exec)
        return OutputDirNode(lambda: self._dir_children(ref, store, output.path), output.path, ref, store)

    def _dir_children(self, ref: ObjectRef, store: ObjectStore, path: str) -> dict[str, Node]:
        try:
            entries = store.manifest(ref)
        except MetafileError as exc:
            logger.error("skipping output %s of %s: %s", path, self.public_url, exc)
            exc.reported = True
            raise
        refs = {entry.relpath: ObjectRef(entry.object_id, ref.hash_name) for entry in entries}
        unknown = [refs[entry.relpath] for entry in entries if entry.size is None]
        try:
            sizes = store.sizes(unknown) if unknown else {}
        except (RemoteError, ConfigError) as exc:
            # The remote cannot be asked (offline, say): each entry learns its size when stat'ed,
            # from the cache if it is there; only the others fail then, not the whole directory.
            logger.warning("sizes of the entries of %s in %s are not known yet: %s", path, self.public_url, exc)
            sizes = {}

        def file_node(entry: DirEntry) -> Node:
            entry_ref = refs[entry.relpath]
            size = entry.size if entry.size is not None else sizes.get(entry_ref)
            return ObjectNode(entry_ref, store, size, entry.is_exec)

        return manifest_children(entries, file_node)

    def _import_node(self, output: Output) -> Node:
        source = output.import_source

        def resolve() -> Node:
            return self._resolve_import(source, output)

        if output.is_dir:
            return LazyDirNode(lambda: _children_of(resolve(), output.path), output.path)
        return ImportedFileNode(resolve, output.size, output.is_exec)

    def _resolve_import(self, source: ImportSource, output: Output) -> Node:
        url = source.url
        if is_local_url(url) and not os.path.isabs(local_path(url)) and self.local_dir:
            url = os.path.normpath(os.path.join(self.local_dir, local_path(url)))
        registry = self.context.registry(url, _import_overrides(source))
        commit_sha = registry.resolve(source.rev_lock or source.rev or "HEAD")
        node = lookup_optional(registry.tree(commit_sha).root, posixpath.normpath(source.path))
        if node is None:
            raise SourceError(f"import {output.path}: {source.path} not found in {url}@{commit_sha[:12]}")
        if isinstance(node, ObjectNode) and node.ref.hash_name == output.hash_name \
                and node.ref.object_id != output.object_id and not output.is_dir:
            raise IntegrityError(f"import {output.path}: {url}@{commit_sha[:12]}:{source.path} is object "
                                 f"{node.ref.object_id}, the import recorded {output.object_id}")
        return node


def _children_of(node: Node, path: str) -> dict[str, Node]:
    if not isinstance(node, DirNode):
        raise MetafileError(f"import {path}: its source is not a directory")
    return node.children()


def _import_overrides(source: ImportSource) -> Config:
    overrides = Config()
    if isinstance(source.remote, str):
        overrides.core["remote"] = source.remote.lower()
    elif isinstance(source.remote, dict) and source.remote.get("url"):
        overrides.core["remote"] = "import"
        overrides.remotes["import"] = {str(k).lower(): v for k, v in source.remote.items()}
    return overrides

