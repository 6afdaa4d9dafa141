"""Remotes: where objects are downloaded from, with bounded retries (requests are in backends.py).

A `Remote` answers three questions about objects by their relative path (`files/md5/ab/cd...`):
stream its bytes, and its size, one by one or in bulk. Supported: local directories, S3, HTTP(S),
SSH/SFTP, Azure Blob and GCS, configured with DVC's option names. Errors come out as
`ObjectMissing` or `RemoteError` naming the remote and the last reason; credentials never appear
in them: `url` and `describe()` show the URL without its `user:password@`, and every reason is
scrubbed of the remote's secrets.

Retries. A download learns the object's size first (HEAD), then asks for it in ranges of at most
`CHUNK` bytes; a failed request is repeated from the first byte not yet delivered, never from the
start, and a body shorter than its range is a failed request (retried), never a short object and
never a corrupt one. Transient failures are retried: 5xx answers (S3's SlowDown and InternalError
included), 408 and 429, refused or reset connections, short bodies, timeouts. A missing object
(404, NoSuchKey) is never retried; a refusal (401, 403) and any other answer fail at once. The
budget of one object (each a remote option, `--remote-config NAME.read_timeout=5`):

- `connect_timeout` (default 10 s) bounds connecting; `read_timeout` (default 30 s) the silence
  within a request, waiting for its headers or for more of its body: a stall.
- After a failure regfs waits 0.25-0.5 s, then 0.5-1, 1-2, 2-4, 4-8 s (exponential, jittered so
  that readers failed together retry apart). It gives up after `retries` (default 5) retries in a
  row that delivered nothing, or when the next retry would start more than `retry_timeout`
  (default 60 s) after the download started or last delivered a range.
- So an object on a dead or stalled remote fails within retry_timeout + connect_timeout +
  read_timeout (100 s by default), on a remote that refuses quickly within about 16 s; a remote
  that keeps delivering ranges, however slowly, is never cut off.

`retries` and `retry_timeout` are regfs's own options (DVC has no such keys). Sizes (HEAD and
listing requests) get the same budget per request.

Cloud versioning. A `version_aware` or `worktree` remote keeps no content-addressed objects but
each output's files at their path in the registry, in versions. The stores that use a remote tell
it where such objects are (`add_locations`: relative path -> `Location`), and requests for them
go to that path and version; everything else about them, their names in the cache included, is
as for any object.
"""

import functools
import logging
import posixpath
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from regfs import backends
from regfs.address import public_url
from regfs.backends import CHUNK
from regfs.dvcconfig import RemoteSpec
from regfs.errors import ConfigError, ObjectMissing, RemoteError

logger = logging.getLogger(__name__)

_LIST_THRESHOLD = 8  # objects wanted below one prefix dir before a listing beats HEAD requests


@dataclass(frozen=True)
class Location:
    """Where a cloud-versioned remote keeps an object: its path below the remote's URL (the
    output's path in the registry) and the version to read (None: the current one)."""

    path: str
    version_id: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    retry_timeout: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    first_delay: float = 0.5
    max_delay: float = 8.0


class _Attempts:
    """The retry budget of one object: failures since the last delivered range, and since when."""

    def __init__(self, policy: RetryPolicy):
        self._policy = policy
        self.failures = 0
        self._since = self.started = time.monotonic()

    def progressed(self) -> None:
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
    def __init__(self, spec: RemoteSpec, backend: backends.Backend, root: str, policy: RetryPolicy):
        self.name = spec.name
        self.url = public_url(spec.url)
        self._backend = backend
        self._root = root.rstrip("/")
        self._policy = policy
        values = backends.option_secrets(spec.options) + backends.url_credentials(spec.url)
        self._secrets = sorted({str(value) for value in values if value}, key=len, reverse=True)
        self._located: list[Mapping[str, Location]] = []

    def describe(self) -> str:
        return f"remote '{self.name}' ({self.url})"

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

    def stream(self, relpath: str) -> Iterator[bytes]:
        """The object's bytes in chunks; raises ObjectMissing or RemoteError."""
        path, attempts = self._path(relpath), _Attempts(self._policy)
        size = self._retrying(attempts, relpath, lambda: self._backend.size(path))
        if size is None:
            raise ObjectMissing(f"object {relpath} is missing on {self.describe()}")
        offset = 0
        while offset < size:
            end = min(offset + CHUNK, size)
            chunk = self._retrying(attempts, relpath, functools.partial(self._read_range, path, offset, end))
            offset += len(chunk)
            yield chunk

    def _read_range(self, path: str, start: int, end: int) -> bytes:
        data = self._backend.read(path, start, end)
        if len(data) < end - start:
            raise backends.ShortBody(f"short body: {len(data)} of {end - start} bytes at offset {start}")
        if len(data) > end - start:
            raise backends.Fault(f"{len(data)} bytes for a range of {end - start} at offset {start}")
        return data

    def _retrying(self, attempts: _Attempts, relpath: str, request: Callable):
        """`request()` until it succeeds or the object's retry budget is spent."""
        while True:
            try:
                result = request()
            except FileNotFoundError as exc:
                raise ObjectMissing(f"object {relpath} is missing on {self.describe()}") from exc
            except backends.ERRORS as exc:
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
                time.sleep(delay)
            else:
                attempts.progressed()
                return result

    def _reason(self, exc: BaseException) -> str:
        text = re.sub(r"(\w+://)[^/@\s]*@", r"\1", backends.reason(exc))  # user:password@ in any URL
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def sizes(self, relpaths: list[str]) -> dict[str, int]:
        """Sizes of the objects that exist; missing ones are left out."""
        by_dir: dict[str | None, list[str]] = {}  # None: objects of a cloud-versioned remote, one by one
        for relpath in relpaths:
            by_dir.setdefault(None if self._location(relpath) else posixpath.dirname(relpath), []).append(relpath)
        lists = self._backend.can_list
        listed = {d for d, paths in by_dir.items() if d is not None and lists and len(paths) >= _LIST_THRESHOLD}
        single = [p for d, paths in by_dir.items() if d not in listed for p in paths]
        found: dict[str, int] = {}
        pool = ThreadPoolExecutor(max_workers=8)
        try:
            jobs = [pool.submit(self._list_sizes, d) for d in listed]
            jobs += [pool.submit(self._size, p) for p in single]
            for job in jobs:
                found.update(job.result())
        finally:
            # After a failure the caller has its answer: the requests still running end on their own.
            pool.shutdown(wait=False, cancel_futures=True)
        wanted = set(relpaths)
        return {relpath: size for relpath, size in found.items() if relpath in wanted}

    def _size(self, relpath: str) -> dict[str, int]:
        path = self._path(relpath)
        size = self._retrying(_Attempts(self._policy), relpath, lambda: self._backend.size(path))
        return {} if size is None else {relpath: size}

    def _list_sizes(self, reldir: str) -> dict[str, int]:
        path = self._path(reldir)
        entries = self._retrying(_Attempts(self._policy), reldir + "/", lambda: self._backend.list(path))
        prefix = self._root + "/"
        return {name.removeprefix(prefix): size for name, size in entries}


def open_remote(spec: RemoteSpec) -> Remote:
    policy = _policy(spec)
    backend, root = backends.open_backend(spec, policy.connect_timeout, policy.read_timeout)
    return Remote(spec, backend, root, policy)


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
