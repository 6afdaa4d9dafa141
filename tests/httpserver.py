"""A static HTTP server on 127.0.0.1 for DVC's http remote: GET, HEAD and Range requests, optional
basic authentication (stdlib, one thread per connection, HTTP/1.1 keep-alive).

It serves a directory, over HTTP or HTTPS (`self_signed_tls`), typically a local DVC remote that
`dvc push` filled, so the same objects are read over HTTP by `dvc pull` (the oracle) and by regfs.
Only `bytes=A-B`, `bytes=A-` and `bytes=-N` single ranges are understood; other Range headers get
the whole file, as RFC 9110 allows (and every one does with `ranges=False`). Nothing outside the directory is ever served.
"""

from __future__ import annotations

import base64
import http.server
import re
import ssl
import subprocess
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class BackgroundServer:
    """A threaded HTTP server on 127.0.0.1 and a free port, serving from a daemon thread; HTTPS
    with a `tls` context."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None):
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class HTTPRemoteServer(BackgroundServer):
    """`server = HTTPRemoteServer(directory, credentials=("user", "pw")).start()`; `server.url`."""

    def __init__(self, directory: Path, credentials: tuple[str, str] | None = None,
                 tls: ssl.SSLContext | None = None, ranges: bool = True, range_cap: int | None = None):
        self.directory = Path(directory).resolve()
        self.credentials = credentials
        self.ranges = ranges  # False: Range headers are ignored (whole files, 200), as RFC 9110 allows
        self.range_cap = range_cap  # at most this many bytes of a range (the rest is asked again)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        super().__init__(_handler_for(self), tls)

    def authorized(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return header == f"Basic {expected}"

    def file_for(self, url_path: str) -> Path | None:
        """The served file for a request path, or None (missing, a directory, or outside)."""
        relpath = unquote(urlsplit(url_path).path).lstrip("/")
        candidate = (self.directory / relpath).resolve()
        if candidate != self.directory and self.directory not in candidate.parents:
            return None
        return candidate if candidate.is_file() else None


def _handler_for(server: HTTPRemoteServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            server.requests.append((self.command, self.path, self.headers.get("Range")))
            if not server.authorized(self.headers.get("Authorization")):
                self._status(401, {"WWW-Authenticate": 'Basic realm="remote"'})
                return
            path = server.file_for(self.path)
            if path is None:
                self._status(404)
                return
            size = path.stat().st_size
            start, end = 0, size
            status = 200
            requested = _RANGE.match(self.headers.get("Range", "")) if server.ranges else None
            if requested and any(requested.groups()):
                first, last = requested.groups()
                if first:
                    start, end = int(first), min(size, int(last) + 1) if last else size
                else:
                    start, end = max(0, size - int(last)), size
                if start >= size or start >= end:
                    self._status(416, {"Content-Range": f"bytes */{size}"})
                    return
                if server.range_cap is not None:
                    end = min(end, start + server.range_cap)
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if body:
                with open(path, "rb") as file:
                    file.seek(start)
                    _copy(file, self.wfile, end - start)

        def _status(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args) -> None:
            pass  # the test's assertions, not stderr, report what was asked

    return Handler


def _copy(source, target, length: int) -> None:
    while length > 0:
        data = source.read(min(length, 1 << 20))
        if not data:
            raise OSError(f"file shrank while being served ({length} bytes short)")
        target.write(data)
        length -= len(data)



def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a new self-signed certificate for 127.0.0.1, and the certificate's
    path (the CA bundle a client must be given to trust it)."""
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", certificate],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    return context, certificate
