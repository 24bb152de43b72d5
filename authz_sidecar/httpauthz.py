"""Envoy's ext_authz over HTTP (``--http-authz ADDR``): the second front of the same decision path.

Envoy's HTTP authorization service sends the original method, path and the headers it is told to
forward; a 2xx answer allows (headers named ``x-authz-*`` are copied to the upstream request when
Envoy's ``allowed_upstream_headers`` says so), anything else is sent to the client as the denial.
HTTP/1.1 with keep-alive, parsed by llhttp (httptools) on the event loop; responses are rendered
once per distinct outcome and written as bytes.

Identity here comes from a JWT the sidecar verifies (``jwt``), or the payload Envoy's jwt_authn
forwards in a header (``payload_header``); Envoy's dynamic metadata does not reach an HTTP
authorization service.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httptools
import structlog

from authz_sidecar.decider import Decider, Outcome
from authz_sidecar.metrics import Metrics
from authz_sidecar.reasons import Reason
from authz_sidecar.responses import DECIDED_BY_HEADER, REASON_HEADER, SET_VERSION_HEADER, deny_body
from authz_sidecar.tracing import CheckTracer, trace

log = structlog.get_logger("authz_sidecar.httpauthz")
_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
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
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found


def deny_bytes(reason: Reason, permission: str | None) -> bytes:
    status = reason.http_status
    body = deny_body(reason, permission).encode()
    extra = 'www-authenticate: Bearer realm="authz-sidecar"\r\n' if status == 401 else ""
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\ncontent-type: application/json\r\n{REASON_HEADER}: {reason}\r\n"
        f"{extra}content-length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


class _AuthzProtocol(asyncio.Protocol):
    __slots__ = ("_front", "_headers", "_parser", "_transport", "_url")

    def __init__(self, front: HttpAuthz) -> None:
        self._front = front
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._headers: dict[str, str] = {}
        self._url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._front.connections.add(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._front.connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(deny_bytes(Reason.MALFORMED_REQUEST, None))
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous},{text}"

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        method = self._parser.get_method().decode("latin-1")
        transport.write(self._front.answer(method, self._url.decode("latin-1"), self._headers))
        if not self._parser.should_keep_alive():
            transport.close()


class HttpAuthz:
    def __init__(self, decider: Decider, metrics: Metrics, tracer: CheckTracer | None = None) -> None:
        self._decider = decider
        self._metrics = metrics
        self._tracer = tracer
        self._responses = HttpResponses()
        self._server: asyncio.Server | None = None
        self.connections: set[asyncio.Transport] = set()
        self.port = 0

    def answer(self, method: str, target: str, headers: dict[str, str]) -> bytes:
        started = time.perf_counter()
        start_ns = time.time_ns() if self._tracer is not None else 0
        try:
            outcome = self._decider.decide(method, target, headers, request_id=headers.get("x-request-id", ""))
        except Exception:
            log.exception("check_failed")
            outcome = self._decider.refuse(Reason.INTERNAL_ERROR)
        answer = self._responses.render(outcome)
        self._metrics.latency.observe(time.perf_counter() - started)
        if self._tracer is not None:
            trace(self._tracer, headers, outcome, start_ns)
        return answer

    async def start(self, address: tuple[str, int] | str) -> int:
        loop = asyncio.get_running_loop()
        if isinstance(address, str):
            self._server = await loop.create_unix_server(
                lambda: _AuthzProtocol(self), path=address.removeprefix("unix://")
            )
            return 0
        self._server = await loop.create_server(lambda: _AuthzProtocol(self), address[0], address[1])
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Envoy keeps its connections open; close them so shutdown does not wait on idle keep-alives.
            for transport in list(self.connections):
                transport.close()
            await self._server.wait_closed()
