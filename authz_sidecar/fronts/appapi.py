"""authz_sidecar.v1.Authz: the same decisions for applications that ask directly.

The application sends its end user's token, or names the principal from a trusted place
(:mod:`authz_sidecar.fronts.appidentity`), and the permission; everything after that is Envoy's
decision path (Decider.decide_for): the same snapshot, selection and dark
launch, and the same telemetry (counters, shadow reports, mismatch logs, the latency histogram, an
``authz.check`` span in the caller's trace when its gRPC metadata carries one). Malformed input is
an answer (denied with ``malformed_request``), like every other deny.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.fronts.appidentity import AppIdentity
from authz_sidecar.fronts.freshness import wait_fresh, wait_fresh_async
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.v1 import authz_pb2

# gRPC metadata worth handing to the tracer: the trace context, nothing else.
_TRACE_KEYS = frozenset({"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"})


def trace_headers(metadata: Iterable[tuple[str, str | bytes]] | None) -> Mapping[str, str] | None:
    """The trace-context entries of a call's metadata, as the headers a span's parent is read from."""
    if not metadata:
        return None
    found = {key: value for key, value in metadata if key in _TRACE_KEYS and isinstance(value, str)}
    return found or None


class AppAuthzServicer:
    def __init__(self, answering: Answering, store: SnapshotStore, identity: AppIdentity) -> None:
        self._answering = answering
        self._decider = answering.decider
        self._store = store
        self.identity = identity

    def principal(self, principal: str, token: str, context: Any) -> str:
        """Who the call is for (the one seam every RPC of this API goes through)."""
        return self.identity.principal(principal, token, str(context.peer()))

    def fresh(self, wanted: int, context: Any) -> None:
        wait_fresh(self._store, wanted, context)

    async def fresh_async(self, wanted: int, context: Any) -> None:
        await wait_fresh_async(self._store, wanted, context)

    def decide(self, request: authz_pb2.CheckRequest, context: Any) -> authz_pb2.CheckResponse:
        """Check, once the principal is known and the snapshot fresh enough (see grpcfront)."""
        principal = self.principal(request.principal, request.token, context)
        headers = trace_headers(context.invocation_metadata()) if self._answering.traced else None
        revision = self._store.applied_revision  # the snapshot read next is at least this fresh
        response = render(self._answering.answer(headers, partial(self._decide, principal=principal), request))
        response.revision = revision
        return response

    def _decide(self, request: authz_pb2.CheckRequest, *, principal: str) -> Outcome:
        return self._decider.decide_for(
            principal,
            request.permission,
            request.scope or None,
            shadow=request.shadow_version or None,
            stickiness_key=request.stickiness_key,
        )


def render(outcome: Outcome) -> authz_pb2.CheckResponse:
    ev = outcome.evaluation
    if ev is None:
        return authz_pb2.CheckResponse(allowed=False, reason=outcome.reason.value)
    active = ev.enforced.meta.version
    if ev.decided_by != "active":
        active = next((o.version for o in ev.observed if not o.shadow), "")
    return authz_pb2.CheckResponse(
        allowed=ev.allowed,
        reason=ev.reason.value,
        decided_by=ev.decided_by,
        enforced_version=ev.enforced.meta.version,
        active_version=active,
        selection=ev.selection.value,
        mismatch=ev.mismatch,
        observed=[
            authz_pb2.ObservedDecision(version=o.version, allowed=o.allowed, reason=o.reason.value) for o in ev.observed
        ],
    )
