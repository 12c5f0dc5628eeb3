"""A real HTTP proxy on loopback that injects storage faults in front of the test S3 server.

Requests are forwarded to the upstream server unchanged, except those with
the method and a decoded path ending with the key given to
:meth:`FaultProxy.inject`: the next ``times`` of them get the fault instead
(``times=None``: all of them).

Faults: ``"slowdown"`` answers 503 with S3's SlowDown error body; ``"reset"``
closes the connection with a TCP reset before answering; ``"delay"`` waits
``delay_s`` seconds before forwarding (longer than the client's read timeout).

``max_key_bytes`` makes the proxy enforce AWS's limit on object keys, which the
test server does not: a request for a key longer than that (in UTF-8 bytes) is
answered 400 KeyTooLongError, as AWS answers one over 1,024 bytes.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("slowdown", "reset", "delay")
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_KEY_TOO_LONG_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>KeyTooLongError</Code>'
    b"<Message>Your key is too long</Message></Error>"
)
AWS_MAX_KEY_BYTES = 1024


@dataclass
class _Fault:
    kind: str
    method: str
    remaining: int | None
    delay_s: float


class FaultProxy:
    """Threaded forwarding proxy; ``endpoint_url`` is what clients use instead of the upstream's."""

    def __init__(self, upstream_url: str, max_key_bytes: int | None = None) -> None:
        self.max_key_bytes = max_key_bytes
        self.keys_refused: list[str] = []
        parsed = urllib.parse.urlsplit(upstream_url)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.faults_served: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, key: str, kind: str, times: int | None, delay_s: float = 0.0, method: str = "GET") -> None:
        """Serve fault ``kind`` to the next ``times`` ``method`` requests for ``key`` (None: to every one).

        ``requests[key]`` and ``faults_served[key]`` count those requests from now on.
        """
        if kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {kind!r}")
        with self._lock:
            self._faults[key] = _Fault(kind, method, times, delay_s)
            self.requests[key] = 0
            self.faults_served[key] = 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        """The fault to serve to a ``method`` request for ``path`` now, counting requests and faults per key."""
        with self._lock:
            for key, fault in self._faults.items():
                if method != fault.method or not path.endswith("/" + key):
                    continue
                self.requests[key] += 1
                if fault.remaining == 0:
                    return None
                if fault.remaining is not None:
                    fault.remaining -= 1
                self.faults_served[key] += 1
                return fault
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except OSError:  # the client gave up (timeout) or the connection was reset on purpose
                    self.close_connection = True

            def _serve(self) -> None:
                body = self._read_body()
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                key = path.lstrip("/").split("/", 1)[1] if "/" in path.lstrip("/") else ""  # path style: /bucket/key
                if proxy.max_key_bytes is not None and len(key.encode("utf-8")) > proxy.max_key_bytes:
                    with proxy._lock:
                        proxy.keys_refused.append(key)
                    self._answer(400, [("Content-Type", "application/xml")], _KEY_TOO_LONG_BODY, head=self.command == "HEAD")
                    return
                fault = proxy._take_fault(self.command, path)
                if fault is not None and fault.kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None and fault.kind == "slowdown":
                    self._answer(503, [("Content-Type", "application/xml")], _SLOWDOWN_BODY, head=self.command == "HEAD")
                    return
                if fault is not None:
                    time.sleep(fault.delay_s)
                self._forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy._upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
                    self._answer(response.status, kept, data, head=self.command == "HEAD")
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, head: bool = False) -> None:
                self.send_response_only(status)
                for key, value in headers:
                    if key.lower() != "content-length" or head:
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                self.wfile.flush()

        return Handler
