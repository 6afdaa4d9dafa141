"""Remotes: where objects are downloaded from, with bounded retries (requests are in backends.py).

A `Remote` answers three questions about objects by their relative path (`files/md5/ab/cd...`):
their bytes in a range, their size, one by one or in bulk. Supported: local directories, S3,
HTTP(S), SSH/SFTP, Azure Blob and GCS, configured with DVC's option names. Errors come out as
`ObjectMissing` or `RemoteError` naming the remote and the last reason; credentials never appear
in them: `url` and `describe()` show the URL without its `user:password@`, and every reason is
scrubbed of the remote's secrets.

Requests. Every request of every remote of a process takes one of the process's `RequestSlots`
(`--max-requests`, default 16) while it runs, so no more than that many are in flight at once;
waiting for a slot, or between retries, holds none. A remote's connections are reused (one
aiohttp session or s3fs client per remote).

Retries. `read` asks for a range of an object (a download asks for parts of at most `CHUNK`
bytes, see regfs/download.py, and knows the object's size beforehand); a failed request is repeated
from the first byte not yet delivered, never from the start of the range, and a body that ends
before its range does is a failed request (retried), never a short object and never a corrupt one
(if the remote's object is shorter than the range, the read fails at once with IntegrityError).
Transient failures are retried: 5xx answers (S3's SlowDown and InternalError included), 408 and
429, refused or reset connections, short bodies, timeouts. A missing object (404, NoSuchKey) is
never retried; a refusal (401, 403) and any other answer fail at once. The budget of one range
(each a remote option, `--remote-config NAME.read_timeout=5`):

- `connect_timeout` (default 10 s) bounds connecting; `read_timeout` (default 30 s) the silence
  within a request, waiting for its headers or for more of its body: a stall.
- After a failure regfs waits 0.25-0.5 s, then 0.5-1, 1-2, 2-4, 4-8 s (exponential, jittered so
  that readers failed together retry apart). It gives up after `retries` (default 5) retries in a
  row that failed (a request cut off after some bytes failed too, though its retry asks only for
  the rest), or when the next retry would start more than `retry_timeout` (default 60 s) after
  the range's first request or the last bytes that arrived.
- So a range on a dead or stalled remote fails within retry_timeout + connect_timeout +
  read_timeout (100 s by default), on a remote that refuses quickly within about 16 s; a request
  that keeps receiving bytes, however slowly, is never cut off. The parts of one download run at
  the same time, each with its own budget: the first part that fails fails the download.

`retries` and `retry_timeout` are regfs's own options (DVC has no such keys). Sizes (HEAD and
listing requests) get the same budget per request.

Cloud versioning. A `version_aware` or `worktree` remote keeps no content-addressed objects but
each output's files at their path in the registry, in versions. The stores that use a remote tell
it where such objects are (`add_locations`: relative path -> `Location`), and requests for them
go to that path and version; everything else about them, their names in the cache included, is
as for any object.
"""

import contextlib
import logging
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from regfs import backends
from regfs.address import public_url
from regfs.dvcconfig import MAX_REQUESTS, RemoteSpec
from regfs.errors import ConfigError, IntegrityError, ObjectMissing, RemoteError

logger = logging.getLogger(__name__)

_LIST_THRESHOLD = 8  # objects wanted below one prefix dir before a listing beats HEAD requests
_SIZE_THREADS = 8  # requests for sizes at once, per call
_TOGETHER = 1024  # sizes asked of a backend in one call, at most (`Backend.sizes`)
_WHOLE_BYTES = 16 << 20  # of the objects a call may bring whole, at most
_SAMPLE_MIN = 16  # objects wanted before a listing of one prefix dir decides how to ask for the rest


class _ListingRefused(Exception):
    """The remote refused a listing: ask for the sizes of its objects one by one."""


@dataclass(frozen=True)
class Location:
    """Where a cloud-versioned remote keeps an object: its path below the remote's URL (the
    output's path in the registry) and the version to read (None: the current one)."""

    path: str
    version_id: str | None = None


class RequestSlots:
    """The process-wide cap on requests in flight: `with slots:` around each request."""

    def __init__(self, limit: int = MAX_REQUESTS):
        if limit < 1:
            raise ConfigError(f"the number of requests in flight must be at least 1, not {limit}")
        self.limit = limit
        self._semaphore = threading.BoundedSemaphore(limit)
        self._taking = threading.Lock()

    def __enter__(self) -> None:
        self._semaphore.acquire()

    def __exit__(self, *exc_info) -> None:
        self._semaphore.release()

    @contextlib.contextmanager
    def many(self, count: int) -> Iterator[int]:
        """`count` slots (the cap, if lower) for requests run together; yields how many. They are
        taken under a lock: two takers never each hold part of what both wait for."""
        count = min(count, self.limit)
        with self._taking:
            for _ in range(count):
                self._semaphore.acquire()
        try:
            yield count
        finally:
            for _ in range(count):
                self._semaphore.release()


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    retry_timeout: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    first_delay: float = 0.5
    max_delay: float = 8.0


class _Attempts:
    """The retry budget of one range: failed requests in a row, and when bytes last arrived."""

    def __init__(self, policy: RetryPolicy, started: float | None = None):
        self._policy = policy
        self.failures = 0
        self._since = self.started = time.monotonic() if started is None else started

    def delivered(self) -> None:
        """Bytes arrived: the retry timeout counts from now."""
        self._since = time.monotonic()

    def succeeded(self) -> None:
        self.failures, self._since = 0, time.monotonic()

    def next_delay(self) -> float | None:
        """Seconds to wait before retrying after one more failure, or None to give up."""
        self.failures += 1
        if self.failures > self._policy.retries:
            return None
        ceiling = min(self._policy.max_delay, self._policy.first_delay * 2 ** (self.failures - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if time.monotonic() + delay - self._since > self._policy.retry_timeout:
            return None
        return delay


class Remote:
    def __init__(self, spec: RemoteSpec, backend: backends.Backend, root: str, policy: RetryPolicy,
                 slots: RequestSlots):
        self.name = spec.name
        self.url = public_url(spec.url)
        self._backend = backend
        self._root = root.rstrip("/")
        self._policy = policy
        self._slots = slots
        values = backends.option_secrets(spec.options) + backends.url_credentials(spec.url)
        self._secrets = sorted({str(value) for value in values if value}, key=len, reverse=True)
        self._located: list[Mapping[str, Location]] = []
        self._lists = backend.can_list  # False once a listing was refused
        self._lists_lock = threading.Lock()
        limit = backend.ahead_limit
        # Taken by each download ahead of readers (read-ahead) while it runs.
        self.ahead_slots = threading.BoundedSemaphore(limit) if limit else contextlib.nullcontext()

    def describe(self) -> str:
        return f"remote '{self.name}' ({self.url})"

    def warm(self) -> None:
        """Set up the client now (see `Backend.warm`)."""
        self._backend.warm()

    def add_locations(self, locations: Mapping[str, Location]) -> None:
        """Read the objects named in `locations` (which may still grow) where they are."""
        self._located.append(locations)

    def _location(self, relpath: str) -> Location | None:
        for locations in self._located:
            location = locations.get(relpath)
            if location is not None:
                return location
        return None

    def _path(self, relpath: str) -> str | backends.Version:
        location = self._location(relpath)
        if location is None:
            return posixpath.join(self._root, relpath)
        path = posixpath.join(self._root, location.path)
        return backends.Version(path, location.version_id) if location.version_id else path

    def object_url(self, relpath: str) -> str:
        """Where the object lives on the remote, as a URL (a path for a local remote)."""
        location = self._location(relpath)
        if location is None:
            return self.url.rstrip("/") + "/" + relpath
        version = f"?version_id={location.version_id}" if location.version_id else ""
        return self.url.rstrip("/") + "/" + location.path + version

    def size(self, relpath: str) -> int:
        """The object's size (one HEAD or stat); raises ObjectMissing or RemoteError."""
        size = self._size(relpath).get(relpath)
        if size is None:
            raise ObjectMissing(f"object {relpath} is missing on {self.describe()}")
        return size

    def read(self, relpath: str, start: int, end: int, write: Callable[[int, bytes], None]) -> None:
        """Bytes `start` to `end` of the object, handed to `write(offset, piece)` in order as they
        arrive; raises ObjectMissing, RemoteError, or IntegrityError if the object is shorter.
        What `write` raises ends the read at once."""
        path, attempts, position = self._path(relpath), _Attempts(self._policy), start

        def request() -> None:
            nonlocal position
            with self._slots, contextlib.closing(self._backend.stream(path, position, end)) as pieces:
                for piece in pieces:
                    if len(piece) > end - position:
                        raise backends.Fault(f"{len(piece)} bytes for the {end - position} left of a range "
                                             f"at offset {position}")
                    write(position, piece)
                    position += len(piece)
                    attempts.delivered()
                if position < end:
                    self._check_length(path, relpath, end)
                    raise backends.ShortBody(f"short body: it ended at offset {position} of {end}")

        self._retrying(attempts, relpath, request)

    def _check_length(self, path: str, relpath: str, end: int) -> None:
        """After a body that ended early without an error: is the object itself that short?"""
        size = self._backend.size(path)
        if size is not None and size < end:
            raise IntegrityError(f"object {relpath} is {size} bytes on {self.describe()}, shorter than the "
                                 f"{end} its metafile records")

    def _retrying(self, attempts: _Attempts, relpath: str, request: Callable):
        """`request()` until it succeeds or the object's retry budget is spent."""
        while True:
            try:
                result = request()
            except backends.ERRORS as exc:
                time.sleep(self._failure(attempts, relpath, exc))
            else:
                attempts.succeeded()
                return result

    def _failure(self, attempts: _Attempts, relpath: str, exc: BaseException) -> float:
        """After a failed request for `relpath`: the seconds to wait before the next, or what the
        caller gets (ObjectMissing, RemoteError) raised from `exc`."""
        if isinstance(exc, FileNotFoundError):
            raise ObjectMissing(f"object {relpath} is missing on {self.describe()}") from exc
        reason = self._reason(exc)
        if not backends.transient(exc):
            raise RemoteError(f"cannot read {relpath} from {self.describe()}: {reason}") from exc
        delay = attempts.next_delay()
        if delay is None:
            raise RemoteError(
                f"cannot read {relpath} from {self.describe()}: {reason} (gave up after "
                f"{attempts.failures} failed attempts, {time.monotonic() - attempts.started:.1f} s)"
            ) from exc
        logger.warning("reading %s from %s failed (%s); retry %d of %d in %.1f s", relpath,
                       self.describe(), reason, attempts.failures, self._policy.retries, delay)
        return delay

    def _reason(self, exc: BaseException) -> str:
        text = re.sub(r"(\w+://)[^/@\s]*@", r"\1", backends.reason(exc))  # user:password@ in any URL
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def sizes(self, relpaths: list[str], whole: int = 0,
              keep: Callable[[str, bytes], None] | None = None) -> dict[str, int]:
        """Sizes of the objects that exist; missing ones are left out.

        One request per object (HEAD, stat), or listings of the prefix directories (`ab/` of
        `files/md5/ab/cd...`) that hold them, whichever asks less: see `_listings`. With `whole`
        and `keep`, a remote that asks for sizes together (HTTP) GETs the first `whole` bytes of
        each object instead of a HEAD, and hands the objects no bigger to `keep(relpath, bytes)`,
        from a thread of this call (never from the backend's event loop)."""
        by_dir: dict[str | None, list[str]] = {}  # None: objects of a cloud-versioned remote, one by one
        for relpath in relpaths:
            by_dir.setdefault(None if self._location(relpath) else posixpath.dirname(relpath), []).append(relpath)
        found: dict[str, int] = {}
        single = by_dir.pop(None, [])
        trees, listed = self._listings(by_dir, found) if self._lists else (set(), set())
        single += [p for d, paths in by_dir.items() if d not in listed and posixpath.dirname(d) not in trees
                   for p in paths]
        pool = ThreadPoolExecutor(max_workers=_SIZE_THREADS)
        # Objects asked one by one go in a few batches per thread, not a job each: a job costs
        # more CPU than a stat of a local remote (1,000 futures took a tenth of a cold `cp -r`'s
        # Python), and a few per thread still let fast threads take the slow ones' share.
        batch = max(1, -(-len(single) // (_SIZE_THREADS * 4)))
        failed = threading.Event()
        try:
            under = {tree: [p for d, paths in by_dir.items() if posixpath.dirname(d) == tree for p in paths]
                     for tree in trees}
            jobs = [pool.submit(self._listed_sizes, tree, under[tree], failed, True) for tree in trees]
            jobs += [pool.submit(self._listed_sizes, d, by_dir[d], failed) for d in listed]
            if self._backend.asks_together and single:
                jobs.append(pool.submit(self._sizes_together, single, whole if keep else 0, keep))
            else:
                jobs += [pool.submit(self._sizes_one_by_one, single[i:i + batch], failed)
                         for i in range(0, len(single), batch)]
            for job in jobs:
                found.update(job.result())
        except BaseException:
            failed.set()  # batches still running stop after their current request
            raise
        finally:
            # After a failure the caller has its answer: the requests still running end on their own.
            pool.shutdown(wait=False, cancel_futures=True)
        wanted = set(relpaths)
        return {relpath: size for relpath, size in found.items() if relpath in wanted}

    def _listings(self, by_dir: dict[str, list[str]], found: dict[str, int]) -> tuple[set[str], set[str]]:
        """Which listings to ask for sizes, as (trees to list whole, prefix directories to list).

        Without pages (`Backend.list_page` None: a listing costs a request per entry, as on a
        local disk), a prefix directory is listed when `_LIST_THRESHOLD` of its objects are wanted.
        With pages, what a listing costs depends on how full the store is: the directory with the
        most wanted objects is listed first (its answer goes into `found`, and the directory
        leaves `by_dir`: its objects are answered), and the store is assumed as full
        in every prefix directory. Then a directory is listed when it has more wanted objects than
        pages, and a whole tree of prefix directories (`files/md5/`, in pages one after another)
        when its pages are fewer than the rounds of `_SIZE_THREADS` requests at once it spares.
        The remote's root is never listed whole: a DVC 2 store there may hold a DVC 3 one."""
        page = self._backend.list_page
        if not page or sum(map(len, by_dir.values())) < _SAMPLE_MIN:
            return set(), {d for d, paths in by_dir.items() if len(paths) >= _LIST_THRESHOLD}
        sample = max(by_dir, key=lambda d: len(by_dir[d]))
        try:
            entries = self._list_sizes(sample)
        except _ListingRefused:
            return set(), set()
        found.update(entries)
        del by_dir[sample]
        pages = -(-max(len(entries), 1) // page)  # requests to list one prefix directory
        listed = {d for d, paths in by_dir.items() if len(paths) > pages}
        tree = posixpath.dirname(sample)
        requests = sum(pages if d in listed else len(paths) for d, paths in by_dir.items()
                       if posixpath.dirname(d) == tree)
        prefixes = 16 ** len(posixpath.basename(sample))  # prefix directories in the tree: ab/ has 256
        if tree and -(-max(len(entries), 1) * prefixes // page) * _SIZE_THREADS < requests:
            return {tree}, {d for d in listed if posixpath.dirname(d) != tree}
        return set(), listed

    def _sizes_one_by_one(self, relpaths: list[str], failed: threading.Event) -> dict[str, int]:
        found: dict[str, int] = {}
        for relpath in relpaths:
            if failed.is_set():
                break
            try:
                found.update(self._size(relpath))
            except BaseException:
                failed.set()  # the others stop too: the caller gets this failure
                raise
        return found

    def _sizes_together(self, relpaths: list[str], whole: int = 0,
                        keep: Callable[[str, bytes], None] | None = None) -> dict[str, int]:
        """Sizes asked for `_SIZE_THREADS` at a time by the backend itself (`Backend.sizes`: one
        trip to its event loop for many requests, instead of a thread's trip per request), while
        this thread holds as many request slots. Objects whose request failed are asked again
        together after the longest of their waits, each within its own retry budget, with those
        the backend did not ask (it stops after a refusal, which raises here, or after as many
        failures as requests at once). Objects that came whole (`whole`) go to `keep` after
        their call: fewer to a call then, so that their bytes in memory stay a few MiB."""
        found: dict[str, int] = {}
        together = _TOGETHER if not whole else max(1, _WHOLE_BYTES // whole)
        for begin in range(0, len(relpaths), together):
            pending, budgets = relpaths[begin:begin + together], {}
            while pending:
                started = time.monotonic()  # of the requests of this round, for their retry budgets
                with self._slots.many(_SIZE_THREADS) as at_once:
                    answers = self._backend.sizes([self._path(relpath) for relpath in pending], at_once, whole)
                final = next(((relpath, answer) for relpath, answer in zip(pending, answers)
                              if isinstance(answer, backends.ERRORS) and not backends.transient(answer)), None)
                if final is not None:  # the backend sent nothing after it (those answer NOT_ASKED)
                    self._failure(_Attempts(self._policy), *final)
                again, wait = [], 0.0
                for relpath, answer in zip(pending, answers):
                    if answer is backends.NOT_ASKED:
                        again.append(relpath)
                    elif isinstance(answer, BaseException):
                        if not isinstance(answer, backends.ERRORS):
                            raise answer
                        if relpath not in budgets:
                            budgets[relpath] = _Attempts(self._policy, started)
                        attempts = budgets[relpath]
                        wait = max(wait, self._failure(attempts, relpath, answer))
                        again.append(relpath)
                    elif isinstance(answer, backends.Whole):
                        found[relpath] = answer.size
                        keep(relpath, answer.body)
                    elif answer is not None:
                        found[relpath] = answer
                time.sleep(wait)
                pending = again
        return found

    def _size(self, relpath: str) -> dict[str, int]:
        path = self._path(relpath)
        size = self._retrying(_Attempts(self._policy), relpath, lambda: self._held(self._backend.size, path))
        return {} if size is None else {relpath: size}

    def _listed_sizes(self, reldir: str, relpaths: list[str], failed: threading.Event,
                      tree: bool = False) -> dict[str, int]:
        """`_list_sizes`, or the objects `relpaths` (all those wanted there) one by one if the
        remote refuses listings."""
        try:
            return self._list_sizes(reldir, tree)
        except _ListingRefused:
            return self._sizes_one_by_one(relpaths, failed)

    def _list_sizes(self, reldir: str, tree: bool = False) -> dict[str, int]:
        """Sizes of the objects in the directory `reldir`, or anywhere below it if `tree`.

        A remote that refuses a listing (a key allowed to read objects but not to list the
        bucket, a directory without read permission) raises `_ListingRefused` and is not asked
        for listings again: its objects are asked for one by one."""
        path = self._path(reldir)
        request = self._backend.list_tree if tree else self._backend.list
        try:
            entries = self._retrying(_Attempts(self._policy), reldir + "/", lambda: self._held(request, path))
        except RemoteError as exc:
            if not isinstance(exc.__cause__, PermissionError):
                raise
            with self._lists_lock:  # one warning, whatever the listings refused at once
                first, self._lists = self._lists, False
            if first:
                logger.warning("%s; asking for sizes one object at a time instead", exc)
            raise _ListingRefused from exc
        prefix = self._root + "/"
        return {name.removeprefix(prefix): size for name, size in entries}

    def _held(self, request: Callable, *args):
        with self._slots:
            return request(*args)


def open_remote(spec: RemoteSpec, slots: RequestSlots | None = None) -> Remote:
    """The remote `spec` describes; its requests take `slots` (the process's, or its own)."""
    policy = _policy(spec)
    backend, root = backends.open_backend(spec, policy.connect_timeout, policy.read_timeout)
    return Remote(spec, backend, root, policy, slots or RequestSlots())


def _policy(spec: RemoteSpec) -> RetryPolicy:
    """The retry budget from the remote's options (numbers, given as text in a config file)."""
    values = {}
    for field in fields(RetryPolicy):
        text = spec.options.get(field.name)
        if field.name in ("first_delay", "max_delay") or text in (None, ""):
            continue
        try:
            values[field.name] = field.type(text)
        except (TypeError, ValueError) as exc:
            what = "a whole number" if field.type is int else "a number of seconds"
            raise ConfigError(f"remote '{spec.name}': {field.name} must be {what}, not {text!r}") from exc
        if values[field.name] < 0:
            raise ConfigError(f"remote '{spec.name}': {field.name} cannot be negative")
    return RetryPolicy(**values)
