"""authz_sidecar.v1.Authz: the same decisions for applications that ask directly.

The application has already authenticated its principal; the sidecar decides with the same
snapshot, selection and dark launch as Envoy's Check. Malformed input is an answer (denied with
``malformed_request``), like every other deny.
"""

from __future__ import annotations

from authz_sidecar.documents import HANDLE_RE
from authz_sidecar.evaluation import evaluate
from authz_sidecar.metrics import Metrics
from authz_sidecar.reasons import Reason
from authz_sidecar.state import SnapshotStore
from authz_sidecar.v1 import authz_pb2


class AppAuthzServicer:
    def __init__(self, store: SnapshotStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def decide(self, request: authz_pb2.CheckRequest) -> authz_pb2.CheckResponse:
        snapshot = self._store.snapshot
        if snapshot is None:
            return authz_pb2.CheckResponse(allowed=False, reason=Reason.NO_SNAPSHOT.value)
        if not request.principal or not HANDLE_RE.fullmatch(request.permission):
            return authz_pb2.CheckResponse(allowed=False, reason=Reason.MALFORMED_REQUEST.value)
        ev = evaluate(
            snapshot,
            request.principal,
            request.permission,
            request.scope or None,
            shadow_header=request.shadow_version or None,
            stickiness_key=request.stickiness_key or request.principal,
        )
        self._metrics.decision(ev)
        return authz_pb2.CheckResponse(
            allowed=ev.allowed,
            reason=ev.reason.value,
            decided_by=ev.decided_by,
            enforced_version=ev.enforced.meta.version,
            active_version=snapshot.active_version,
            selection=ev.selection.value,
            mismatch=ev.mismatch,
            observed=[
                authz_pb2.ObservedDecision(version=o.version, allowed=o.allowed, reason=o.reason.value)
                for o in ev.observed
            ],
        )
