"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (the moto S3 server or the
HTTP remote server): stdlib only, one thread per connection.

Every request is forwarded to the upstream and its answer sent back unchanged, unless the test
programmed a fault that matches it:

- `500`, `503`: that status with a short text body, without asking the upstream;
- `slowdown`: 503 with the XML error body S3 sends when it throttles (`<Code>SlowDown</Code>`);
- `reset`: the upstream's status, headers and the first part of its body, then a TCP reset;
- `truncate`: the same, then an orderly close: the full Content-Length was promised, less came;
- `stall`: the same, then silence with the connection open, until the fault is cleared or the
  proxy stops (at most `STALL_SECONDS`).

`inject(kind, times=N)` applies to the next N matching requests, `times=None` until `clear()`.
Body faults match GET requests, status faults GET and HEAD (or `methods=`/`match=`). The proxy
only fakes failures: every byte it sends is the upstream's, in order. `requests` records what was
asked (method, path, Range header) and which fault, if any, answered. Request bodies are
forwarded when they come with a Content-Length (chunked request bodies are not supported).
`max_in_flight` is the most requests it was answering at once (since `requests` was cleared by
`reset()`).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.httpserver import BackgroundServer, HTTPRemoteServer
from tests.registry import Registry, Tools

STATUS_KINDS = ("500", "503", "slowdown")
BODY_KINDS = ("reset", "truncate", "stall")
STALL_SECONDS = 120
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message>"
                 b"<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "content-length", "date", "server"}


@dataclass
class ProxyRequest:
    method: str
    path: str
    range: str | None
    fault: str | None = None

    @property
    def range_start(self) -> int | None:
        if not self.range or not self.range.startswith("bytes="):
            return None
        first = self.range[len("bytes="):].split("-")[0]
        return int(first) if first.isdigit() else None


@dataclass
class _Fault:
    kind: str
    remaining: int | None
    methods: tuple[str, ...]
    match: Callable[[ProxyRequest], bool] | None
    keep_bytes: int | None
    released: threading.Event


class FaultProxy(BackgroundServer):
    """`proxy = FaultProxy("http://127.0.0.1:PORT").start(); proxy.inject("reset", times=2)`"""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.requests: list[ProxyRequest] = []
        self.in_flight = self.max_in_flight = 0
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        super().__init__(_handler_for(self))

    def reset(self) -> None:
        """Forget the requests seen and the most in flight (faults stay)."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    def stop(self) -> None:
        self.clear()  # stalled handlers return
        super().stop()

    def inject(self, kind: str, times: int | None = None, *, methods: tuple[str, ...] | None = None,
               match: Callable[[ProxyRequest], bool] | None = None, keep_bytes: int | None = None) -> None:
        """Answer the next `times` matching requests (all, if None) with fault `kind`.
        `keep_bytes`: how much of the body a body fault sends first (default: half of it)."""
        if kind not in STATUS_KINDS + BODY_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        methods = methods or (("GET",) if kind in BODY_KINDS else ("GET", "HEAD"))
        with self._lock:
            self._faults.append(_Fault(kind, times, methods, match, keep_bytes, threading.Event()))

    def clear(self) -> None:
        """No more faults; stalled connections are closed."""
        with self._lock:
            faults, self._faults = self._faults, []
        for fault in faults:
            fault.released.set()

    def faulted(self, kind: str | None = None) -> list[ProxyRequest]:
        with self._lock:
            return [r for r in self.requests if r.fault is not None and (kind is None or r.fault == kind)]

    def _answered(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _take(self, request: ProxyRequest) -> _Fault | None:
        """Record `request` and the fault that answers it, if any (one use of that fault)."""
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            for fault in self._faults:
                if request.method in fault.methods and (fault.match is None or fault.match(request)):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining == 0:
                            self._faults.remove(fault)
                    request.fault = fault.kind
                    return fault
        return None


@contextlib.contextmanager
def registry_behind_proxy(tools: Tools, parent: Path, fill: Callable[[Registry], None]
                          ) -> Iterator[tuple[Registry, FaultProxy]]:
    """A registry that `fill` writes and `dvc add`s, its objects pushed to `parent/store`, which an
    HTTP server serves behind a proxy. Its committed default remote `web` is the server itself, so
    `dvc pull` (the oracle) reads over HTTP; mount with `--remote-config web.url=PROXY/store`."""
    server = HTTPRemoteServer(parent).start()
    proxy = FaultProxy(server.url).start()
    try:
        registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"})
        registry.dvc("remote", "add", "-d", "web", f"{server.url}/store")
        fill(registry)
        registry.push("-r", "store")
        registry.commit("data behind HTTP")
        yield registry, proxy
    finally:
        proxy.stop()
        server.stop()


def _handler_for(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy._take(ProxyRequest(self.command, self.path, self.headers.get("Range")))
            self._in_flight = True
            try:
                self._answer(fault, body)
            finally:
                self._done()

        def _done(self) -> None:
            """The request stops counting as in flight, once: just before its last byte goes out
            (the client may send its next request as soon as that byte is in)."""
            if self._in_flight:
                self._in_flight = False
                proxy._answered()

        def _answer(self, fault: _Fault | None, body: bytes | None) -> None:
            if fault is not None and fault.kind in STATUS_KINDS:
                self._fake_status(fault.kind)
                return
            try:
                status, reason, headers, data = self._forward(body)
            except OSError as exc:
                self._send(502, "Bad Gateway", [], f"upstream unreachable: {exc}".encode())
                return
            if fault is None:
                self._send(status, reason, headers, data)
                return
            keep = len(data) // 2 if fault.keep_bytes is None else min(fault.keep_bytes, len(data))
            self._send_head(status, reason, headers, len(data))
            self.wfile.write(data[:keep])
            self.wfile.flush()
            self.close_connection = True
            if fault.kind == "reset":
                # SO_LINGER 0: close() sends a RST instead of a FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            elif fault.kind == "stall":
                fault.released.wait(STALL_SECONDS)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
            connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {name: value for name, value in self.headers.items()
                           if name.lower() not in _HOP_BY_HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                kept = [(name, value) for name, value in response.getheaders()
                        if name.lower() not in _HOP_BY_HOP]
                if self.command == "HEAD":  # no body: keep the upstream's size
                    kept += [(name, value) for name, value in response.getheaders()
                             if name.lower() == "content-length"]
                return response.status, response.reason, kept, data
            finally:
                connection.close()

        def _fake_status(self, kind: str) -> None:
            status = 500 if kind == "500" else 503
            body = SLOWDOWN_BODY if kind == "slowdown" else f"injected fault: {kind}\n".encode()
            content_type = "application/xml" if kind == "slowdown" else "text/plain"
            self._send(status, None, [("Content-Type", content_type)], body)

        def _send(self, status: int, reason: str | None, headers: list[tuple[str, str]], data: bytes) -> None:
            with_body = self.command != "HEAD" and data
            self._send_head(status, reason, headers, len(data), last=not with_body)
            if with_body:
                self.wfile.write(data[:-1])
                self._done()
                self.wfile.write(data[-1:])

        def _send_head(self, status: int, reason: str | None, headers: list[tuple[str, str]],
                       length: int, last: bool = False) -> None:
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            if self.command != "HEAD" or not any(name.lower() == "content-length" for name, _ in headers):
                self.send_header("Content-Length", str(length))
            if last:
                self._done()
            self.end_headers()

        def log_message(self, format: str, *args) -> None:
            pass  # `requests` records what was asked

    return Handler
