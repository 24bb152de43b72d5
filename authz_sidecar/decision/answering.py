"""The wrapper every front puts around the decision path: a fault denies, every answer is timed
and traced the same way, whichever front asked (Envoy over gRPC, Envoy over HTTP, an application).

Kept apart from the decider so that the decision path stays free of tracing, and from each front so
that no front can forget the latency histogram or the span.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import structlog

from authz_sidecar.decision.decider import Decider
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.model.reasons import Reason
from authz_sidecar.telemetry.metrics import Metrics
from authz_sidecar.telemetry.tracing import CheckTracer, trace

log = structlog.get_logger("authz_sidecar.check")
_Request = TypeVar("_Request")


class Answering:
    def __init__(self, decider: Decider, metrics: Metrics, tracer: CheckTracer | None = None) -> None:
        self.decider = decider
        self.latency = metrics.latency
        self._tracer = tracer
        # Whether answer() uses its headers: a front skips gathering them when nothing is traced.
        self.traced = tracer is not None

    def answer(
        self, headers: Mapping[str, str] | None, decide: Callable[[_Request], Outcome], request: _Request
    ) -> Outcome:
        """``decide(request)``; a fault is an INTERNAL_ERROR deny (logged), never an exception or an
        allow. `headers` carry the caller's trace context (traceparent, b3) for the span."""
        started = time.perf_counter()
        start_ns = time.time_ns() if self._tracer is not None else 0
        try:
            outcome = decide(request)
        except Exception:
            # Fail closed on any fault, and say so loudly: this is a bug, not a policy outcome.
            log.exception("check_failed")
            outcome = self.decider.refuse(Reason.INTERNAL_ERROR)
        self.latency.observe(time.perf_counter() - started)
        if self._tracer is not None:
            trace(self._tracer, headers, outcome, start_ns)
        return outcome
