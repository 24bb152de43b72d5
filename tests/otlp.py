"""OTLP trace receivers in the test process, one per protocol: what Jaeger's collector would be sent.

``OtlpReceiver`` speaks OTLP/gRPC (Jaeger's 4317), ``OtlpHttpReceiver`` OTLP/HTTP with protobuf
bodies (Jaeger's 4318). Both record the spans with their attributes and the headers (gRPC metadata)
of every export, can serve TLS (optionally asking for a client certificate), and can be told to
hang: they then take the request and never answer, and record how long the exporter waited before
it gave up.
"""

from __future__ import annotations

import gzip
import http.server
import select
import socket
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    service: str


@dataclass(frozen=True)
class ReceivedExport:
    """One export request as it arrived: its path (OTLP/HTTP only) and headers, lower-cased."""

    path: str
    headers: dict[str, str]
    spans: int


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    received = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                received.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        service=str(resource.get("service.name", "")),
                    )
                )
    return received


class _Recorder:
    """What both receivers keep: spans, exports, and the waits of exporters that gave up."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.exports: list[ReceivedExport] = []
        self.abandoned: list[float] = []  # seconds an exporter waited on a hanging receiver
        self.hang = False
        self._released = threading.Event()
        self._lock = threading.Lock()

    def record(self, path: str, headers: dict[str, str], spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.spans.extend(spans)
            self.exports.append(ReceivedExport(path, headers, len(spans)))

    def release(self) -> None:
        """Stop hanging, and let every request held so far go."""
        self.hang = False
        self._released.set()

    def wait_for(self, trace_id: str, name: str = "authz.check", timeout: float = 10.0) -> ReceivedSpan:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for span in self.spans:
                    if span.trace_id == trace_id and span.name == name:
                        return span
            time.sleep(0.02)
        raise TimeoutError(f"no {name} span with trace id {trace_id} (got {len(self.spans)} spans)")

    def wait_abandoned(self, count: int = 1, timeout: float = 15.0) -> list[float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.abandoned) >= count:
                    return list(self.abandoned)
            time.sleep(0.02)
        raise TimeoutError(f"{len(self.abandoned)} of {count} hanging exports were given up")

    def _held(self, gone: Any) -> None:
        """Hold a request until released or until the exporter hangs up (`gone()` turns true)."""
        started = time.monotonic()
        while not self._released.wait(0.01):
            if gone():
                with self._lock:
                    self.abandoned.append(time.monotonic() - started)
                return


def _server_context(certs: dict[str, Path], client_auth: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["server_cert"], certs["server_key"])
    if client_auth:
        context.load_verify_locations(certs["ca"])
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class OtlpReceiver(_Recorder, trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC on 127.0.0.1, plain or TLS (`certs` from tests/certs.py)."""

    def __init__(self, certs: dict[str, Path] | None = None, *, client_auth: bool = False) -> None:
        super().__init__()
        self.scheme = "https" if certs else "http"
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        if certs:
            credentials = grpc.ssl_server_credentials(
                [(certs["server_key"].read_bytes(), certs["server_cert"].read_bytes())],
                root_certificates=certs["ca"].read_bytes() if client_auth else None,
                require_client_auth=client_auth,
            )
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        headers = {k.lower(): v if isinstance(v, str) else v.decode() for k, v in context.invocation_metadata()}
        if self.hang:
            self._held(lambda: not context.is_active())
            return trace_service_pb2.ExportTraceServiceResponse()
        self.record("", headers, spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self.release()
        self.server.stop(0)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter is expected to reuse its connection
    server: _HttpServer

    def do_POST(self) -> None:
        receiver = self.server.receiver
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        receiver.connections.add(self.client_address)
        if receiver.hang:
            receiver._held(lambda: _peer_closed(self.connection))
            self.close_connection = True
            return
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if headers.get("content-type") != "application/x-protobuf":
            self._answer(415, b"")
            return
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        except Exception:
            self._answer(400, b"")
            return
        receiver.record(self.path, headers, spans_of(request))
        self._answer(receiver.status, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())
        # Closing without having said so is what a collector's idle timeout does to a kept connection.
        self.close_connection = receiver.close_after_answer

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class names it so)
        pass


def _peer_closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ssl.SSLError):
        return True


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpHttpReceiver


class OtlpHttpReceiver(_Recorder):
    """OTLP/HTTP (protobuf bodies) on 127.0.0.1: a real HTTP/1.1 server taking POSTs on any path,
    plain or TLS. `status` is what it answers a good export with (set 503 to play a sick collector);
    `close_after_answer` closes each connection after the answer, which said keep-alive."""

    def __init__(self, certs: dict[str, Path] | None = None, *, client_auth: bool = False) -> None:
        super().__init__()
        self.status = 200
        self.close_after_answer = False
        self.connections: set[tuple[str, int]] = set()  # client (address, port) pairs seen
        self.scheme = "https" if certs else "http"
        self.server = _HttpServer(("127.0.0.1", 0), _Handler)
        self.server.receiver = self
        if certs:
            context = _server_context(certs, client_auth)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it (the exporter adds /v1/traces)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
