"""Envoy's ext_authz Check, as phases over plain values (the only module that reads a CheckRequest).

parse -> identify -> required permission -> select set -> decide -> observe others -> render.

Rules:
- A deny is an answer, not an error: every outcome, faults included, is an OK RPC whose
  CheckResponse denies with a reason, so Envoy never falls back to ``failure_mode_allow``.
- Fail closed: no snapshot, no identity, an unmapped route or an internal fault all deny.
- No I/O and no awaits: the handler is a plain function, so the same code serves grpc.aio,
  a thread-pool server or the benchmark's direct calls.
"""

from __future__ import annotations

import time

import structlog
from google.protobuf.message import DecodeError

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar.errors import IdentityError
from authz_sidecar.evaluation import Evaluation, evaluate
from authz_sidecar.identity import Identifier, RequestIdentityInputs
from authz_sidecar.metrics import Metrics
from authz_sidecar.reasons import Reason
from authz_sidecar.responses import Rendered, ResponseCache
from authz_sidecar.routes import PathError
from authz_sidecar.snapshot import Snapshot
from authz_sidecar.state import SnapshotStore

SHADOW_HEADER = "x-authz-shadow-version"
MAX_SHADOW_HEADER = 128
# Distinct (principal, permission, scope, shadow header) answers kept per snapshot.
MEMO_LIMIT = 65_536
log = structlog.get_logger("authz_sidecar.check")
_parse = pb.CheckRequest.FromString


class CheckHandler:
    """Decides ext_authz CheckRequests from the store's current snapshot."""

    def __init__(
        self,
        store: SnapshotStore,
        identifier: Identifier,
        metrics: Metrics,
        *,
        stickiness: str = "principal",
    ) -> None:
        self._store = store
        self._identifier = identifier
        self._metrics = metrics
        self._responses = ResponseCache()
        self._by_request_id = stickiness == "request_id"
        self._memo: dict[tuple[str, str, str | None, str | None], tuple[Evaluation, Rendered]] = {}
        self._memo_for: Snapshot | None = None

    def check(self, request: pb.CheckRequest) -> pb.CheckResponse:
        """Decide one CheckRequest message; for in-process callers and tests."""
        return self._guarded(request).message

    def check_wire(self, raw: bytes) -> bytes:
        """Decide serialised CheckRequest bytes and return serialised CheckResponse bytes.

        The server path: the request is parsed once here, and the response bytes were built when
        that response was first needed, so nothing is serialised per request. Bytes that do not
        parse are a malformed request (400), not an RPC error.
        """
        try:
            request = _parse(raw)
        except DecodeError:
            self._metrics.refusal(Reason.MALFORMED_REQUEST)
            return self._responses.deny(Reason.MALFORMED_REQUEST).wire
        return self._guarded(request).wire

    def _guarded(self, request: pb.CheckRequest) -> Rendered:
        started = time.perf_counter()
        try:
            return self._check(request)
        except Exception:
            # Fail closed on any fault, and say so loudly: this is a bug, not a policy outcome.
            log.exception("check_failed")
            self._metrics.refusal(Reason.INTERNAL_ERROR)
            return self._responses.deny(Reason.INTERNAL_ERROR)
        finally:
            self._metrics.latency.observe(time.perf_counter() - started)

    def _refuse(self, reason: Reason, permission: str | None = None) -> Rendered:
        self._metrics.refusal(reason)
        return self._responses.deny(reason, permission)

    def _check(self, request: pb.CheckRequest) -> Rendered:
        snapshot = self._store.snapshot
        if snapshot is None:
            return self._refuse(Reason.NO_SNAPSHOT)
        attrs = request.attributes
        # parse: without an HTTP request there is nothing to authorize.
        if not attrs.request.HasField("http"):
            return self._refuse(Reason.MALFORMED_REQUEST)
        http = attrs.request.http
        headers = http.headers
        # identify
        try:
            principal = self._identifier.identify(
                RequestIdentityInputs(headers, attrs.metadata_context.filter_metadata, attrs.source.principal)
            )
        except IdentityError as exc:
            log.info("identity_rejected", error=str(exc), request_id=http.id)
            return self._refuse(Reason.INVALID_TOKEN)
        if principal is None:
            return self._refuse(Reason.NO_IDENTITY)
        # required permission: the route's own setting first, then the service's route table.
        extensions = attrs.context_extensions
        handle = extensions.get("permission")
        scope = extensions.get("scope") or None
        if not handle:
            try:
                match = snapshot.routes.resolve(http.method, http.path)
            except PathError:
                return self._refuse(Reason.MALFORMED_REQUEST)
            if match is None:
                return self._refuse(Reason.UNMAPPED_ROUTE)
            handle = match.permission
            scope = scope or match.scope
        # select, decide, observe
        shadow = headers.get(SHADOW_HEADER)
        if shadow is not None and len(shadow) > MAX_SHADOW_HEADER:
            shadow = shadow[:MAX_SHADOW_HEADER]
        if self._by_request_id and snapshot.canaries:
            # The answer depends on the request id: nothing to reuse.
            evaluation = evaluate(
                snapshot, principal, handle, scope, shadow_header=shadow, stickiness_key=http.id or principal
            )
            rendered = self._render(evaluation, handle)
        else:
            evaluation, rendered = self._memoised(snapshot, principal, handle, scope, shadow)
        self._record(evaluation, principal, handle, scope, http.id)
        return rendered

    def _render(self, evaluation: Evaluation, handle: str) -> Rendered:
        if evaluation.allowed:
            return self._responses.allow(evaluation.decided_by, evaluation.enforced.meta.version, evaluation.selection)
        return self._responses.deny(evaluation.reason, handle)

    def _memoised(
        self, snapshot: Snapshot, principal: str, handle: str, scope: str | None, shadow: str | None
    ) -> tuple[Evaluation, Rendered]:
        """evaluate() is a pure function of the snapshot and these four values (when the canary key
        is the principal), so its result and rendering are reused until the snapshot changes."""
        memo = self._memo
        if self._memo_for is not snapshot:
            memo = self._memo = {}
            self._memo_for = snapshot
        key = (principal, handle, scope, shadow)
        found = memo.get(key)
        if found is None:
            evaluation = evaluate(snapshot, principal, handle, scope, shadow_header=shadow, stickiness_key=principal)
            found = (evaluation, self._render(evaluation, handle))
            if len(memo) >= MEMO_LIMIT:
                memo.clear()
            memo[key] = found
        return found

    def _record(self, evaluation: Evaluation, principal: str, handle: str, scope: str | None, request_id: str) -> None:
        self._metrics.decision(evaluation)
        if evaluation.mismatch:
            log.warning(
                "shadow_mismatch",
                principal=principal,
                permission=handle,
                scope=scope,
                request_id=request_id,
                decision="allow" if evaluation.allowed else "deny",
                enforced_version=evaluation.enforced.meta.version,
                selection=evaluation.selection.value,
                observed={
                    o.version: {"decision": "allow" if o.allowed else "deny", "expected": o.expected}
                    for o in evaluation.observed
                    if o.mismatch
                },
            )
