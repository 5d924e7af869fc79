"""A fault-injecting HTTP proxy on loopback, in front of an S3 endpoint (the moto server).

Clients (s3fs / botocore, in the test process and in Ray workers) talk to
:attr:`FaultProxy.endpoint` instead of the S3 server; every request is
forwarded unchanged, except those a :class:`Fault` rule picks. A rule fires on
every ``every``-th matching request that was never faulted before: a request
is known by its method, path, query and ``Range``, so a retry (by botocore,
by aiohttp's resend on a dropped keep-alive connection, by s3fs or by
hemaray) is never faulted again. The schedule is deterministic per rule; a
client that retries gets through, one that does not fails at once.

Fault kinds:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body, nothing forwarded
  (S3 throttling);
- ``reset``: the connection is reset (RST) before the request is forwarded
  (a connection reset while sending);
- ``lost_reply``: the request is forwarded and applied, then the connection is
  reset instead of answering (the write landed, the client never hears so:
  its retry meets its own object);
- ``cut``: the request is forwarded, the answer's status, headers and first
  half of its body are sent, then the connection is reset (a download that
  breaks off mid-body);
- ``deny``: ``403 AccessDenied``, nothing forwarded (a bucket policy; fires on
  every matching request, retries included).

A rule with ``query`` picks only requests whose query string holds it (S3's
multipart calls share a key's path: ``uploads`` creates an upload,
``partNumber=`` sends a part, ``uploadId=`` on a POST completes it). A
``persistent`` rule fires on retries too: that call fails whatever the client
does (the store is down for it).

``hook(method, path, fault)`` runs before each request is handled, with the
fault the rules picked for it (None: forwarded), e.g. to rewrite an object at
a chosen moment. :attr:`injected`
counts the faults by ``(method, kind)``, :attr:`log` lists them as ``(method,
path, kind)``; :attr:`seen` counts the requests by method.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

__all__ = ["FAULT_KINDS", "Fault", "FaultProxy"]

FAULT_KINDS = ("slowdown", "reset", "lost_reply", "cut", "deny")
#: Headers that describe one hop, not the message: never forwarded as they came.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    }
)
#: Seconds the proxy waits for the upstream server's answer.
UPSTREAM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Fault:
    """One fault rule: ``kind`` on every ``every``-th first attempt of ``method`` under ``prefix``.

    ``method`` is an HTTP method or ``"*"``; ``prefix`` a path prefix of the
    path-style URL (``/bucket/key...``); ``query`` a text the query string must
    hold (empty: any); ``deny`` and a ``persistent`` rule fire on every match,
    retries included.
    """

    kind: str
    method: str = "*"
    every: int = 1
    prefix: str = "/"
    query: str = ""
    persistent: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")

    def matches(self, method: str, path: str, query: str = "") -> bool:
        return (
            self.method in ("*", method)
            and path.startswith(self.prefix)
            and self.query in query
        )


def _s3_error(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId><HostId>faultproxy</HostId></Error>"
    ).encode()


_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "deny": (403, "AccessDenied", "Access Denied"),
}


class FaultProxy:
    """A threaded HTTP proxy on ``127.0.0.1`` forwarding to ``upstream`` with :class:`Fault` rules.

    Use as a context manager (or :meth:`start` / :meth:`stop`); point clients at
    :attr:`endpoint`. Rules and the hook may be changed between requests.
    """

    def __init__(
        self,
        upstream: str,
        faults: list[Fault] | None = None,
        *,
        hook: Callable[[str, str, str | None], None] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self.faults = list(faults or [])
        self.hook = hook
        self.injected: Counter[tuple[str, str]] = Counter()
        self.log: list[tuple[str, str, str]] = []
        self.seen: Counter[str] = Counter()
        self._matched: Counter[int] = Counter()
        self._faulted: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the schedule --------------------------------------------------------------
    def pick(self, method: str, target: str, byte_range: str) -> str | None:
        """The fault for this request (``target``: path and query, as sent), or None.

        ``deny`` wins over every other kind; otherwise the first rule that fires
        wins (every matching rule still counts the request). A request faulted
        once is never faulted again (its retries get through).
        """
        path, _, query = target.partition("?")
        path = unquote(path)  # botocore sends "=" in a key as %3D; rules name keys as they are
        with self._lock:
            self.seen[method] += 1
            retry = (method, target, byte_range) in self._faulted
            chosen = None
            for i, fault in enumerate(self.faults):
                if not fault.matches(method, path, query):
                    continue
                if fault.kind == "deny":
                    chosen = "deny"
                    break
                if retry and not fault.persistent:
                    continue
                self._matched[i] += 1
                if chosen is None and self._matched[i] % fault.every == 0:
                    chosen = fault.kind
            if chosen is not None and chosen != "deny":
                self._faulted.add((method, target, byte_range))
            if chosen is not None:
                self.injected[(method, chosen)] += 1
                self.log.append((method, path, chosen))
            return chosen

    # -- forwarding ------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                """Quiet: the tests count faults, they do not read access logs."""

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = bytearray()  # keep the framing: the upstream decodes it
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the empty line
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return bytes(raw)
                        raw += self.rfile.read(size + 2)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                """Close the client's connection with a TCP RST (SO_LINGER 0), no answer."""
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            def _answer_error(self, kind: str) -> None:
                status, code, message = _ERRORS[kind]
                body = b"" if self.command == "HEAD" else _s3_error(code, message)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=UPSTREAM_TIMEOUT_S)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS
                    }
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        headers["Transfer-Encoding"] = "chunked"  # the body keeps its framing
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, resp.reason, resp.getheaders(), data
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                path = self.path.split("?", 1)[0]
                kind = proxy.pick(self.command, self.path, self.headers.get("Range", ""))
                if proxy.hook is not None:
                    proxy.hook(self.command, path, kind)
                if kind in ("slowdown", "deny"):
                    self._answer_error(kind)
                    return
                if kind == "reset":
                    self._reset()
                    return
                status, reason, headers, data = self._forward(body)
                if kind == "lost_reply":
                    self._reset()
                    return
                self.send_response(status, reason)
                head = self.command == "HEAD"  # a HEAD's Content-Length is the object's size
                for k, v in headers:
                    if k.lower() not in _HOP_HEADERS and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                if kind == "cut" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
