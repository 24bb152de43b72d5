"""``authz_sidecar.v1.Authz`` SignEvent and VerifyEvent: envelopes an asynchronous consumer can
trust, re-checked at the moment it acts (seed 004).

SignEvent asks the decision path (:meth:`~authz_sidecar.decision.decider.Decider.decide_for`,
through :class:`~authz_sidecar.decision.answering.Answering`, so it is counted and traced like any
decision) whether the principal holds the permission now, and signs only if it does: an envelope
is never evidence of a permission that was not held when it was made.

VerifyEvent checks, in this order, and stops at the first refusal: the signature (``unknown_key``,
``bad_signature``), the expiry (``expired``), the permission against the set in force now (a
permission revoked since signing is refused, ``valid`` but not ``allowed``), then, only for an
event still allowed and only when asked, the consume (``replayed`` for every consume after the
first). A denied event is never consumed, so it can be acted on later if the permission comes back
before it expires.

The checks are plain functions of the request, run on whichever thread serves the RPC; only the
consume touches etcd, on the event loop (:mod:`authz_sidecar.fronts.grpcfront` hands it over from
the thread-pool server, as it does the Registry's calls).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.eventkeys import EventKeys
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.fronts.appapi import trace_headers
from authz_sidecar.fronts.appidentity import AppIdentity, AppRefusedError
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.model.events import DEFAULT_CLOCK_SKEW, EnvelopeFields, EventRefusal, expired, remembered_for
from authz_sidecar.model.reasons import Reason
from authz_sidecar.store.events import ConsumeFullError, ConsumeUnavailableError, Consumptions
from authz_sidecar.telemetry.metrics import Metrics
from authz_sidecar.v1 import authz_pb2

log = structlog.get_logger("authz_sidecar.fronts.events")

# How a deny decided before signing is told to the caller: the reason leads the message.
_SIGN_REFUSAL = {
    Reason.NO_SNAPSHOT: grpc.StatusCode.UNAVAILABLE,
    Reason.MALFORMED_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
}
NO_KEY = (
    "this sidecar has no event signing key: start it with --event-key FILE (PEM PKCS#8 Ed25519) "
    "or AUTHZ_EVENT_KEY; any sidecar verifies without one"
)


class EventError(Exception):
    """A SignEvent or VerifyEvent refused with a gRPC status, not answered."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the checks before the consume decided: the answer, and whether it still needs the
    consume (then ``ttl`` is how long the record must last)."""

    response: authz_pb2.VerifyEventResponse
    event_id: str = ""
    ttl: int = 0

    @property
    def consume(self) -> bool:
        return self.ttl > 0


def fields_of(envelope: authz_pb2.Envelope) -> EnvelopeFields:
    return EnvelopeFields(
        payload=envelope.payload,
        principal=envelope.principal,
        permission=envelope.permission,
        scope=envelope.scope,
        key_id=envelope.key_id,
        issued_at=envelope.issued_at,
        expires_at=envelope.expires_at,
        event_id=envelope.event_id,
        revision=envelope.revision,
    )


class EventsService:
    def __init__(
        self,
        answering: Answering,
        store: SnapshotStore,
        keys: EventKeys,
        consumptions: Consumptions,
        metrics: Metrics,
        *,
        default_ttl: int = 3600,
        max_ttl: int = 86400,
        clock_skew: int = DEFAULT_CLOCK_SKEW,
        clock: Callable[[], float] = time.time,
        identity: AppIdentity | None = None,
    ) -> None:
        self._answering = answering
        self._decider = answering.decider
        self._store = store
        self.keys = keys
        # Replaced on start when the sidecar has etcd (the client is made then).
        self.consumptions = consumptions
        self._metrics = metrics
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock_skew = clock_skew
        self._clock = clock
        # Who a call is for, as the application API's Check decides it (None: bare principals only).
        self.identity = identity

    def _principal(self, principal: str, token: str, context: Any) -> str:
        """Who the envelope is for. The one place a caller's identity is established for events:
        the caller's token and whether a bare principal is taken from this caller are decided
        here (as for Check)."""
        if self.identity is None:
            if token:
                raise EventError(grpc.StatusCode.UNAUTHENTICATED, "this sidecar verifies no tokens")
            return principal
        try:
            return self.identity.principal(principal, token, str(context.peer()))
        except AppRefusedError as exc:
            raise EventError(exc.code, exc.message) from None

    def _decide(
        self, principal: str, permission: str, scope: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[Outcome, int]:
        """The decision path's answer, and the revision of the snapshot it was asked of (read first:
        if a newer one is installed meanwhile, the revision named is the older, never a newer one
        than what decided)."""
        snapshot = self._store.snapshot
        revision = snapshot.revision if snapshot is not None else 0
        headers = trace_headers(metadata) if self._answering.traced else None
        outcome = self._answering.answer(
            headers,
            lambda _: self._decider.decide_for(principal, permission, scope or None),
            None,
        )
        return outcome, revision

    def sign(self, request: authz_pb2.SignEventRequest, context: Any) -> authz_pb2.SignEventResponse:
        principal = self._principal(request.principal, request.token, context)
        signer = self.keys.signer
        if signer is None:
            raise EventError(grpc.StatusCode.FAILED_PRECONDITION, NO_KEY)
        if self.keys.published_only and not self.keys.is_published(signer.kid):
            raise EventError(
                grpc.StatusCode.UNAVAILABLE,
                f"the signing key {signer.kid} is not published in etcd yet: nobody could verify the envelope",
            )
        ttl = request.ttl_seconds or self.default_ttl
        if not 0 < ttl <= self.max_ttl:
            raise EventError(
                grpc.StatusCode.INVALID_ARGUMENT, f"ttl_seconds must be 1..{self.max_ttl} (--event-max-ttl), or 0"
            )
        outcome, revision = self._decide(principal, request.permission, request.scope, context.invocation_metadata())
        if not outcome.allowed:
            reason = outcome.reason
            code = _SIGN_REFUSAL.get(reason, grpc.StatusCode.PERMISSION_DENIED)
            where = f" in {request.scope}" if request.scope else ""
            raise EventError(code, f"{reason.value}: {principal!r} may not {request.permission!r}{where}; not signed")
        issued = int(self._clock())
        fields = EnvelopeFields(
            payload=request.payload,
            principal=principal,
            permission=request.permission,
            scope=request.scope,
            key_id=signer.kid,
            issued_at=issued,
            expires_at=issued + ttl,
            event_id=secrets.token_hex(16),
            revision=revision,
        )
        envelope = authz_pb2.Envelope(
            payload=fields.payload,
            principal=fields.principal,
            permission=fields.permission,
            scope=fields.scope,
            key_id=fields.key_id,
            issued_at=fields.issued_at,
            expires_at=fields.expires_at,
            event_id=fields.event_id,
            revision=fields.revision,
            signature=signer.sign(fields),
        )
        self._metrics.events_signed.inc()
        log.info(
            "event_signed",
            event_id=fields.event_id,
            key_id=signer.kid,
            principal=principal,
            permission=fields.permission,
            scope=fields.scope or None,
            expires_at=fields.expires_at,
            payload_bytes=len(fields.payload),
        )
        return authz_pb2.SignEventResponse(envelope=envelope)

    def judge(self, request: authz_pb2.VerifyEventRequest, context: Any) -> Verdict:
        """Signature, expiry, permission: everything but the consume."""
        if not request.HasField("envelope"):
            raise EventError(grpc.StatusCode.INVALID_ARGUMENT, "VerifyEvent needs the envelope")
        if not self.keys.ready:
            raise EventError(grpc.StatusCode.UNAVAILABLE, "the published event keys have not been read from etcd yet")
        envelope = request.envelope
        fields = fields_of(envelope)
        refusal = self.keys.check(fields, envelope.signature)
        if refusal is None and expired(fields, self._clock(), self.clock_skew):
            refusal = EventRefusal.EXPIRED
        if refusal is not None:
            return self._answered(fields, authz_pb2.VerifyEventResponse(reason=refusal.value), request.consume)
        outcome, revision = self._decide(
            fields.principal, fields.permission, fields.scope, context.invocation_metadata()
        )
        evaluation = outcome.evaluation
        response = authz_pb2.VerifyEventResponse(
            valid=True,
            allowed=outcome.allowed,
            reason=outcome.reason.value,
            version=evaluation.enforced.meta.version if evaluation is not None else "",
            revision=revision,
        )
        if not outcome.allowed or not request.consume:
            return self._answered(fields, response, request.consume)
        return Verdict(response, fields.event_id, remembered_for(fields, self._clock(), self.clock_skew))

    async def settle(self, verdict: Verdict) -> authz_pb2.VerifyEventResponse:
        """The verdict's answer, after the consume it asks for (UNAVAILABLE if it cannot be recorded)."""
        response = verdict.response
        if not verdict.consume:
            return response
        try:
            first = await self.consumptions.consume(verdict.event_id, verdict.ttl)
        except ConsumeUnavailableError as exc:
            log.warning("event_consume_failed", event_id=verdict.event_id, error=str(exc))
            raise EventError(grpc.StatusCode.UNAVAILABLE, f"the consume could not be recorded: {exc}") from None
        except ConsumeFullError as exc:
            log.warning("event_consume_failed", event_id=verdict.event_id, error=str(exc))
            raise EventError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the consume could not be recorded: {exc}") from None
        if not first:
            response = authz_pb2.VerifyEventResponse(
                reason=EventRefusal.REPLAYED.value, version=response.version, revision=response.revision
            )
        self._count(verdict.event_id, response, consume=True)
        return response

    def _answered(self, fields: EnvelopeFields, response: authz_pb2.VerifyEventResponse, consume: bool) -> Verdict:
        self._count(fields.event_id, response, consume=consume, key_id=fields.key_id)
        return Verdict(response)

    def _count(
        self, event_id: str, response: authz_pb2.VerifyEventResponse, *, consume: bool, key_id: str = ""
    ) -> None:
        self._metrics.event_verified(response.reason)
        refused_envelope = response.reason in (EventRefusal.UNKNOWN_KEY, EventRefusal.BAD_SIGNATURE)
        (log.warning if refused_envelope else log.info)(
            "event_verified",
            event_id=event_id,
            reason=response.reason,
            valid=response.valid,
            allowed=response.allowed,
            consume=consume,
            **({"key_id": key_id} if key_id else {}),
        )
