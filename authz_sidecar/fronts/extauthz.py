"""Envoy's ext_authz over gRPC: the only module that reads a CheckRequest or writes a CheckResponse.

parse -> (the decision path in decider.py) -> render.

Rules:
- A deny is an answer, not an error: every outcome, faults included, is an OK RPC whose
  CheckResponse denies with a reason, so Envoy never falls back to ``failure_mode_allow``.
- Bytes that do not parse, or a request without HTTP attributes, are a malformed request (400).
- The server path parses the request into a view (``_proto/view/check_view.proto``) holding only the
  fields a decision reads: the rest is skipped undecoded, and the dynamic metadata stays bytes until
  an identity source reads it (docs/performance.md, "The Check path at the floor").
- An unexpected fault denies (500) and is logged; it never escapes as an RPC error or an allow.
"""

from __future__ import annotations

import structlog
from google.protobuf.message import DecodeError

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar._proto.view import check_view_pb2 as view
from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.decider import Settled
from authz_sidecar.fronts import checklane
from authz_sidecar.fronts.checklane import CheckLanes
from authz_sidecar.fronts.responses import Rendered, ResponseCache
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.model.reasons import Reason

log = structlog.get_logger("authz_sidecar.check")
_parse = view.CheckRequestView.FromString
# What _outcome reads has the same names in both.
_Request = pb.CheckRequest | view.CheckRequestView


class CheckHandler:
    """Decides ext_authz CheckRequests; a plain function, whatever the server model."""

    def __init__(self, answering: Answering, *, lane: bool = True) -> None:
        """`lane`: answer whole Checks asked again from their bytes (:mod:`.checklane`), where the
        lane is built and the configuration allows it."""
        self._answering = answering
        self._decider = answering.decider
        self._store = answering.decider.store
        self._responses = ResponseCache()
        self.lanes = (
            CheckLanes(self._decider, answering.latency)
            if lane and checklane.available() and self._decider.settles and not answering.traced
            else None
        )

    def check(self, request: pb.CheckRequest) -> pb.CheckResponse:
        """Decide one CheckRequest message; for in-process callers and tests."""
        return self._guarded(request, None).message

    def check_wire(self, raw: bytes, _context: object = None) -> bytes:
        """Decide serialised CheckRequest bytes and return serialised CheckResponse bytes (`_context`:
        so that gRPC's thread-pool server calls this itself, with no wrapper between).

        The server path: a Check asked again is answered by the lane; any other is parsed once
        here, and the response bytes were built when that response was first needed, so nothing is
        serialised per request.
        """
        lanes = self.lanes
        settled: list[Settled] | None = None
        if lanes is not None:
            served, lane = lanes.held
            if served is self._store.snapshot and lane is not None:
                try:
                    answer: bytes | None = lane.answer(raw)
                except Exception:
                    log.exception("check_lane_failed")  # a bug: the Python path answers instead
                    answer = None
                if answer is not None:
                    return answer
            settled = []
        try:
            request = _parse(raw)
        except DecodeError:
            return self._render(self._decider.refuse(Reason.MALFORMED_REQUEST)).wire
        rendered = self._guarded(request, settled)
        if settled and lanes is not None:
            try:
                lanes.learn(raw, rendered.wire, settled[0])
            except Exception:
                log.exception("check_lane_failed")  # a bug: this answer stands, the lane lacks it
        return rendered.wire

    def _guarded(self, request: _Request, settled: list[Settled] | None) -> Rendered:
        headers = None
        if self._answering.traced and request.attributes.request.HasField("http"):
            headers = request.attributes.request.http.headers
        return self._render(self._answering.answer(headers, self._outcome, (request, settled)))

    def _outcome(self, item: tuple[_Request, list[Settled] | None]) -> Outcome:
        request, settled = item
        attrs = request.attributes
        asked = attrs.request
        if not asked.HasField("http"):
            return self._decider.refuse(Reason.MALFORMED_REQUEST)
        http = asked.http
        return self._decider.decide(
            http.method,
            http.path,
            http.headers,
            filter_metadata=attrs.metadata_context.filter_metadata,
            peer_principal=attrs.source.principal,
            extensions=attrs.context_extensions,
            request_id=http.id,
            settled=settled,
        )

    def _render(self, outcome: Outcome) -> Rendered:
        ev = outcome.evaluation
        if ev is not None and ev.allowed:
            return self._responses.allow(ev.decided_by, ev.enforced.meta.version, ev.selection)
        return self._responses.deny(outcome.reason, outcome.permission)
