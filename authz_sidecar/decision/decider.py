"""The decision path over plain request values, shared by every front (gRPC ext_authz, HTTP ext_authz,
the application API).

identify -> required permission -> select set -> decide -> observe others -> count.

Each front parses its own wire format into these values and renders the Outcome back; everything
between is here, once. Rules:

- Fail closed: no snapshot, no identity, an unmapped route or an unsafe path all deny with a reason.
- A credential that is present but invalid denies; it never falls through to a weaker source.
- evaluate() is a pure function of the snapshot and (principal, permission, scope, shadow header)
  when the canary key is the principal, so its results are kept in the snapshot's own memo.
- When the principal can only come from jwt_authn's metadata (as bytes: the gRPC front's view) or
  the mTLS peer, a whole Check is a pure function of the snapshot and (that metadata, the peer,
  method, path, shadow header, the route's permission and scope): its outcome is kept in the same
  memo under those, and a Check asked again is counted, reported and logged without identifying,
  routing or deciding again.
- No I/O, no awaits, no locks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from authz_sidecar.caches import remember
from authz_sidecar.decision.identity import JWT_AUTHN_NAMESPACE, Identifier, RequestIdentityInputs
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import HANDLE_RE, MAX_PRINCIPAL_LEN, SCOPE_RE
from authz_sidecar.errors import IdentityError
from authz_sidecar.model.evaluation import Evaluation, Outcome, evaluate
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.routes import PathError
from authz_sidecar.model.snapshot import Snapshot
from authz_sidecar.telemetry.decisionlog import DecisionLog
from authz_sidecar.telemetry.metrics import Metrics
from authz_sidecar.telemetry.reports import ShadowReports

SHADOW_HEADER = "x-authz-shadow-version"
MAX_SHADOW_HEADER = 128
# Distinct (principal, permission, scope, shadow header) answers kept per snapshot.
MEMO_LIMIT = 65_536
_NO_EXTENSIONS: Mapping[str, str] = {}
log = structlog.get_logger("authz_sidecar.check")


_REFUSALS = {reason: Outcome(reason) for reason in Reason}
# Identity sources whose principal depends on nothing but jwt_authn's metadata and the mTLS peer.
_KEYED_SOURCES = frozenset({"jwt_authn", "mtls"})
# The first item of a whole Check's key in the memo (whose answers are keyed by 4-tuples).
_CHECK = "check"
# What decide() hands a front that asked for it: the snapshot it decided with, the principal, the
# scope and the outcome of a whole Check (a pure function of those fields of the request).
Settled = tuple[Snapshot, str, str | None, Outcome]
# A decision as counted and logged: principal, handle, scope and the evaluation.
Counted = tuple[str, str, str | None, Evaluation]


class Decider:
    def __init__(
        self,
        store: SnapshotStore,
        identifier: Identifier,
        metrics: Metrics,
        *,
        stickiness: str = "principal",
        log_decisions: float = 0.0,
        reports: ShadowReports | None = None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self._store = store
        self._reports = reports
        # Every decision as a JSON line (serve --decision-log), for ctl replay; None: off.
        self._decision_log = decision_log
        # Share of decisions logged as "decision" events (mismatches are always logged).
        self._log_rate = log_decisions
        self._identifier = identifier
        self._metrics = metrics
        self._by_request_id = stickiness == "request_id"
        self._whole_checks = set(identifier.names) <= _KEYED_SOURCES

    @property
    def store(self) -> SnapshotStore:
        return self._store

    @property
    def settles(self) -> bool:
        """Whether a front may keep whole Checks' answers and count them later (:meth:`tally`):
        identity from jwt_authn's metadata or the mTLS peer only."""
        return self._whole_checks

    @property
    def log_rate(self) -> float:
        """The share of decisions logged as "decision" events (:meth:`log_sampled`)."""
        return self._log_rate

    @property
    def decision_log(self) -> DecisionLog | None:
        """Where a front that answers a kept Check itself queues its line (--decision-log)."""
        return self._decision_log

    def add_pending(self, settle: Callable[[], None]) -> None:
        """`settle` hands over counts a front is holding (see :meth:`tally`): called before the
        metrics or the shadow reports are read."""
        self._metrics.add_pending(settle)
        if self._reports is not None:
            self._reports.add_pending(settle)

    def tally(self, snapshot: Snapshot, counted: Counted, times: int) -> None:
        """Count `times` Checks answered with a kept whole-Check answer (no mismatch: those are
        never kept) in the metrics and the shadow reports. Their decision log lines were written
        per Check."""
        principal, handle, scope, evaluation = counted
        self._metrics.decision(evaluation, times)
        if self._reports is not None and snapshot.shadows:
            self._reports.observe(snapshot, evaluation, principal, handle, scope, times=times)

    def refuse(self, reason: Reason) -> Outcome:
        self._metrics.refusal(reason)
        return _REFUSALS[reason]

    def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        filter_metadata: Mapping[str, Any] = _NO_EXTENSIONS,
        peer_principal: str = "",
        extensions: Mapping[str, str] = _NO_EXTENSIONS,
        request_id: str = "",
        settled: list[Settled] | None = None,
    ) -> Outcome:
        """`settled`: a whole Check's answer is appended to it (see :data:`Settled`)."""
        snapshot = self._store.snapshot
        if snapshot is None:
            return self.refuse(Reason.NO_SNAPSHOT)
        check_key: tuple[Any, ...] | None = None
        if self._whole_checks and not (self._by_request_id and snapshot.canaries):
            meta = filter_metadata.get(JWT_AUTHN_NAMESPACE)
            if meta is None or isinstance(meta, bytes):
                check_key = (
                    _CHECK,
                    meta,
                    peer_principal,
                    method,
                    path,
                    headers.get(SHADOW_HEADER),
                    extensions.get("permission"),
                    extensions.get("scope"),
                )
                seen: tuple[str, str | None, Outcome] | None = snapshot.memo.get(check_key)
                if seen is not None:
                    known, known_scope, outcome = seen
                    self._record(snapshot, outcome, known, known_scope, request_id)
                    if settled is not None:
                        settled.append((snapshot, known, known_scope, outcome))
                    return outcome
        # identify
        try:
            principal = self._identifier.identify(RequestIdentityInputs(headers, filter_metadata, peer_principal))
        except IdentityError as exc:
            log.info("identity_rejected", error=str(exc), request_id=request_id)
            return self.refuse(Reason.INVALID_TOKEN)
        if principal is None:
            return self.refuse(Reason.NO_IDENTITY)
        # required permission: the route's own setting first, then the service's route table.
        handle = extensions.get("permission")
        scope = extensions.get("scope") or None
        if not handle:
            try:
                match = snapshot.routes.resolve(method, path)
            except PathError:
                return self.refuse(Reason.MALFORMED_REQUEST)
            if match is None:
                return self.refuse(Reason.UNMAPPED_ROUTE)
            handle = match.permission
            scope = scope or match.scope
        key = (request_id or principal) if self._by_request_id else principal
        outcome = self._decided(
            snapshot,
            principal,
            handle,
            scope,
            shadow=headers.get(SHADOW_HEADER),
            stickiness_key=key,
            request_id=request_id,
        )
        if check_key is not None:
            remember(snapshot.memo, check_key, (principal, scope, outcome), MEMO_LIMIT)
            if settled is not None:
                settled.append((snapshot, principal, scope, outcome))
        return outcome

    def decide_for(
        self,
        principal: str,
        permission: str,
        scope: str | None = None,
        *,
        shadow: str | None = None,
        stickiness_key: str = "",
        request_id: str = "",
    ) -> Outcome:
        """The decision path for a caller that authenticated the principal itself and names the
        permission (the application API): the same selection, dark launch and telemetry as Envoy's
        Check, without identify and route. Values that could not come from a valid request deny as
        malformed, as they would at any front."""
        snapshot = self._store.snapshot
        if snapshot is None:
            return self.refuse(Reason.NO_SNAPSHOT)
        if (
            not 0 < len(principal) <= MAX_PRINCIPAL_LEN
            or not principal.isprintable()
            or not HANDLE_RE.fullmatch(permission)
            or (scope and not SCOPE_RE.fullmatch(scope))
        ):
            return self.refuse(Reason.MALFORMED_REQUEST)
        return self._decided(
            snapshot,
            principal,
            permission,
            scope or None,
            shadow=shadow or None,
            stickiness_key=stickiness_key or principal,
            request_id=request_id,
        )

    def _decided(
        self,
        snapshot: Snapshot,
        principal: str,
        handle: str,
        scope: str | None,
        *,
        shadow: str | None,
        stickiness_key: str,
        request_id: str,
    ) -> Outcome:
        """select, decide, observe, count: everything after the principal and the permission are known."""
        if shadow is not None and len(shadow) > MAX_SHADOW_HEADER:
            shadow = shadow[:MAX_SHADOW_HEADER]
        if stickiness_key != principal and snapshot.canaries:
            # The answer depends on a key other than the principal: nothing to reuse.
            ev = evaluate(snapshot, principal, handle, scope, shadow_header=shadow, stickiness_key=stickiness_key)
            outcome = Outcome(ev.reason, ev, handle)
        else:
            outcome = self._memoised(snapshot, principal, handle, scope, shadow)
        self._record(snapshot, outcome, principal, scope, request_id)
        return outcome

    def _memoised(
        self, snapshot: Snapshot, principal: str, handle: str, scope: str | None, shadow: str | None
    ) -> Outcome:
        # The memo is the snapshot's own (see Snapshot.memo): reached through the snapshot this
        # thread decides with, it can never hand out an answer computed from another one.
        memo: dict[tuple[str, str, str | None, str | None], Outcome] = snapshot.memo
        key = (principal, handle, scope, shadow)
        found = memo.get(key)
        if found is None:
            ev = evaluate(snapshot, principal, handle, scope, shadow_header=shadow, stickiness_key=principal)
            found = Outcome(ev.reason, ev, handle)
            remember(memo, key, found, MEMO_LIMIT)
        return found

    def log_sampled(
        self, principal: str, handle: str, scope: str | None, evaluation: Evaluation, request_id: str
    ) -> None:
        """The "decision" event of a Check drawn for the log (--log-decisions); a front that answers
        kept Checks itself draws them at :attr:`log_rate` and calls this."""
        log.info(
            "decision", reason=evaluation.reason.value, **_fields(principal, handle, scope, evaluation, request_id)
        )

    def record(self, snapshot: Snapshot, outcome: Outcome, principal: str, scope: str | None, request_id: str) -> None:
        """The telemetry of a decision made outside :meth:`decide` and :meth:`decide_for` (an account
        of a manifest, judged once per request): the same counters, shadow reports, decision log and
        mismatch log, so the dark launch sees it as it sees a Check."""
        self._record(snapshot, outcome, principal, scope, request_id)

    def _record(self, snapshot: Snapshot, outcome: Outcome, principal: str, scope: str | None, request_id: str) -> None:
        evaluation = outcome.evaluation
        if evaluation is None:
            return
        self._metrics.decision(evaluation)
        if self._reports is not None and snapshot.shadows:
            self._reports.observe(snapshot, evaluation, principal, outcome.permission or "", scope)
        if self._decision_log is not None:
            self._decision_log.record(principal, outcome.permission or "", scope, evaluation)
        sampled = self._log_rate and random.random() < self._log_rate  # noqa: S311 - sampling, not a secret
        if sampled:
            self.log_sampled(principal, outcome.permission or "", scope, evaluation, request_id)
        if evaluation.mismatch:
            fields = _fields(principal, outcome.permission, scope, evaluation, request_id)
            log.warning(
                "mismatch",
                **fields,
                observed={
                    o.version: {"decision": "allow" if o.allowed else "deny", "expected": o.expected}
                    for o in evaluation.observed
                    if o.mismatch
                },
            )


def _fields(
    principal: str, permission: str | None, scope: str | None, evaluation: Evaluation, request_id: str
) -> dict[str, Any]:
    return {
        "principal": principal,
        "permission": permission,
        "scope": scope,
        "request_id": request_id,
        "decision": "allow" if evaluation.allowed else "deny",
        "decided_by": evaluation.decided_by,
        "enforced_version": evaluation.enforced.meta.version,
        "selection": evaluation.selection.value,
    }
