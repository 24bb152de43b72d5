"""The demo upstream: answers every request with what it received, so a person (or a test) can see
which permission set decided (the x-authz-* headers the sidecar added)."""

from __future__ import annotations

import argparse
import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "things-demo/1"
    protocol_version = "HTTP/1.1"  # keep-alive, so Envoy reuses its upstream connections

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "service": "things",
                "method": self.command,
                "path": self.path,
                "decided_by": self.headers.get("x-authz-decided-by"),
                "set_version": self.headers.get("x-authz-set-version"),
                # Envoy strips the tester's header before the service; a test looks for it here.
                "shadow_header": self.headers.get("x-authz-shadow-version"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = do_POST = do_PATCH = _answer  # noqa: N815 - http.server's naming

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        pass


def make_server(host: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), EchoHandler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="demo upstream for authz-sidecar")
    # Loopback by default: the service is reached through Envoy. A container (compose) binds
    # 0.0.0.0 so that Envoy's container can reach it; in a pod, Envoy shares loopback with it.
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    make_server(args.host, args.port).serve_forever()


if __name__ == "__main__":
    main()
