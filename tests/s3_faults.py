"""A fault-injecting HTTP proxy for an S3-compatible endpoint (moto's server in the tests).

Requests pass through unchanged unless a fault rule matches them. Two kinds of rule:

- ``outage``: the proxy reads the request and closes the connection without an answer (the client sees a
  dropped connection, as when an endpoint restarts or a load balancer resets), for a time window or for the next N
  matching requests;
- ``brownout``: a share of the matching requests is answered ``503 SlowDown`` (S3's throttling reply).

Rules match by operation: ``list`` (GET on a bucket: ListObjects), ``read`` (GET/HEAD of an object), ``write``
(PUT/POST/DELETE), optionally narrowed to a bucket and a key pattern (a regular expression searched in the key).
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Fault:
    """One rule. ``count`` limits how many requests it hits (None: no limit), ``until`` is a ``time.monotonic()``
    deadline (None: none), ``after`` lets that many matching requests through first."""

    kind: str                      # "outage" | "brownout"
    op: str | None = None          # "list" | "read" | "write" | None (every request)
    bucket: str | None = None
    key_pattern: str | None = None
    count: int | None = None
    until: float | None = None
    after: int = 0
    rate: float = 1.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    seen: int = 0
    hits: int = 0

    def active(self) -> bool:
        return (self.count is None or self.hits < self.count) and (self.until is None or time.monotonic() < self.until)

    def matches(self, op: str, bucket: str, key: str) -> bool:
        return ((self.op is None or self.op == op) and (self.bucket is None or self.bucket == bucket)
                and (self.key_pattern is None or re.search(self.key_pattern, key) is not None))


def operation_of(method: str, path: str) -> tuple[str, str, str]:
    """(operation, bucket, key) of a path-style S3 request."""
    bucket, _, key = unquote(urlparse(path).path).lstrip("/").partition("/")
    if method in ("PUT", "POST", "DELETE"):
        return "write", bucket, key
    return ("read" if key else "list"), bucket, key


class FaultProxy:
    """The proxy's rules and counters; ``url`` is the endpoint to give clients."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules: list[Fault] = []
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.faulted: dict[str, int] = {}
        self.url = ""

    def outage(self, op: str | None = None, *, count: int | None = None, seconds: float | None = None,
               after: int = 0, bucket: str | None = None, key_pattern: str | None = None) -> Fault:
        """Drop matching requests: the next ``count`` of them, or all of them for ``seconds`` (both: whichever ends
        first; neither: until ``clear``)."""
        return self._add(Fault("outage", op, bucket, key_pattern, count,
                               None if seconds is None else time.monotonic() + seconds, after))

    def brownout(self, rate: float = 0.6, op: str | None = None, *, seed: int = 0, bucket: str | None = None,
                 seconds: float | None = None) -> Fault:
        """Answer a ``rate`` share of matching requests with 503 SlowDown (seeded, so runs are repeatable)."""
        return self._add(Fault("brownout", op, bucket, None, None,
                               None if seconds is None else time.monotonic() + seconds, 0, rate, random.Random(seed)))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def _add(self, rule: Fault) -> Fault:
        with self.lock:
            self.rules.append(rule)
        return rule

    def decide(self, method: str, path: str) -> str | None:
        """The fault to apply to one request ("outage" / "brownout") or None; counts requests per operation."""
        op, bucket, key = operation_of(method, path)
        with self.lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            for rule in self.rules:
                if not rule.active() or not rule.matches(op, bucket, key):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after or rule.rng.random() >= rule.rate:
                    continue
                rule.hits += 1
                self.faulted[op] = self.faulted.get(op, 0) + 1
                return rule.kind
        return None


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = b""
                while True:  # forward the chunked stream as sent (aws-chunked bodies ride inside it)
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    chunk = self.rfile.read(size + 2)
                    raw += chunk
                    if size == 0:
                        while chunk not in (b"\r\n", b""):
                            chunk = self.rfile.readline()
                            raw += chunk
                        return raw
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            body = self._body()
            fault = proxy.decide(self.command, self.path)
            if fault == "outage":
                self.close_connection = True
                self.connection.shutdown(2)  # why: a dropped connection, no HTTP answer at all
                return
            if fault == "brownout":
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=headers,
                             encode_chunked=False)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for name, value in resp.getheaders():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # why: a client hanging up on a 503 is no news
            super().handle_error(request, client_address)


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A running ``FaultProxy`` in front of ``upstream`` (an ``http://host:port`` endpoint) for the block."""
    proxy = FaultProxy(upstream)
    server = _QuietServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
