"""A minimal OTLP/gRPC trace collector for the benchmark: accepts spans, counts them, keeps nothing.

The tracing rows of ``make bench`` export to it, so that they pay for a real export over gRPC
(serialisation, the network, the collector's answer) without a Jaeger on the machine. On SIGTERM
it prints how many spans it received, which the bench reads to check the rows really traced.

Run as ``python -m authz_sidecar.bench.collector --port N``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_EMPTY = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


class Counter:
    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def export(self, raw: bytes, _context: Any) -> bytes:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += n
        return _EMPTY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    counter = Counter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(counter.export)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1)
    print(f"spans received: {counter.spans}", flush=True)


if __name__ == "__main__":
    main()
