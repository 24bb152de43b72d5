"""Tracing: one ``authz.check`` span per Check, a child of the trace the request belongs to.

Configured only by the standard OpenTelemetry environment variables, so that the same settings
work for every process in a mesh: tracing is on when an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and
``OTEL_SDK_DISABLED`` is not true; ``OTEL_SERVICE_NAME`` names the service (default
``authz-sidecar``), ``OTEL_TRACES_SAMPLER``/``_ARG`` choose the sampler (default: follow the
parent's decision, sample roots). Spans go over OTLP/gRPC, which Jaeger ingests on 4317.

The hot path pays nothing when tracing is off (the handler holds ``None``). When on, the span is
made after the decision, from the time it started, so a Check never waits on tracing; spans are
queued for a background exporter that drops them when its queue is full, so a collector that is
slow or down never slows or fails a Check.

The parent context comes from the request's own headers as Envoy forwards them: W3C
``traceparent``/``tracestate``, B3 single (``b3``) or B3 multi (``x-b3-*``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import structlog
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz_sidecar.decider import Outcome
from authz_sidecar.state import SnapshotStore

log = structlog.get_logger("authz_sidecar.tracing")
SPAN_NAME = "authz.check"
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name) for name in _ENDPOINT_VARIABLES)


class CheckTracer:
    """Makes the ``authz.check`` span of each Check and hands it to the exporter."""

    def __init__(self, store: SnapshotStore, region: str, provider: TracerProvider) -> None:
        self._store = store
        self._region = region
        self.provider = provider
        self._tracer = provider.get_tracer("authz_sidecar")
        self._propagator = CompositePropagator([TraceContextTextMapPropagator(), B3SingleFormat(), B3MultiFormat()])

    def record(self, headers: Mapping[str, str] | None, outcome: Outcome, start_ns: int, end_ns: int) -> None:
        """The span of one Check that started at `start_ns` and was decided at `end_ns`."""
        parent = self._propagator.extract(headers) if headers else None
        span = self._tracer.start_span(
            SPAN_NAME, context=parent, kind=SpanKind.SERVER, start_time=start_ns, attributes=self._attributes(outcome)
        )
        span.end(end_time=end_ns)

    def _attributes(self, outcome: Outcome) -> dict[str, Any]:
        snapshot = self._store.snapshot
        attributes: dict[str, Any] = {
            "authz.decision": "allow" if outcome.allowed else "deny",
            "authz.reason": outcome.reason.value,
            "authz.region": self._region,
        }
        if snapshot is not None:
            attributes["authz.active_version"] = snapshot.active_version
        if outcome.permission:
            attributes["authz.permission"] = outcome.permission
        ev = outcome.evaluation
        if ev is None:  # refused before any set was consulted: no identity, unmapped, malformed...
            attributes["authz.decided_by"] = "none"
            return attributes
        attributes["authz.decided_by"] = ev.decided_by
        attributes["authz.selection"] = ev.selection.value
        attributes["authz.enforced_version"] = ev.enforced.meta.version
        attributes["authz.mismatch"] = ev.mismatch
        for observed in ev.observed:
            decision = "allow" if observed.allowed else "deny"
            if observed.shadow:
                attributes[f"authz.shadow.{observed.version}.decision"] = decision
            else:
                attributes["authz.active.decision"] = decision
        return attributes

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the exporter's timeout) and stop the exporter."""
        self.provider.shutdown()


def trace(tracer: CheckTracer, headers: Mapping[str, str] | None, outcome: Outcome, start_ns: int) -> None:
    """Record a Check's span; a fault in tracing is logged and never reaches the answer."""
    try:
        tracer.record(headers, outcome, start_ns, time.time_ns())
    except Exception:
        log.exception("trace_failed")


def build(store: SnapshotStore, region: str, environ: Mapping[str, str] = os.environ) -> CheckTracer | None:
    """The tracer the environment asks for, or None (tracing off, nothing on the hot path)."""
    if not enabled(environ):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or "authz-sidecar"})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return CheckTracer(store, region, provider)
