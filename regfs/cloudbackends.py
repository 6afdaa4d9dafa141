"""The backends of SSH/SFTP, Azure Blob and Google Cloud Storage remotes (sshfs over asyncssh,
adlfs, gcsfs), configured with DVC's option names (dvc-ssh, dvc-azure, dvc-gs).

Each library is imported only when a remote of its type is opened, and each makes one attempt
per request: regfs/remotes.py does the retrying (azure-core would retry 3 times with 15 s and more
between, gcsfs 6 times with up to 32 s). Their errors are translated here into what
regfs/backends.py classifies: FileNotFoundError for a missing object, and a `Fault` saying in one
line what failed, transient or not (a refused login, a missing container or a 403 is permanent; a
lost connection, a timeout or a 5xx is worth repeating). No credential goes into these lines.

SSH: one connection per remote, opened at the first request (so that a registry lists while its
SSH remote is down) and again after it broke. As DVC (and sshfs) do, the server's host key is not
checked against known_hosts; every object is verified by its hash before it is served, so a
server in the middle can deny service but cannot change a byte.

azure-core's request log and asyncssh's connection log are held at WARNING.
"""

import asyncio
import logging
import os
import threading

import aiohttp

from regfs.backends import Fault, FsspecBackend, Version
from regfs.dvcconfig import RemoteSpec, bool_value
from regfs.errors import ConfigError

# azure-core logs every request and response at INFO (headers redacted, but two dozen lines per
# object), asyncssh every connection and channel: a mount's log keeps regfs's own lines, and what
# these libraries say at WARNING and above (unless someone chose a level on purpose).
for _name in ("azure", "asyncssh"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

def open_backend(scheme: str, spec: RemoteSpec, connect_timeout: float,
                 read_timeout: float) -> tuple[FsspecBackend, str]:
    """The backend of an ssh://, azure:// or gs:// remote and the root its object paths are below."""
    if scheme == "ssh":
        return _ssh_backend(spec, connect_timeout, read_timeout)
    if scheme == "azure":
        return AzureBackend(spec, connect_timeout, read_timeout), spec.url.partition("://")[2]
    return GCSBackend(spec, connect_timeout, read_timeout), spec.url.partition("://")[2]


# -- SSH/SFTP ------------------------------------------------------------------------------------


class SSHBackend(FsspecBackend):
    def __init__(self, connect_args: dict):
        super().__init__(None)
        self._connect_args = connect_args
        self._lock = threading.Lock()

    def filesystem(self):
        with self._lock:
            if self._fs is None:
                from sshfs import SSHFileSystem

                try:
                    self._fs = SSHFileSystem(skip_instance_cache=True, **self._connect_args)
                except PermissionError as exc:  # sshfs's word for asyncssh's PermissionDenied
                    raise Fault(f"SSH login refused: {exc}") from exc
            return self._fs

    def read(self, path: str | Version, start: int, end: int) -> bytes:
        # sshfs's cat_file ignores ranges: read through a file, whose reads are pipelined.
        with self._translated():
            fs, target, _ = self._target(path)
            with fs.open(target, "rb") as file:
                file.seek(start)
                return file.read(end - start)

    def _translate(self, exc: Exception) -> BaseException | None:
        import asyncssh

        if isinstance(exc, asyncssh.sftp.SFTPNoSuchFile):
            return FileNotFoundError(exc.reason)
        if isinstance(exc, asyncssh.PermissionDenied):
            return Fault(f"SSH login refused: {exc.reason}")
        if isinstance(exc, (asyncssh.sftp.SFTPPermissionDenied, asyncssh.HostKeyNotVerifiable)):
            return Fault(f"{type(exc).__name__}: {exc.reason}")
        broken = (asyncssh.DisconnectError, asyncssh.ChannelOpenError, asyncssh.sftp.SFTPConnectionLost,
                  asyncio.TimeoutError, TimeoutError, ConnectionError)
        if isinstance(exc, broken) or (isinstance(exc, OSError) and not isinstance(exc, PermissionError)):
            with self._lock:
                self._fs = None  # connect again at the next attempt
            return Fault(f"SSH connection failed: {_ssh_text(exc)}", transient=True)
        if isinstance(exc, asyncssh.Error):
            return Fault(f"{type(exc).__name__}: {exc.reason}")
        return None


def _ssh_text(exc: Exception) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):  # fsspec's FSTimeoutError too
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # without "[Errno 111]"
    return getattr(exc, "reason", "") or str(exc) or type(exc).__name__


def _ssh_backend(spec: RemoteSpec, connect_timeout: float, read_timeout: float) -> tuple[SSHBackend, str]:
    """asyncssh connection arguments for DVC's SSH options (URL `ssh://[user@]host[:port]/path`;
    the options `user` and `port` win over the URL's, as in DVC)."""
    from fsspec.utils import infer_storage_options

    options, name = spec.options, spec.name
    parts = infer_storage_options(spec.url)
    args: dict = {"host": parts["host"], "known_hosts": None, "connect_timeout": connect_timeout,
                  # a silent server is given up after about read_timeout
                  "keepalive_interval": max(read_timeout / 3, 1), "keepalive_count_max": 3,
                  "encryption_algs": ["aes128-gcm@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr"],
                  "compression_algs": None}
    user = options.get("user") or parts.get("username")
    if user:
        args["username"] = str(user)
    port = options.get("port") or parts.get("port")
    if port:
        try:
            args["port"] = int(port)
        except ValueError as exc:
            raise ConfigError(f"remote '{name}': port must be a number, not {port!r}") from exc
    for secret in ("password", "passphrase"):
        if bool_value(options.get(f"ask_{secret}", False)) and options.get(secret) is None:
            raise ConfigError(f"remote '{name}': ask_{secret} cannot prompt in regfs; give it with "
                              f"--remote-config {name}.{secret}=...")
        if options.get(secret) is not None:
            args[secret] = str(options[secret])
    preferred = []
    if options.get("keyfile"):
        args["client_keys"] = [os.path.expanduser(str(options["keyfile"]))]
    if options.get("keyfile") or "passphrase" in args:
        preferred.append("publickey")
    if "password" in args:
        preferred += ["keyboard-interactive", "password"]
    if preferred:
        args["preferred_auth"] = preferred
    args["gss_auth"] = bool_value(options.get("gss_auth", False))
    if not bool_value(options.get("allow_agent", True)):
        args["agent_path"] = None
    return SSHBackend(args), parts["path"]


# -- Azure Blob ----------------------------------------------------------------------------------


class AzureBackend(FsspecBackend):
    """adlfs, with clients built here: one attempt per request and regfs's timeouts."""

    container = "container"
    list_page = 5000

    def __init__(self, spec: RemoteSpec, connect_timeout: float, read_timeout: float):
        kwargs = _azure_options(spec)
        client = {"retry_total": 0, "connection_timeout": connect_timeout, "read_timeout": read_timeout}
        super().__init__(_azure_filesystem(kwargs, client, version_aware=False))
        twin: list = []

        def versioned():
            if not twin:
                twin.append(_azure_filesystem(kwargs, client, version_aware=True))
            return twin[0]

        self._versioned = versioned

    def _target(self, path: str | Version):
        if isinstance(path, Version):  # adlfs's cat_file takes the version from the path only
            return self._versioned(), f"{path.path}?versionid={path.version_id}", {}
        return super()._target(path)

    def _translate(self, exc: Exception) -> BaseException | None:
        from azure.core import exceptions as azure

        if isinstance(exc, azure.ResourceNotFoundError):
            code = getattr(exc, "error_code", None) or ""
            if code == "ContainerNotFound":
                return Fault("container does not exist (ContainerNotFound)")
            return FileNotFoundError(code or "not found")
        status = getattr(exc, "status_code", None) or 0
        if isinstance(exc, azure.ClientAuthenticationError) or status in (401, 403):
            return Fault(f"authentication failed ({_azure_text(exc)})")
        if isinstance(exc, azure.HttpResponseError):
            return Fault(_azure_text(exc), transient=status >= 500 or status in (408, 429))
        if isinstance(exc, (azure.ServiceRequestError, azure.ServiceResponseError, azure.IncompleteReadError)):
            return Fault(f"{type(exc).__name__}: {_azure_text(exc)}", transient=True)
        if isinstance(exc, azure.AzureError):
            return Fault(f"{type(exc).__name__}: {_azure_text(exc)}")
        return None


def _azure_text(exc: Exception) -> str:
    """`HTTP 403 AuthorizationFailure`, or the first line of a failure without an HTTP answer."""
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # azure-storage's StorageErrorCode enum
    status = getattr(exc, "status_code", None)
    if status:
        return f"HTTP {status} {code or getattr(exc, 'reason', '') or ''}".strip()
    lines = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _azure_options(spec: RemoteSpec) -> dict:
    """adlfs arguments for DVC's Azure options; the URL is `azure://container/path`. As adlfs does,
    AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, ... count
    when the options are not given; with an account name and no secret, azure-identity's
    DefaultAzureCredential logs in (unless allow_anonymous_login)."""
    options = spec.options
    kwargs = {key: str(options[key]) for key in ("connection_string", "account_name", "account_key", "sas_token",
                                                 "tenant_id", "client_id", "client_secret")
              if options.get(key)}
    if bool_value(options.get("allow_anonymous_login", False)):
        kwargs["anon"] = True
    return kwargs


def _azure_filesystem(kwargs: dict, client: dict, version_aware: bool):
    from adlfs import AzureBlobFileSystem
    from azure.storage.blob.aio import BlobServiceClient

    class AzureFileSystem(AzureBlobFileSystem):
        def do_connect(self):
            if self.connection_string:
                self.service_client = BlobServiceClient.from_connection_string(self.connection_string, **client)
                return
            if not self.account_name:
                raise ValueError("an Azure remote needs connection_string or account_name")
            url = f"https://{self.account_name}.blob.core.windows.net"
            if self.sas_token and not (self.credential or self.account_key):
                url += self.sas_token if self.sas_token.startswith("?") else f"?{self.sas_token}"
            credential = self.credential or self.account_key or None
            self.service_client = BlobServiceClient(account_url=url, credential=credential, **client)

    try:
        return AzureFileSystem(skip_instance_cache=True, version_aware=version_aware, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"Azure remote: {exc}") from exc


# -- Google Cloud Storage ------------------------------------------------------------------------


class GCSBackend(FsspecBackend):
    container = "bucket"
    list_page = 1000
    version_key = "generation"

    def __init__(self, spec: RemoteSpec, connect_timeout: float, read_timeout: float):
        fs = _gcs_filesystem(spec, connect_timeout, read_timeout)
        super().__init__(fs, lambda: fs)

    def _translate(self, exc: Exception) -> BaseException | None:
        import google.auth.exceptions
        from gcsfs.retry import HttpError

        if isinstance(exc, HttpError):
            code = exc.code or 0
            return Fault(f"HTTP {code} {exc.message}".strip(), transient=code >= 500 or code in (408, 429))
        if isinstance(exc, OSError) and str(exc).startswith("Forbidden"):  # gcsfs's 403
            return Fault("HTTP 403 Forbidden")
        if isinstance(exc, google.auth.exceptions.TransportError):
            return Fault(f"GCS credentials: {type(exc).__name__}", transient=True)
        if isinstance(exc, google.auth.exceptions.GoogleAuthError):
            return Fault(f"GCS credentials: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def _gcs_filesystem(spec: RemoteSpec, connect_timeout: float, read_timeout: float):
    """gcsfs for DVC's GS options: `projectname`, `credentialpath` (a service account's JSON key),
    `endpointurl`, `allow_anonymous_login`. gcsfs's plain JSON-API filesystem, not the gRPC one that
    its package picks by default for zonal and hierarchical buckets (object reads are the same)."""
    from gcsfs.core import GCSFileSystem

    class OneAttempt(GCSFileSystem):
        _request = GCSFileSystem._request.__wrapped__  # without gcsfs's retry_request decorator

    options = spec.options
    kwargs: dict = {"consistency": None, "session_kwargs": {"trust_env": True},
                    "requests_timeout": aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                                              sock_connect=connect_timeout,
                                                              sock_read=read_timeout)}
    if options.get("projectname"):
        kwargs["project"] = str(options["projectname"])
    if bool_value(options.get("allow_anonymous_login", False)):
        kwargs["token"] = "anon"
    elif options.get("credentialpath"):
        kwargs["token"] = str(options["credentialpath"])
    if options.get("endpointurl"):
        kwargs["endpoint_url"] = str(options["endpointurl"])
    try:
        return OneAttempt(skip_instance_cache=True, **kwargs)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"remote '{spec.name}': cannot use its GCS credentials: {exc}") from exc
