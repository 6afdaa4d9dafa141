"""Getting objects into the cache, and their sizes, from the remote that holds them.

`ObjectStore` is one remote as the tree sees it: "give me a local path for this object" and "what
sizes do these objects have", answered from the cache, the size index, then the remote. The remote
is opened lazily, so a registry whose remote is misconfigured still lists, and fails at read time
with an error that names the object and the remote.
"""

import logging
import os
import threading
import time
from collections.abc import Callable

from cachetools import LRUCache

from regfs.cache import ObjectCache, ObjectRef
from regfs.errors import CacheError, IntegrityError, RemoteError
from regfs.manifest import Manifest, parse_manifest
from regfs.remotes import Location, Remote
from regfs.stats import Stats

logger = logging.getLogger(__name__)

MANIFEST_MEMO_BYTES = 128 << 20


class Fetcher:
    """Shared by every store of a process: the cache and the parsed-manifest memo."""

    def __init__(self, cache: ObjectCache, stats: Stats | None = None):
        self.cache = cache
        self.stats = stats or Stats()
        # Parsed manifests by object, up to MANIFEST_MEMO_BYTES of them (a 1M-entry one takes about 50 MB).
        self._manifests: LRUCache = LRUCache(maxsize=MANIFEST_MEMO_BYTES, getsizeof=lambda manifest: manifest.nbytes)
        self._manifest_lock = threading.Lock()

    def fetch(self, ref: ObjectRef, remote: Remote) -> str:
        downloads = []

        def fill(writer) -> None:
            downloads.append(time.monotonic())
            for chunk in remote.stream(ref.relpath):
                writer.write(chunk)
            downloads.append(writer.size)

        path = self.cache.find(ref)
        if path is not None:
            return path
        try:
            path = self.cache.install(ref, fill)
        except IntegrityError as exc:
            self.stats.remote_failed(remote.describe())
            raise IntegrityError(f"{exc} (downloaded from {remote.describe()}); nothing was cached") from exc
        except RemoteError as exc:
            self.stats.remote_failed(remote.describe())
            raise type(exc)(f"cannot fetch object {ref.object_id}: {exc}") from exc
        except CacheError as exc:
            raise CacheError(f"{exc} from {remote.describe()}") from exc
        if downloads:  # not when another thread or process downloaded it while we waited
            started, size = downloads  # the size as downloaded: the object may be evicted already
            seconds = time.monotonic() - started
            self.cache.usage.set_origin(ref.relpath, remote.describe())
            self.stats.fetched(remote.describe(), size, seconds)
            logger.info("fetched %s (%d bytes) from %s in %.2fs", ref.object_id, size, remote.describe(),
                        seconds)
        return path

    def install_empty(self, ref: ObjectRef) -> str:
        """Cache an object known to be empty without asking its remote; still verified by hash."""
        return self.cache.install(ref, lambda writer: None)

    def manifest(self, ref: ObjectRef, remote_of: Callable[[], Remote]) -> Manifest:
        with self._manifest_lock:
            manifest = self._manifests.get(ref)
        if manifest is None:
            fd = self.cache.open(ref, lambda: self.cache.find(ref) or self.fetch(ref, remote_of()))
            with os.fdopen(fd, "rb") as file:
                manifest = parse_manifest(file, f"manifest {ref.object_id}")
            with self._manifest_lock:
                if manifest.nbytes <= MANIFEST_MEMO_BYTES:
                    self._manifests[ref] = manifest
        return manifest

    def sizes(self, refs: list[ObjectRef], remote_of: Callable[[], Remote]) -> dict[ObjectRef, int]:
        """Sizes known to the index, the cache or the remote; missing objects are left out."""
        found = self.cache.sizes.get_many(refs)
        learned = {}
        for ref in refs:
            if ref not in found and (size := self.cache.size(ref)) is not None:
                learned[ref] = size
        missing = [ref for ref in refs if ref not in found and ref not in learned]
        if missing:
            by_path = {ref.relpath: ref for ref in missing}
            for relpath, size in remote_of().sizes(list(by_path)).items():
                learned[by_path[relpath]] = size
        self.cache.sizes.put_many(learned)
        return {**found, **learned}


class ObjectStore:
    """Objects of one registry that live on one remote (named, or the default one)."""

    def __init__(self, fetcher: Fetcher, open_remote: Callable[[], Remote], label: str):
        self._fetcher = fetcher
        self._open_remote = open_remote
        self._remote: Remote | None = None
        self._lock = threading.Lock()
        self._locations: dict[str, Location] = {}  # objects of a cloud-versioned remote, by relpath
        self.label = label

    def remote(self) -> Remote:
        with self._lock:
            if self._remote is None:
                self._remote = self._open_remote()
                self._remote.add_locations(self._locations)
            return self._remote

    def locate(self, ref: ObjectRef, location: Location) -> None:
        """Where a cloud-versioned remote keeps this object (told as trees are built, before the
        remote is opened: the remote reads this mapping as it grows)."""
        self._locations[ref.relpath] = location

    def path(self, ref: ObjectRef) -> str:
        """A local path with the object's verified bytes, downloading them if needed."""
        cached = self._fetcher.cache.find(ref)
        if cached is not None:
            self._fetcher.stats.add("cache_hits")
            return cached
        self._fetcher.stats.add("cache_misses")
        return self._fetcher.fetch(ref, self.remote())

    @property
    def cache(self) -> ObjectCache:
        return self._fetcher.cache

    def url(self, ref: ObjectRef) -> str:
        """Where the object lives on its remote (a path for a local remote)."""
        return self.remote().object_url(ref.relpath)

    def path_of_empty(self, ref: ObjectRef) -> str:
        return self._fetcher.cache.find(ref) or self._fetcher.install_empty(ref)

    def manifest(self, ref: ObjectRef) -> Manifest:
        return self._fetcher.manifest(ref, self.remote)

    def sizes(self, refs: list[ObjectRef]) -> dict[ObjectRef, int]:
        return self._fetcher.sizes(refs, self.remote)

