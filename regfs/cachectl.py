"""Cache management: LRU eviction under a size cap, and what `regfs cache status|gc|verify` do.

Eviction removes the least recently used objects until the objects in the cache total at most the
cap. An object's recency is the later of its last use recorded by any regfs process (`usage.sqlite`,
written every few seconds) and its mtime (when it was written: the only clue for objects DVC wrote).
Never removed: temporary files (`regfs/tmp` is not even looked at), objects whose download lock is
held, objects held open by this process, and empty objects (they cost no bytes). Objects open in
other processes may be removed: on Linux unlink(2) removes the name only, so their descriptors keep
reading the same bytes and the space comes back when they close; their next open fetches again.
Empty prefix directories are left in place, as DVC leaves them (a concurrent download may be about
to rename an object into one).

`Evictor` is a mount's thread: a pass when fetches push the cache over its cap, when an object that
kept it over the cap is closed, and every `PERIOD` seconds (other processes write to the cache too).
"""

import logging
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from regfs.cache import CachedObject, CacheWatcher, ObjectCache
from regfs.errors import RegfsError, UsageError
from regfs.hashing import CHUNK, StreamHasher

logger = logging.getLogger(__name__)

PERIOD = 60.0  # seconds between passes of a mount's evictor when nothing wakes it
MIN_GAP = 1.0  # seconds between two passes at least: each pass lists the whole cache

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+) ?([kmgtp]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `500M`, `20G`, `1.5T`, `20GiB`, `1048576` (units are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"not a size: {text!r} (give bytes, or a number with K, M, G, T or P: 500M, 1.5T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


@dataclass
class Eviction:
    """One eviction pass: what it removed, and what the cache holds after it."""

    objects: int
    bytes: int
    removed: list[CachedObject] = field(default_factory=list)
    kept: int = 0  # objects it could not remove now: open here, or being downloaded
    failures: list[str] = field(default_factory=list)  # objects it cannot remove (permissions)

    @property
    def removed_bytes(self) -> int:
        return sum(found.size for found in self.removed)


def evict(cache: ObjectCache, cap: int) -> Eviction:
    """Remove least recently used objects until the objects total at most `cap` bytes."""
    cache.usage.flush()  # this process's latest uses count too
    found = list(cache.objects())
    result = Eviction(len(found), sum(item.size for item in found))
    if result.bytes <= cap:
        return result
    uses = cache.usage.last_uses()
    for item in sorted(found, key=lambda item: max(uses.get(item.ref.relpath, 0.0), item.mtime)):
        if result.bytes <= cap:
            break
        if item.size == 0:
            continue
        try:
            gone = cache.remove(item.ref)
        except OSError as exc:
            result.failures.append(f"{cache.path(item.ref)}: {exc.strerror}")
            continue
        if not gone:
            result.kept += 1
            continue
        result.removed.append(item)
        result.objects -= 1
        result.bytes -= item.size
    # Rows of objects that left the cache, by this pass or otherwise (`dvc gc`, by hand); one that
    # is back already (fetched again meanwhile) keeps its rows.
    present = {item.ref.relpath for item in found} - {item.ref.relpath for item in result.removed}
    cache.usage.forget(relpath for relpath in uses if relpath not in present
                       and not os.path.exists(os.path.join(cache.directory, relpath)))
    return result


def log_eviction(result: Eviction, cap: int) -> None:
    """One INFO line per pass that had to evict."""
    short = f"; still over the cap: {result.kept} objects open or being downloaded" \
        if result.bytes > cap and result.kept else ""
    logger.info("evicted %d objects (%s) to keep the cache under %s: it holds %d objects, %s%s",
                len(result.removed), format_size(result.removed_bytes), format_size(cap), result.objects,
                format_size(result.bytes), short)
    if result.failures:
        logger.warning("cannot evict %d objects, such as %s", len(result.failures), result.failures[0])


class Evictor(CacheWatcher):
    """A mount's thread keeping its cache under `cap` bytes."""

    def __init__(self, cache: ObjectCache, cap: int, period: float = PERIOD):
        self._cache, self.cap, self._period = cache, cap, period
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._scanned = 0  # bytes in the cache after the last pass
        self._added = 0  # bytes this process installed since that pass began
        self._over = False  # the last pass left the cache over its cap (objects in use)

    def start(self, stop: threading.Event) -> None:
        self._cache.watcher = self
        threading.Thread(target=self._run, args=(stop,), daemon=True, name="regfs-evict").start()

    def installed(self, size: int) -> None:
        with self._lock:
            self._added += size
            over = self._scanned + self._added > self.cap
        if over:
            self._wake.set()

    def released(self) -> None:
        if self._over:
            self._wake.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            self.run_pass()
            stop.wait(MIN_GAP)
            self._wake.wait(self._period)

    def run_pass(self) -> None:
        with self._lock:
            self._added = 0
        try:
            result = evict(self._cache, self.cap)
        except (OSError, RegfsError) as exc:
            logger.warning("cache eviction failed, trying again later: %s", exc)
            return
        with self._lock:
            self._scanned, self._over = result.bytes, result.bytes > self.cap
        if result.removed or result.bytes > self.cap:
            log_eviction(result, self.cap)
        else:
            logger.debug("cache holds %s in %d objects, cap %s", format_size(result.bytes), result.objects,
                         format_size(self.cap))


def open_cache(directory: str, shared_group: bool = False) -> ObjectCache:
    """An existing cache directory, for the `regfs cache` commands (they never create one)."""
    if not os.path.isdir(directory):
        raise UsageError(f"no cache at {directory}")
    return ObjectCache(directory, shared_group)


def status(cache: ObjectCache) -> dict:
    """What `regfs cache status` shows: objects and bytes in total and by the remote they came from,
    temporary files, and the bytes of regfs's own state."""
    origins = cache.usage.origins()
    remotes: dict[str, dict] = {}
    unknown = {"objects": 0, "bytes": 0}
    objects = total = 0
    for item in cache.objects():
        origin = origins.get(item.ref.relpath)
        entry = unknown if origin is None else remotes.setdefault(origin, {"objects": 0, "bytes": 0})
        entry["objects"] += 1
        entry["bytes"] += item.size
        objects += 1
        total += item.size
    temporary = cache.temporary_files()
    return {"cache_dir": cache.directory, "objects": objects, "bytes": total,
            "temporary_files": len(temporary), "temporary_bytes": sum(temporary),
            "state_bytes": cache.state_bytes(),
            "remotes": dict(sorted(remotes.items())), "unknown_origin": unknown}


@dataclass(frozen=True)
class Checked:
    """One object re-hashed by `verify`; `digest` is None if it could not be read (`problem` says why)."""

    item: CachedObject
    path: str
    digest: str | None = None
    problem: str | None = None
    dropped: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(cache: ObjectCache, jobs: int = 1) -> Iterator[Checked]:
    """Re-hash every object with its layout's hash (md5 for `files/md5/`, DVC 2's md5-dos2unix for
    legacy ones); unlink those whose bytes are not their id (corrupt, truncated)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        yield from pool.map(lambda item: _check(cache, item), cache.objects())


def _check(cache: ObjectCache, item: CachedObject) -> Checked:
    path = cache.path(item.ref)
    hasher = StreamHasher(item.ref.hash_name)
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            while chunk := file.read(CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return Checked(item, path)  # evicted since the listing: nothing left to check
    except OSError as exc:
        return Checked(item, path, problem=f"cannot read it: {exc.strerror}")
    digest = hasher.hexdigest()
    if digest == item.ref.digest:
        cache.mark_verified(item.ref, (info.st_ino, info.st_size, info.st_mtime_ns))
        return Checked(item, path, digest)
    problem = f"corrupt: its bytes hash to {digest} ({item.ref.hash_name}), not {item.ref.digest}"
    try:
        dropped = cache.remove(item.ref, wait=True, same_as=info)
    except OSError as exc:
        return Checked(item, path, digest, f"{problem}; cannot remove it: {exc.strerror}")
    if not dropped:
        return Checked(item, path, digest, f"{problem}; not removed: it was replaced meanwhile")
    cache.usage.forget([item.ref.relpath])
    cache.sizes.forget([item.ref.relpath])  # a size learned from the bad copy would be wrong
    return Checked(item, path, digest, problem, dropped=True)
