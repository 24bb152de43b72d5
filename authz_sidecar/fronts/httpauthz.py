"""Envoy's ext_authz over HTTP (``--http-authz ADDR``): the second front of the same decision path.

Envoy's HTTP authorization service sends the original method, path and the headers it is told to
forward; a 2xx answer allows (headers named ``x-authz-*`` are copied to the upstream request when
Envoy's ``allowed_upstream_headers`` says so), anything else is sent to the client as the denial.
HTTP/1.1 with keep-alive, parsed by llhttp (httptools) on the event loop; responses are rendered
once per distinct outcome and written as bytes.

Identity here comes from a JWT the sidecar verifies (``jwt``), or the payload Envoy's jwt_authn
forwards in a header (``payload_header``); Envoy's dynamic metadata does not reach an HTTP
authorization service.

Every request is bounded (:class:`HttpLimits`): the URL, the number and total size of its headers,
its body (never read, only counted), and the time from its first byte to its last; a connection
waiting for its next request is closed after an idle timeout. What the parser may hold is bounded
too: bytes of a head that cannot fit the limits are refused before they pile up. A request over a
bound is denied (431, 413, 408) and its connection closed; answers a client does not read stop
its connection being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httptools
import structlog

from authz_sidecar.caches import remember
from authz_sidecar.decision.answering import Answering
from authz_sidecar.fronts.responses import DECIDED_BY_HEADER, REASON_HEADER, SET_VERSION_HEADER, deny_body
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.model.reasons import Reason
from authz_sidecar.telemetry.metrics import Metrics

log = structlog.get_logger("authz_sidecar.fronts.httpauthz")
_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CACHE_LIMIT = 4096


class HttpResponses:
    """HTTP/1.1 response bytes, built once per distinct outcome."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], bytes] = {}

    def render(self, outcome: Outcome) -> bytes:
        ev = outcome.evaluation
        if ev is not None and ev.allowed:
            key: tuple[Any, ...] = ("allow", ev.decided_by, ev.enforced.meta.version)
        else:
            key = ("deny", outcome.reason, outcome.permission)
        found = self._cache.get(key)
        if found is None:
            if key[0] == "allow":
                found = (
                    f"HTTP/1.1 200 OK\r\n{DECIDED_BY_HEADER}: {key[1]}\r\n{SET_VERSION_HEADER}: {key[2]}\r\n"
                    "content-length: 0\r\n\r\n"
                ).encode("latin-1")
            else:
                found = deny_bytes(outcome.reason, outcome.permission)
            remember(self._cache, key, found, _CACHE_LIMIT)
        return found


def deny_bytes(reason: Reason, permission: str | None, *, close: bool = False) -> bytes:
    status = reason.http_status
    body = deny_body(reason, permission).encode()
    extra = 'www-authenticate: Bearer realm="authz-sidecar"\r\n' if status == 401 else ""
    if close:
        extra += "connection: close\r\n"
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\ncontent-type: application/json\r\n{REASON_HEADER}: {reason}\r\n"
        f"{extra}content-length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one request may send, and how long it and an idle connection may take."""

    max_url_bytes: int = 16 * 1024
    max_headers: int = 128
    # The URL plus every header's name and value, as Envoy counts its max_request_headers_kb.
    max_header_bytes: int = 60 * 1024
    max_body_bytes: int = 1024 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 120.0

    @property
    def max_head_bytes(self) -> int:
        """Raw bytes a request line and headers within the limits can take (separators and the
        method and version included, generously): past this, the head is refused unread."""
        return self.max_header_bytes + 4 * self.max_headers + 1024


# After a refusal the connection stays half open this long, its input read and dropped, so that the
# client reads the answer instead of a reset.
_LINGER = 1.0


class _RefusedError(Exception):
    """Raised from a parser callback to stop parsing a request over a bound."""


class _AuthzProtocol(asyncio.Protocol):
    __slots__ = (
        "_body_bytes",
        "_closing",
        "_front",
        "_head_raw",
        "_header_bytes",
        "_header_count",
        "_headers",
        "_in_head",
        "_limits",
        "_parser",
        "_refusal",
        "_transport",
        "_url",
        "deadline",
    )

    def __init__(self, front: HttpAuthz) -> None:
        self._front = front
        self._limits = front.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._headers: dict[str, str] = {}
        self._url = b""
        # Raw bytes received since the last request ended, while its successor's head is still open.
        self._in_head = True
        self._head_raw = 0
        self._header_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._refusal: Reason | None = None
        self._closing = False
        # When the server's sweep (HttpAuthz._sweep) ends this connection: idle, or request too slow.
        self.deadline = time.monotonic() + self._limits.idle_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._front.connections.discard(self)

    def pause_writing(self) -> None:
        # Answers pile up unread: read no more requests until the client catches up.
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering after a refusal: dropped unread
        if self._in_head:
            self._head_raw += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.close()  # the request was answered; this server speaks nothing else on the connection
            return
        except httptools.HttpParserError:
            self.refuse(self._refusal or Reason.MALFORMED_REQUEST)
            return
        if self._in_head and self._head_raw > self._limits.max_head_bytes:
            # Still inside one head after this many bytes: whitespace or a header the callbacks have
            # not seen whole yet. Either way it cannot fit.
            self.refuse(Reason.HEADERS_TOO_LARGE)

    def refuse(self, reason: Reason) -> None:
        """Answer a denial, stop parsing, and close after a short linger."""
        transport = self._transport
        if transport is None or self._closing:
            return
        self._closing = True
        if reason is not Reason.MALFORMED_REQUEST:
            self._front.metrics.rejected("http", reason.value)
        transport.write(deny_bytes(reason, None, close=True))
        if transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()
            self.deadline = time.monotonic() + _LINGER
        else:
            transport.close()

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def expire(self) -> None:
        """The deadline passed: a request still arriving is answered 408; otherwise the connection
        was idle (or lingering) and is closed."""
        if self._closing or (self._in_head and self._head_raw == 0):
            self.close()
        else:
            self.refuse(Reason.REQUEST_TIMEOUT)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        self._url = b""
        self._header_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._in_head = True
        self._head_raw = max(self._head_raw, 1)  # a request has begun, even if its bytes came with the last
        self.deadline = time.monotonic() + self._limits.request_timeout

    def _over(self, reason: Reason) -> None:
        self._refusal = reason
        raise _RefusedError(reason.value)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if len(self._url) > self._limits.max_url_bytes or self._header_bytes > self._limits.max_header_bytes:
            self._over(Reason.HEADERS_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous},{text}"
        if self._header_bytes > self._limits.max_header_bytes or self._header_count > self._limits.max_headers:
            self._over(Reason.HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self._in_head = False
        declared = self._headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limits.max_body_bytes:
            self._over(Reason.BODY_TOO_LARGE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            self._over(Reason.BODY_TOO_LARGE)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        self._in_head = True
        self._head_raw = 0
        self.deadline = time.monotonic() + self._limits.idle_timeout
        method = self._parser.get_method().decode("latin-1")
        transport.write(self._front.answer(method, self._url.decode("latin-1"), self._headers))
        if not self._parser.should_keep_alive():
            self.close()


class HttpAuthz:
    def __init__(
        self,
        answering: Answering,
        metrics: Metrics,
        limits: HttpLimits | None = None,
    ) -> None:
        self._answering = answering
        self._decider = answering.decider
        self.metrics = metrics
        self.limits = limits or HttpLimits()
        self._responses = HttpResponses()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.connections: set[_AuthzProtocol] = set()
        self.port = 0

    def answer(self, method: str, target: str, headers: dict[str, str]) -> bytes:
        outcome = self._answering.answer(headers, self._decide, (method, target, headers))
        return self._responses.render(outcome)

    def _decide(self, request: tuple[str, str, dict[str, str]]) -> Outcome:
        method, target, headers = request
        return self._decider.decide(method, target, headers, request_id=headers.get("x-request-id", ""))

    async def _sweep(self) -> None:
        """End connections past their deadline. One pass over the connections a few times a
        second costs less than a timer armed and cancelled around every request."""
        period = min(1.0, self.limits.request_timeout / 4, self.limits.idle_timeout / 4, _LINGER / 2)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for connection in [c for c in self.connections if c.deadline < now]:
                connection.expire()

    async def start(self, address: tuple[str, int] | str) -> int:
        loop = asyncio.get_running_loop()
        if isinstance(address, str):
            self._server = await loop.create_unix_server(
                lambda: _AuthzProtocol(self), path=address.removeprefix("unix://")
            )
        else:
            self._server = await loop.create_server(lambda: _AuthzProtocol(self), address[0], address[1])
            self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep(), name="http-authz-sweep")
        return self.port

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
            # Envoy keeps its connections open; close them so shutdown does not wait on idle keep-alives.
            for connection in list(self.connections):
                connection.close()
            await self._server.wait_closed()
