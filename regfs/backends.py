"""The requests of each remote type (with regfs/cloudbackends.py, for SSH, Azure and GCS, the only
importer of fsspec backends, s3fs, botocore, aiohttp).

A `Backend` makes one request per call and knows nothing of retries (regfs/remotes.py does them):
`size(path)` is None for a missing object, `read(path, start, end)` the bytes of that range as the
remote sent them (fewer if the body was cut short), `stream(path, start, end)` the same bytes in
pieces as they arrive (by default one piece, `read`'s), `list(path)` names and sizes below a prefix.
A path is a string, or a `Version` (a path read at one version of a cloud-versioned remote).
`open_backend` builds one from DVC's option names. Which failures may go away when a request is
repeated, and how each is said in one line, is decided here, next to the libraries that raise them.

Local directories and S3 are fsspec filesystems (a local file's ranges are read in pieces, an S3
range comes whole); s3fs and botocore each make a single attempt per request (by default botocore
makes up to 4 and s3fs repeats that up to 5 times). HTTP is plain GET and HEAD requests on the
aiohttp session and event loop of fsspec's HTTPFileSystem, whose own `info` and `cat_file` are not
used: `info` reports any failed HEAD as a missing file (a 503 would become ENOENT), and `cat_file`
takes whatever body a Range request gets back. Its GETs are streamed, `PIECE` bytes at a time, so
a download needs no buffer of a whole range. An HTTP remote cannot be listed (as for DVC), so its
sizes come from HEAD requests, or from GETs of an object's first bytes where the caller would take
small objects whole (`Backend.sizes`: a server answers those as cheaply as a HEAD).

botocore's DEBUG log prints every request's headers, S3 session tokens included, and its signing
steps: its loggers are held at INFO, so that `--debug` shows regfs's own detail and no credential.
"""

import asyncio
import contextlib
import errno
import functools
import logging
import os
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiohttp
import fsspec
import fsspec.asyn
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import SSLError as BotoSSLError

from regfs.address import public_url
from regfs.dvcconfig import RemoteSpec, bool_value
from regfs.errors import ConfigError

for _name in ("botocore", "aiobotocore"):
    if logging.getLogger(_name).level == logging.NOTSET:  # unless someone chose a level on purpose
        logging.getLogger(_name).setLevel(logging.INFO)

CHUNK = 8 << 20  # bytes per ranged request, at most (a part of a download, see regfs/fetch.py)
PIECE = 1 << 20  # bytes per piece of a streamed body


class NotAsked(Exception):
    """The answer of a request `Backend.sizes` did not send, after another failed for good."""


NOT_ASKED = NotAsked("not asked: an earlier request failed for good")


@dataclass(frozen=True)
class Whole:
    """A size answer that brought the whole object along (`Backend.sizes` with `whole`)."""

    size: int
    body: bytes


class Fault(Exception):
    """A failed request said in regfs's words: a bad status, a broken promise of the protocol, or
    a library's error translated by the backend that called it (`transient` if worth repeating)."""

    transient = False

    def __init__(self, message: str, transient: bool | None = None):
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class ShortBody(Fault):
    """Fewer bytes than the range asked for: the connection ended early."""

    transient = True


class HTTPStatus(Fault):
    def __init__(self, status: int, reason: str | None):
        super().__init__(f"HTTP {status} {reason or ''}".strip(), transient=status >= 500 or status in (408, 429))


@dataclass(frozen=True)
class Version:
    """An object of a cloud-versioned remote: its path, read at one version (S3's VersionId,
    Azure's versionid, GCS's generation)."""

    path: str
    version_id: str


# What a request may raise besides FileNotFoundError (a missing object).
ERRORS = (Fault, OSError, ValueError, EOFError, BotoCoreError, ClientError, aiohttp.ClientError)
_TRANSIENT_ERRNOS = {errno.EIO, errno.EREMOTEIO, errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE}


class Backend:
    can_list = False
    # Entries one listing request returns, at most (its pages: S3 lists 1,000 keys a request), or
    # None where a listing costs per entry as a size request does (a local directory, SFTP).
    list_page: int | None = None
    # Downloads ahead of readers at once that pay off, or None: as many as read-ahead runs.
    ahead_limit: int | None = None
    asks_together = False  # whether `sizes` runs many size requests itself

    def warm(self) -> None:
        """Set up the client (libraries, session) now, so that the first request does not wait
        for it; asks the remote nothing. Nothing to do for most backends."""

    def size(self, path: str | Version) -> int | None:
        raise NotImplementedError

    def sizes(self, paths: list[str], at_once: int, whole: int = 0) -> list[int | Whole | None | BaseException]:
        """`size` of each path, `at_once` requests at a time (if `asks_together`), each answer in
        its place: the size, None (missing), or what its request raised. No request is sent after
        one failed for good (not `transient`), nor after `at_once` failed at all (a remote that
        stalls would hold the call for a timeout per `at_once` of them): those not sent answer
        `NOT_ASKED`. With `whole`, an object of at most `whole` bytes may be answered with its
        bytes (`Whole`), where asking for them costs no more than asking for its size."""
        raise NotImplementedError

    def read(self, path: str | Version, start: int, end: int) -> bytes:
        raise NotImplementedError

    def stream(self, path: str | Version, start: int, end: int) -> Iterator[bytes]:
        yield self.read(path, start, end)

    def list_tree(self, path: str) -> list[tuple[str, int]]:
        """(name, size) of the objects anywhere below `path`, in one listing of pages."""
        raise NotImplementedError

    def list(self, path: str) -> list[tuple[str, int]]:
        """(name, size) of the objects in the directory `path`."""
        raise NotImplementedError


class FsspecBackend(Backend):
    """The fsspec filesystem's own calls: local directories and S3 here, SSH, Azure and GCS in
    regfs/cloudbackends.py, whose subclasses translate their libraries' errors (`_translate`).

    `container` names what the first path component is ("bucket", "container"), if anything: a
    missing object whose container is missing too is said to be so, not just missing. Versions are
    read through `versioned()` (S3 needs a version-aware twin of the filesystem, whose listings
    would list every version), with the keyword `version_key` of `info` and `cat_file`.
    """

    can_list = True
    container = ""
    version_key = "version_id"

    def __init__(self, fs: fsspec.AbstractFileSystem | None,
                 versioned: Callable[[], fsspec.AbstractFileSystem] | None = None):
        self._fs = fs
        self._versioned = versioned

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self._fs

    def size(self, path: str | Version) -> int | None:
        with self._translated():
            fs, target, kwargs = self._target(path)
            try:
                return int(fs.info(target, **kwargs)["size"])
            except FileNotFoundError:
                self._check_container(fs, target)
                return None

    def read(self, path: str | Version, start: int, end: int) -> bytes:
        with self._translated():
            fs, target, kwargs = self._target(path)
            try:
                return fs.cat_file(target, start=start, end=end, **kwargs)
            except FileNotFoundError:  # a read of a known size asks no HEAD first: check here
                self._check_container(fs, target)
                raise

    def list_tree(self, path: str) -> list[tuple[str, int]]:
        with self._translated():
            entries = self.filesystem().find(path, detail=True)
        return [(name, int(entry["size"])) for name, entry in entries.items() if entry.get("type") == "file"]

    def list(self, path: str) -> list[tuple[str, int]]:
        with self._translated():
            try:
                entries = self.filesystem().ls(path, detail=True)
            except FileNotFoundError:
                return []
        return [(entry["name"], int(entry["size"])) for entry in entries if entry.get("type") == "file"]

    def _target(self, path: str | Version) -> tuple[fsspec.AbstractFileSystem, str, dict]:
        if not isinstance(path, Version):
            return self.filesystem(), path, {}
        if self._versioned is None:
            raise Fault(f"this remote type keeps no object versions (asked for version {path.version_id})")
        return self._versioned(), path.path, {self.version_key: path.version_id}

    def _check_container(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        """Raise a permanent fault if the bucket or container of a missing object is missing too
        (an `exists` would also say False when it cannot tell)."""
        name = path.split("/", 1)[0]
        if not self.container or not name:
            return
        try:
            fs.info(name)
        except FileNotFoundError:
            raise Fault(f"{self.container} '{name}' does not exist") from None
        except ERRORS:
            return  # cannot tell: the object is missing, which is all that is known

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, Fault):
            raise
        except Exception as exc:
            translated = self._translate(exc)
            if translated is None:
                raise
            raise translated from exc

    def _translate(self, exc: Exception) -> BaseException | None:
        """The error regfs should see instead of a library's own (None: keep it)."""
        return None


class LocalBackend(FsspecBackend):
    """A local directory: ranges are read from the file in pieces, as they would arrive.

    A download from it is work for a CPU (read, hash, write), not a wait: more of them at once
    than there are CPUs only take turns on Python's GIL, and slow the reads of the readers they
    are meant to serve (a cold `cp -r` took 14% longer with 8 than with 2 on 2 cores)."""

    ahead_limit = os.cpu_count() or 1

    def stream(self, path: str, start: int, end: int) -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # no buffered file: three syscalls fewer
        try:
            while start < end and (piece := os.pread(fd, min(PIECE, end - start), start)):
                start += len(piece)
                yield piece
        finally:
            os.close(fd)


_IDENTITY = {"Accept-Encoding": "identity"}  # sizes and ranges of the stored bytes, not of a gzip


class HTTPBackend(Backend):
    asks_together = True

    def __init__(self, client_kwargs: dict):
        from fsspec.implementations.http import HTTPFileSystem

        self._fs = HTTPFileSystem(skip_instance_cache=True, get_client=_http_session,
                                  client_kwargs=client_kwargs)

    def warm(self) -> None:
        fsspec.asyn.sync(self._fs.loop, self._fs.set_session)

    def size(self, path: str | Version) -> int | None:
        return fsspec.asyn.sync(self._fs.loop, self._head, _unversioned(path))

    def read(self, path: str | Version, start: int, end: int) -> bytes:
        return b"".join(self.stream(path, start, end))

    def stream(self, path: str | Version, start: int, end: int) -> Iterator[bytes]:
        loop = self._fs.loop
        if end - start <= PIECE:  # one piece: one trip to the event loop, not one per step
            yield fsspec.asyn.sync(loop, self._get_piece, _unversioned(path), start, end)
            return
        response = fsspec.asyn.sync(loop, self._get, _unversioned(path), start, end)
        left = end - start
        try:
            while left > 0 and (piece := fsspec.asyn.sync(loop, _read_some, response, min(left, PIECE))):
                left -= len(piece)
                yield piece
        finally:
            fsspec.asyn.sync(loop, _finish, response, left == 0)

    def sizes(self, paths: list[str], at_once: int, whole: int = 0) -> list[int | Whole | None | BaseException]:
        failures: list[BaseException] = []

        async def size(path: str, gate: asyncio.Semaphore) -> int | Whole | None | BaseException:
            async with gate:
                if len(failures) >= at_once or any(not transient(failure) for failure in failures):
                    return NOT_ASKED
                try:
                    url = _unversioned(path)
                    return await (self._size_by_get(url, whole) if whole else self._head(url))
                except Exception as exc:  # noqa: BLE001 - answered in its place, see Backend.sizes
                    failures.append(exc)
                    return exc

        async def every() -> list[int | Whole | None | BaseException]:
            gate = asyncio.Semaphore(at_once)
            return await asyncio.gather(*(size(path, gate) for path in paths))

        return fsspec.asyn.sync(self._fs.loop, every)

    async def _head(self, url: str) -> int | None:
        session = await self._fs.set_session()
        async with session.head(url, allow_redirects=True, headers=_IDENTITY) as response:
            if response.status == 404:
                return None
            _check_status(response)
            length = response.headers.get("Content-Length", "")
            if not length.isdigit():
                raise Fault("the server's HEAD answer gives no Content-Length")
            return int(length)

    async def _size_by_get(self, url: str, limit: int) -> int | Whole | None:
        """The size from a GET of the first `limit` bytes, with the object's bytes if it has no
        more (and the server sent them all). A larger object's first bytes are read and dropped
        (closing the connection would cost more), unless the server ignored the range: then the
        connection is closed. An answer that gives no size (416 for an empty object, no
        Content-Range) is followed by a HEAD."""
        session = await self._fs.set_session()
        headers = {**_IDENTITY, "Range": f"bytes=0-{limit - 1}"}
        async with session.get(url, headers=headers) as response:
            if response.status == 404:
                return None
            size = None
            if response.status != 416:
                _check_status(response)
                size = _total_size(response)
            if size is not None and size <= limit:
                body = await _read_up_to(response, size + 1)  # one more: a longer body is no answer
                if len(body) > size:
                    response.close()
                    raise Fault(f"more than the {size} bytes the server said the object has")
                # Shorter: a server that sends less of a range than asked (aiohttp raises if a body
                # breaks off before its Content-Length): the size is all it gave.
                return Whole(size, body) if len(body) == size else size
            if response.status == 206 and len(await _read_up_to(response, limit + 1)) <= limit:
                response.release()
            else:
                response.close()
        return size if size is not None else await self._head(url)

    async def _get_piece(self, url: str, start: int, end: int) -> bytes:
        """Bytes `start` to `end` (or fewer, if the body ends early), in one piece."""
        response = await self._get(url, start, end)
        try:
            piece = await response.content.read(end - start)
            while len(piece) < end - start and (more := await response.content.read(end - start - len(piece))):
                piece += more
        except BaseException:
            response.close()
            raise
        await _finish(response, len(piece) == end - start)
        return piece

    async def _get(self, url: str, start: int, end: int) -> aiohttp.ClientResponse:
        """The response to a GET of the range, its body not read yet (positioned at `start`)."""
        session = await self._fs.set_session()
        headers = {**_IDENTITY, "Range": f"bytes={start}-{end - 1}"}
        response = await session.get(url, headers=headers)
        try:
            if response.status == 404:
                raise FileNotFoundError(errno.ENOENT, "HTTP 404")
            _check_status(response)
            if response.status == 206:
                first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                if first != str(start):
                    raise Fault(f"asked for bytes from {start}, the server sent a range from {first or '?'}")
                return response
            skip = start  # 200: the server ignored Range and sends the whole object
            while skip:
                skip -= len(await response.content.readexactly(min(skip, CHUNK)))
            return response
        except BaseException:
            response.close()
            raise


async def _read_some(response: aiohttp.ClientResponse, size: int) -> bytes:
    """What has arrived of the body, up to `size` bytes, waiting only while nothing has: a reader
    waiting for the first bytes gets them as soon as they come. b"" at its end."""
    pieces = [await response.content.read(size)]
    count = len(pieces[0])
    while pieces[-1] and count < size:
        pieces.append(response.content.read_nowait(size - count))
        count += len(pieces[-1])
    return b"".join(pieces)


async def _read_up_to(response: aiohttp.ClientResponse, size: int) -> bytes:
    """The body, or its first `size` bytes if it is longer."""
    pieces, count = [], 0
    while count < size and (piece := await response.content.read(size - count)):
        pieces.append(piece)
        count += len(piece)
    return b"".join(pieces)


async def _finish(response: aiohttp.ClientResponse, complete: bool) -> None:
    """Give the connection back for reuse, or close it if its body was not read to the end."""
    if complete:
        response.release()
    else:
        response.close()


def _total_size(response: aiohttp.ClientResponse) -> int | None:
    """The object's size as the answer to a GET from its first byte gives it (None if it does not)."""
    if response.status == 206:
        span, _, total = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
        if not span.startswith("0-"):
            raise Fault(f"asked for bytes from 0, the server sent the range {span or '?'}")
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _unversioned(path: str | Version) -> str:
    if isinstance(path, Version):
        raise Fault(f"HTTP remotes keep no object versions (asked for version {path.version_id})")
    return path


async def _http_session(*, loop=None, connect_timeout: float, read_timeout: float, verify, **kwargs):
    """The aiohttp session of one HTTP remote (fsspec calls this in its event loop)."""
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout,
                                    sock_read=read_timeout)
    # trust_env: proxies from the environment and credentials from ~/.netrc, as DVC's http remote
    # does; but only where there is something to find, as it costs each request a trip through a
    # thread of the event loop's executor (a netrc lookup), about a third of a small GET's CPU time.
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=verify),
                                 trust_env=_environment_has_http_settings(), **kwargs)


def _environment_has_http_settings() -> bool:
    """Whether aiohttp's trust_env would find anything: a proxy variable, or a netrc file."""
    netrc = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    return bool(urllib.request.getproxies()) or os.path.exists(netrc)


def _check_status(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        raise HTTPStatus(response.status, response.reason)


def open_backend(spec: RemoteSpec, connect_timeout: float, read_timeout: float) -> tuple[Backend, str]:
    """The backend of a remote and the root its object paths are below."""
    if spec.is_local:
        return LocalBackend(fsspec.filesystem("file")), os.path.abspath(spec.url)
    scheme, _, rest = spec.url.partition("://")
    if scheme == "s3":
        options = _s3_options(spec, connect_timeout, read_timeout)
        fs = _s3_filesystem(options, version_aware=False)
        return S3Backend(fs, functools.cache(lambda: _s3_filesystem(options, version_aware=True))), rest
    if scheme in ("http", "https"):
        return HTTPBackend(_http_options(spec, connect_timeout, read_timeout)), public_url(spec.url)
    if scheme in ("ssh", "azure", "gs"):
        from regfs import cloudbackends

        return cloudbackends.open_backend(scheme, spec, connect_timeout, read_timeout)
    raise ConfigError(f"remote '{spec.name}': {scheme}:// remotes are not supported "
                      "(local, s3, http, https, ssh, azure and gs are)")


class S3Backend(FsspecBackend):
    container = "bucket"
    list_page = 1000

    def warm(self) -> None:
        # s3fs makes its botocore client on the first request: about 0.6 s (service models, endpoint).
        fsspec.asyn.sync(self._fs.loop, self._fs.set_session)


def _s3_filesystem(options: dict, version_aware: bool) -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False,
                           version_aware=version_aware, **options)
    fs.retries = 1  # s3fs's own retry loop around each botocore call
    return fs


def _s3_options(spec: RemoteSpec, connect_timeout: float, read_timeout: float) -> dict:
    """s3fs arguments for DVC's S3 remote options (dvc-s3 names them the same way)."""
    options = spec.options
    client: dict = {}
    config: dict = {"connect_timeout": connect_timeout, "read_timeout": read_timeout,
                    "retries": {"total_max_attempts": 1}}
    kwargs: dict = {"client_kwargs": client, "config_kwargs": config}
    if options.get("endpointurl"):
        client["endpoint_url"] = options["endpointurl"]
    if options.get("region"):
        client["region_name"] = options["region"]
    if "ssl_verify" in options:
        client["verify"] = _ssl_verify(options["ssl_verify"])
    for dvc_name, s3fs_name in (("access_key_id", "key"), ("secret_access_key", "secret"),
                                ("session_token", "token"), ("profile", "profile")):
        if options.get(dvc_name):
            kwargs[s3fs_name] = options[dvc_name]
    if "use_ssl" in options:
        kwargs["use_ssl"] = bool_value(options["use_ssl"])
    if bool_value(options.get("allow_anonymous_login", False)) and not kwargs.get("key"):
        kwargs["anon"] = True
    if options.get("credentialpath"):
        os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", options["credentialpath"])
    if options.get("configpath"):
        os.environ.setdefault("AWS_CONFIG_FILE", options["configpath"])
    return kwargs


def _http_options(spec: RemoteSpec, connect_timeout: float, read_timeout: float) -> dict:
    """aiohttp session arguments for DVC's HTTP remote options (dvc-http's names; `method` is for
    uploads only, so it is ignored)."""
    options, name = spec.options, spec.name
    auth = str(options.get("auth") or "").lower()
    parts = urlsplit(spec.url)
    kwargs: dict = {"connect_timeout": connect_timeout, "read_timeout": read_timeout,
                    "verify": _ssl_context(options["ssl_verify"]) if "ssl_verify" in options else True}
    if bool_value(options.get("ask_password", False)) and options.get("password") is None:
        raise ConfigError(f"remote '{name}': ask_password cannot prompt in regfs; give the password with "
                          f"--remote-config {name}.password=...")
    if parts.username is not None:  # user:password@ in the URL: basic authentication, as aiohttp does
        if auth:
            raise ConfigError(f"remote '{name}': give credentials either in the URL or with auth, not both")
        kwargs["auth"] = aiohttp.BasicAuth(unquote(parts.username), unquote(parts.password or ""))
    elif auth == "basic":
        if options.get("user") is None or options.get("password") is None:
            raise ConfigError(f"remote '{name}': auth = basic needs both user and password")
        kwargs["auth"] = aiohttp.BasicAuth(str(options["user"]), str(options["password"]))
    elif auth == "custom":
        if not options.get("custom_auth_header") or options.get("password") is None:
            raise ConfigError(f"remote '{name}': auth = custom needs both custom_auth_header and password")
        kwargs["headers"] = {str(options["custom_auth_header"]): str(options["password"])}
    elif auth:
        raise ConfigError(f"remote '{name}': auth = {auth} is not supported (basic and custom are; "
                          "DVC does not support digest either)")
    return kwargs


def _ssl_verify(value) -> bool | str:
    return bool_value(value) if str(value).lower() in ("true", "false") else value


def _ssl_context(value) -> bool | ssl.SSLContext:
    """DVC's ssl_verify: true, false, or the path of a CA bundle to trust."""
    verify = _ssl_verify(value)
    if isinstance(verify, bool):
        return verify
    try:
        return ssl.create_default_context(cafile=os.path.expanduser(verify))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ssl_verify: cannot load CA bundle {verify}: {exc}") from exc


_SECRET_OPTIONS = ("password", "passphrase", "secret_access_key", "session_token", "account_key", "sas_token",
                   "client_secret", "connection_string")


def option_secrets(options: dict) -> list[str]:
    """The secrets among a remote's options, and the keys and signatures inside an Azure
    connection string (`AccountKey=...;SharedAccessSignature=...`), each of which may be quoted alone."""
    values = [str(options[name]) for name in _SECRET_OPTIONS if options.get(name)]
    for part in str(options.get("connection_string") or "").split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() in ("accountkey", "sharedaccesssignature") and value:
            values.append(value)
    return values


def url_credentials(url: str) -> list[str]:
    """The user and password in a URL, as written and decoded."""
    if "://" not in url:
        return []
    parts = urlsplit(url)
    return [text for value in (parts.username, parts.password) if value for text in (value, unquote(value))]


def transient(exc: BaseException) -> bool:
    """Whether a failed request may succeed when repeated: 5xx, 408, 429, S3 throttling, refused,
    reset or timed-out connections, short bodies; never a refusal (401, 403), a certificate or URL
    error, or anything unrecognised."""
    if isinstance(exc, Fault):
        return exc.transient
    if isinstance(exc, (PermissionError, FileNotFoundError, BotoSSLError, aiohttp.ClientSSLError,
                        aiohttp.InvalidURL)):
        return False
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status >= 500 or exc.status in (408, 429)
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError, EOFError, aiohttp.ClientError,
                        HTTPClientError, BotoConnectionError, ResponseStreamingError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def reason(exc: BaseException) -> str:
    """One line saying why a request failed (S3 error codes kept, errno numbers dropped)."""
    text = _first_line(exc)
    if isinstance(exc, OSError) and isinstance(exc.__cause__, ClientError):  # s3fs's translation
        code = exc.__cause__.response.get("Error", {}).get("Code")
        return f"{code}: {text}" if code and code not in text else text
    if isinstance(exc, Fault) or text == type(exc).__name__:
        return text
    return f"{type(exc).__name__}: {text}"


def _first_line(exc: BaseException) -> str:
    """The first line of the exception's text, else of its cause's (fsspec raises a bare
    FSTimeoutError from aiohttp's timeouts), else the class name."""
    if isinstance(exc, OSError) and exc.strerror and exc.errno is not None:
        lines = [exc.strerror]  # not "[Errno 16] ...": the number means nothing to a reader
    else:
        lines = str(exc).strip().splitlines()
    if not lines and exc.__cause__ is not None:
        return _first_line(exc.__cause__)
    return lines[0] if lines else type(exc).__name__
