"""The bare servers the sidecar is measured against: allow-all ext_authz answers and nothing else.

Each does the least a Python server on that protocol can do: the gRPC ones return a pre-serialised
OK CheckResponse without parsing the request; the HTTP one answers 200 to every request. They set
the ceiling the sidecar is compared with ("as fast as a bare allow-all Python server").

Run as ``python -m authz_sidecar.bench.baselines KIND --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from concurrent import futures
from typing import Any

import grpc

from authz_sidecar.fronts.responses import ResponseCache

METHOD = ("envoy.service.auth.v3.Authorization", "Check")
ALLOW = ResponseCache().allow("active", "v1", "default").wire


def _allow(_request: bytes, _context: Any) -> bytes:
    return ALLOW


def _handler() -> Any:
    # No deserializer and no serializer: bytes in, pre-built bytes out.
    return grpc.method_handlers_generic_handler(METHOD[0], {METHOD[1]: grpc.unary_unary_rpc_method_handler(_allow)})


def run_grpc_threads(port: int, workers: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((_handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


async def _grpc_aio(port: int) -> None:
    async def allow(_request: bytes, _context: Any) -> bytes:
        return ALLOW

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(METHOD[0], {METHOD[1]: grpc.unary_unary_rpc_method_handler(allow)}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


class _HttpAllow(asyncio.Protocol):
    """HTTP/1.1 keep-alive, 200 to every request; requests are counted by their blank line."""

    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = self.buffer.count(b"\r\n\r\n")
        if count:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(self.RESPONSE * count)


async def _http(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_HttpAllow, "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["grpc-aio", "grpc-threads", "http"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if args.kind == "grpc-threads":
        run_grpc_threads(args.port, args.workers)
        return
    import uvloop

    uvloop.run(_grpc_aio(args.port) if args.kind == "grpc-aio" else _http(args.port))


if __name__ == "__main__":
    main()
