"""Remotes: where objects are downloaded from (the only importer of fsspec backends).

A `Remote` answers three questions about objects by their relative path (`files/md5/ab/cd...`):
stream its bytes, and its size, one by one or in bulk. Supported: local directories and S3 (s3fs),
configured with DVC's option names. Errors come out as `ObjectMissing` or `RemoteError` naming the
remote; credentials never appear in messages (`describe` shows name and URL only).
"""

import logging
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec

from regfs.dvcconfig import RemoteSpec
from regfs.errors import ConfigError, ObjectMissing, RemoteError

logger = logging.getLogger(__name__)

CHUNK = 8 << 20
_LIST_THRESHOLD = 8  # objects wanted below one prefix dir before a listing beats HEAD requests

try:  # s3fs lets some botocore errors through untranslated
    from botocore.exceptions import BotoCoreError, ClientError

    _BACKEND_ERRORS: tuple = (OSError, ValueError, BotoCoreError, ClientError)
except ImportError:  # pragma: no cover - botocore comes with s3fs
    _BACKEND_ERRORS = (OSError, ValueError)


class Remote:
    def __init__(self, spec: RemoteSpec, fs: fsspec.AbstractFileSystem, root: str):
        self.name = spec.name
        self.url = spec.url
        self._fs = fs
        self._root = root.rstrip("/")

    def describe(self) -> str:
        return f"remote '{self.name}' ({self.url})"

    def _path(self, relpath: str) -> str:
        return posixpath.join(self._root, relpath)

    def stream(self, relpath: str) -> Iterator[bytes]:
        """The object's bytes in chunks; raises ObjectMissing or RemoteError."""
        try:
            with self._fs.open(self._path(relpath), "rb", block_size=CHUNK) as file:
                while chunk := file.read(CHUNK):
                    yield chunk
        except FileNotFoundError as exc:
            raise ObjectMissing(f"object {relpath} is missing on {self.describe()}") from exc
        except _BACKEND_ERRORS as exc:
            raise RemoteError(f"cannot read {relpath} from {self.describe()}: {_reason(exc)}") from exc

    def sizes(self, relpaths: list[str]) -> dict[str, int]:
        """Sizes of the objects that exist; missing ones are left out."""
        by_dir: dict[str, list[str]] = {}
        for relpath in relpaths:
            by_dir.setdefault(posixpath.dirname(relpath), []).append(relpath)
        listed = [d for d, paths in by_dir.items() if len(paths) >= _LIST_THRESHOLD]
        single = [p for d, paths in by_dir.items() if len(paths) < _LIST_THRESHOLD for p in paths]
        found: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=8) as pool:
            for result in pool.map(self._list_sizes, listed):
                found.update(result)
            for relpath, size in zip(single, pool.map(self._size, single)):
                if size is not None:
                    found[relpath] = size
        wanted = set(relpaths)
        return {relpath: size for relpath, size in found.items() if relpath in wanted}

    def _size(self, relpath: str) -> int | None:
        try:
            return int(self._fs.info(self._path(relpath))["size"])
        except FileNotFoundError:
            return None
        except _BACKEND_ERRORS as exc:
            raise RemoteError(f"cannot stat {relpath} on {self.describe()}: {_reason(exc)}") from exc

    def _list_sizes(self, reldir: str) -> dict[str, int]:
        try:
            entries = self._fs.ls(self._path(reldir), detail=True)
        except FileNotFoundError:
            return {}
        except _BACKEND_ERRORS as exc:
            raise RemoteError(f"cannot list {reldir} on {self.describe()}: {_reason(exc)}") from exc
        prefix = self._root + "/"
        return {entry["name"].removeprefix(prefix): int(entry["size"])
                for entry in entries if entry.get("type") == "file"}


def open_remote(spec: RemoteSpec) -> Remote:
    if spec.is_local:
        return Remote(spec, fsspec.filesystem("file"), os.path.abspath(spec.url))
    scheme, _, rest = spec.url.partition("://")
    if scheme == "s3":
        return Remote(spec, fsspec.filesystem("s3", **_s3_options(spec)), rest)
    raise ConfigError(f"remote '{spec.name}': {scheme}:// remotes are not supported yet (local and s3 are)")


def _s3_options(spec: RemoteSpec) -> dict:
    """s3fs arguments for DVC's S3 remote options (dvc-s3 names them the same way)."""
    options = spec.options
    client: dict = {}
    config: dict = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3}}
    kwargs: dict = {"client_kwargs": client, "config_kwargs": config}
    if options.get("endpointurl"):
        client["endpoint_url"] = options["endpointurl"]
    if options.get("region"):
        client["region_name"] = options["region"]
    if "ssl_verify" in options:
        verify = options["ssl_verify"]
        client["verify"] = _bool(verify) if str(verify).lower() in ("true", "false") else verify
    for dvc_name, s3fs_name in (("access_key_id", "key"), ("secret_access_key", "secret"),
                                ("session_token", "token"), ("profile", "profile")):
        if options.get(dvc_name):
            kwargs[s3fs_name] = options[dvc_name]
    if "use_ssl" in options:
        kwargs["use_ssl"] = _bool(options["use_ssl"])
    if _bool(options.get("allow_anonymous_login", False)) and not kwargs.get("key"):
        kwargs["anon"] = True
    for name in ("read_timeout", "connect_timeout"):
        if options.get(name):
            config[name] = float(options[name])
    if options.get("credentialpath"):
        os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", options["credentialpath"])
    if options.get("configpath"):
        os.environ.setdefault("AWS_CONFIG_FILE", options["configpath"])
    return kwargs


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
