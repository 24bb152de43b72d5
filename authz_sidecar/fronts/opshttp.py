"""The operations HTTP endpoint: /healthz, /readyz, /status and /metrics.

A deliberately small HTTP/1.1 server on asyncio streams (one request per connection): these are
scraped every few seconds by Prometheus and probed by orchestrators, and pulling in a web framework
for four GET routes would cost more start-up time and dependencies than it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.telemetry.metrics import Metrics

_MAX_HEAD = 8192
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


class OpsHttp:
    def __init__(self, store: SnapshotStore, metrics: Metrics, extra_status: Callable[[], dict[str, Any]]) -> None:
        self._store = store
        self._metrics = metrics
        self._extra = extra_status

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready = self._store.snapshot is not None
            return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"no snapshot loaded\n")
        if path == "/status":
            body = {**self._extra(), **self._store.status()}
            return 200, "application/json", json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics.render()
        return 404, "text/plain", b"not found\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3 or len(head) > _MAX_HEAD:
                status, ctype, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            else:
                method = parts[0]
                status, ctype, body = self.respond(method, parts[1])
            header = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(header.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def start(self, address: tuple[str, int] | str) -> asyncio.Server:
        if isinstance(address, str):
            return await asyncio.start_unix_server(self.handle, path=address.removeprefix("unix://"))
        host, port = address
        return await asyncio.start_server(self.handle, host, port)
