"""Getting objects into the cache, and their sizes, from the remote that holds them.

`ObjectStore` is one remote as the tree sees it: "give me a local path for this object" and "what
sizes do these objects have", answered from the cache, the size index, then the remote (the
entries of a `.dir` manifest all at once from the record the size index keeps of them). The remote
is opened lazily, so a registry whose remote is misconfigured still lists, and fails at read time
with an error that names the object and the remote.

`Fetcher` runs the downloads (regfs/download.py) of a process: one per object at a time, however
many threads want it (they wait for the one running; other processes wait on the cache's lock).
A download that knows the object's size (from the metafile, the size index, or the listing
before it) makes no HEAD request: an object of one part is exactly one GET. `stream` starts a
download in a thread of its own and gives it to streaming readers while it runs (`--stream`); an
object whose streamed bytes failed verification is never streamed again by this process.
"""

import logging
import os
import threading
import time
from collections.abc import Callable

from cachetools import LRUCache

from regfs.cache import ObjectCache, ObjectRef
from regfs.download import PART, Download
from regfs.errors import CacheError, IntegrityError, RegfsError, RemoteError
from regfs.manifest import Manifest, load_packed, parse_manifest
from regfs.remotes import Location, Remote
from regfs.stats import Stats

logger = logging.getLogger(__name__)

MANIFEST_MEMO_BYTES = 128 << 20
PACKED_MIN_ENTRIES = 1000  # smaller manifests parse in a few ms: no packed copy for them
WHOLE_ENTRY = 64 << 10  # see whole_limit
WHOLE_OUTPUT = 256 << 20


def whole_limit(total: int | None, entries: int) -> int:
    """How large an entry of a directory output of `total` bytes (as its metafile says) and
    `entries` files may be to come whole with its size (`Fetcher.fill_sizes`), or 0: only the
    entries of an output of small files (`WHOLE_ENTRY` on average, `WHOLE_OUTPUT` in all) do.
    Over HTTP each entry's size costs a request anyway (it cannot be listed), and a GET of
    `WHOLE_ENTRY` bytes costs the server what a HEAD does: the files are then cached at no more
    requests, before their reads; in all, at most the output's size."""
    small = total is not None and total <= WHOLE_OUTPUT and total <= WHOLE_ENTRY * entries
    return WHOLE_ENTRY if small else 0


class Fetcher:
    """Shared by every store of a process: the cache, the downloads running, the parsed-manifest memo."""

    def __init__(self, cache: ObjectCache, stats: Stats | None = None):
        self.cache = cache
        self.stats = stats or Stats()
        # Parsed manifests by object, up to MANIFEST_MEMO_BYTES of them (a 1M-entry one takes about 50 MB).
        self._manifests: LRUCache = LRUCache(maxsize=MANIFEST_MEMO_BYTES, getsizeof=lambda manifest: manifest.nbytes)
        self._manifest_lock = threading.Lock()
        self._downloads: dict[ObjectRef, Download] = {}
        self._unstreamable: LRUCache = LRUCache(maxsize=4096)  # objects whose streamed bytes were wrong
        self._lock = threading.Lock()

    def fetch(self, ref: ObjectRef, remote: Remote, size: int | None = None, ahead: bool = False) -> str:
        """The cache path of an object its caller did not find in the cache, downloaded now (or by
        whoever is downloading it already; one cached meanwhile is found under its lock);
        `ahead`: for read-ahead, not for a read (counted apart)."""
        if size is None:
            size = self.cache.sizes.get_many([ref]).get(ref)
        download, started = self._download(ref, size)
        if not started:
            return download.wait()
        if ahead:
            self.stats.add("readahead_fetches")
        return self._run(download, remote)

    def stream(self, ref: ObjectRef, remote: Remote, size: int) -> Download | None:
        """The download of a large object not cached yet, started in its own thread if need be;
        None when streaming would not help (small, cached) or must not (its bytes were wrong)."""
        with self._lock:
            if size <= PART or ref in self._unstreamable:
                return None
        if self.cache.find(ref) is not None:
            return None
        download, started = self._download(ref, size, streamed=True)
        if started:
            threading.Thread(target=self._run_streamed, args=(download, remote), daemon=True,
                             name="regfs-stream").start()
        return download

    def _download(self, ref: ObjectRef, size: int | None, streamed: bool = False) -> tuple[Download, bool]:
        """The download of `ref` running in this process, or a new one (True: the caller runs it)."""
        with self._lock:
            download = self._downloads.get(ref)
            if download is not None:
                return download, False
            download = self._downloads[ref] = Download(ref, size, streamed)
            return download, True

    def _run_streamed(self, download: Download, remote: Remote) -> None:
        try:
            self._run(download, remote, streamed=True)
        except RegfsError as exc:  # its readers get it (and the FUSE layer logs it), now or later
            logger.debug("streamed download of %s failed: %s", download.ref.object_id, exc)

    def _run(self, download: Download, remote: Remote, streamed: bool = False, body: bytes | None = None) -> str:
        """Run a registered download to its end, whatever the end, and tell its waiters (`body`:
        the object's bytes, already here)."""
        ref, started, path, error = download.ref, time.monotonic(), None, None
        fill = ((lambda writer: download.fill(writer, remote)) if body is None
                else (lambda writer: download.take(writer, body)))
        try:
            path = self.cache.install(ref, fill)
        except IntegrityError as exc:
            self.stats.remote_failed(remote.describe())
            error = IntegrityError(f"{exc} (downloaded from {remote.describe()}); nothing was cached")
            if streamed:
                self._streamed_wrong_bytes(ref, error)
            raise error from exc
        except RemoteError as exc:
            self.stats.remote_failed(remote.describe())
            error = type(exc)(f"cannot fetch object {ref.object_id}: {exc}")
            raise error from exc
        except CacheError as exc:
            error = CacheError(f"{exc} from {remote.describe()}")
            raise error from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                del self._downloads[ref]
            download.finish(path, error)
        if download.fetched:  # not when another process downloaded it while we waited
            seconds = time.monotonic() - started
            self.cache.usage.set_origin(ref.relpath, remote.describe())
            self.stats.fetched(remote.describe(), download.size, seconds)
            logger.info("fetched %s (%d bytes) from %s in %.2fs", ref.object_id, download.size,
                        remote.describe(), seconds)
        return path

    def keep(self, ref: ObjectRef, body: bytes, remote: Remote) -> None:
        """Cache an object whose bytes came with its size (`Remote.sizes` with `whole`), unless
        it is being downloaded already. A failure is only logged: a read fetches it again."""
        download, started = self._download(ref, len(body))
        if not started:
            return
        try:
            self._run(download, remote, body=body)
        except RegfsError as exc:
            logger.warning("%s; a read will fetch it again", exc)
        else:
            self.stats.add("fetched_with_size")

    def _streamed_wrong_bytes(self, ref: ObjectRef, error: IntegrityError) -> None:
        """One line about it, before any reader hears of it: readers that fail on it add none."""
        with self._lock:
            self._unstreamable[ref] = True
        logger.error("%s; it was streamed to readers before its hash was checked, so they may have read "
                     "wrong bytes: their later reads fail with EIO", error)
        error.reported = True

    def install_empty(self, ref: ObjectRef) -> str:
        """Cache an object known to be empty without asking its remote; still verified by hash."""
        return self.cache.install(ref, lambda writer: None)

    def manifest(self, ref: ObjectRef, remote_of: Callable[[], Remote]) -> Manifest:
        with self._manifest_lock:
            manifest = self._manifests.get(ref)
        if manifest is not None:
            return manifest
        manifest = self._packed_manifest(ref)
        if manifest is None:
            fd = self.cache.open(ref, lambda: self.cache.find(ref) or self.fetch(ref, remote_of()))
            with os.fdopen(fd, "rb") as file:
                manifest = parse_manifest(file, f"manifest {ref.object_id}")
            if len(manifest) >= PACKED_MIN_ENTRIES:
                # Before any size is learned: the copy holds what the manifest's own bytes say.
                self.cache.keep_packed_manifest(ref, manifest.packed_parts(ref.relpath))
        with self._manifest_lock:
            if manifest.nbytes <= MANIFEST_MEMO_BYTES:
                self._manifests[ref] = manifest
        return manifest

    def _packed_manifest(self, ref: ObjectRef) -> Manifest | None:
        record = self.cache.packed_manifest(ref)
        if record is None:
            return None
        try:
            return load_packed(record, ref.relpath, f"manifest {ref.object_id}")
        except ValueError as exc:
            logger.warning("ignoring the packed copy of manifest %s: %s; parsing the manifest again",
                           ref.object_id, exc)
            return None

    def fill_sizes(self, ref: ObjectRef, manifest: Manifest, remote_of: Callable[[], Remote],
                   whole: int = 0) -> None:
        """Sizes for the entries of the manifest `ref` that have none: all at once from the record
        kept when they were last all known (one index row, not one per entry), else from `sizes`,
        then kept as such a record if all are known. A record that is not exactly this manifest's
        is ignored, and replaced. Raises what `sizes` raises (the remote cannot be asked).
        `whole`: entries up to that size are cached with their sizes where that costs the remote
        no more requests (see `whole_limit`)."""
        if manifest.sizes_known():
            return
        record = self.cache.sizes.manifest_sizes(ref.relpath)
        if record is not None:
            try:
                manifest.load_sizes(record, ref.relpath)
                return
            except ValueError as exc:
                logger.warning("ignoring the recorded sizes of the entries of manifest %s: %s; looking them "
                               "up again", ref.object_id, exc)

        def sizes_of(object_ids: list[str]) -> dict[str, int]:
            refs = [ObjectRef(object_id, ref.hash_name) for object_id in object_ids]
            return {entry_ref.object_id: size for entry_ref, size in self.sizes(refs, remote_of, whole).items()}

        manifest.fill_sizes(sizes_of)
        if manifest.sizes_known():
            self.cache.sizes.put_manifest_sizes(ref.relpath, manifest.sizes_record(ref.relpath))

    def sizes(self, refs: list[ObjectRef], remote_of: Callable[[], Remote], whole: int = 0) -> dict[ObjectRef, int]:
        """Sizes known to the index, the cache or the remote; missing objects are left out.
        `whole`: objects up to that size may be cached as their sizes are learned (see `fill_sizes`)."""
        found = self.cache.sizes.get_many(refs)
        learned = {}
        for ref in refs:
            if ref not in found and (size := self.cache.size(ref)) is not None:
                learned[ref] = size
        missing = [ref for ref in refs if ref not in found and ref not in learned]
        if missing:
            by_path, remote = {ref.relpath: ref for ref in missing}, remote_of()
            keep = (lambda relpath, body: self.keep(by_path[relpath], body, remote)) if whole else None
            for relpath, size in remote.sizes(list(by_path), whole, keep).items():
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

    def path(self, ref: ObjectRef, size: int | None = None) -> str:
        """A local path with the object's verified bytes, downloading them if needed (`size`, if
        known, spares asking the remote for it)."""
        cached = self._fetcher.cache.find(ref)
        if cached is not None:
            self._fetcher.stats.add("cache_hits")
            return cached
        self._fetcher.stats.add("cache_misses")
        return self._fetcher.fetch(ref, self.remote(), size)

    def fetch_ahead(self, ref: ObjectRef, size: int | None) -> None:
        """Cache an object before any read needs it (read-ahead), unless it is cached (checked
        first: a cached one must not open the remote, which may be unreachable)."""
        if self._fetcher.cache.find(ref) is None:
            remote = self.remote()
            with remote.ahead_slots:  # as many at once as pay off on this remote
                self._fetcher.fetch(ref, remote, size, ahead=True)

    def stream(self, ref: ObjectRef, size: int) -> Download | None:
        """The running download of a large object for streaming readers (see `Fetcher.stream`)."""
        download = self._fetcher.stream(ref, self.remote(), size)
        if download is not None:
            self._fetcher.stats.add("cache_misses")
        return download

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

    def fill_sizes(self, ref: ObjectRef, manifest: Manifest, whole: int = 0) -> None:
        self._fetcher.fill_sizes(ref, manifest, self.remote, whole)

    def sizes(self, refs: list[ObjectRef]) -> dict[ObjectRef, int]:
        return self._fetcher.sizes(refs, self.remote)

