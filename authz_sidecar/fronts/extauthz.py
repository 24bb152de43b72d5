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

from google.protobuf.message import DecodeError

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar._proto.view import check_view_pb2 as view
from authz_sidecar.decision.answering import Answering
from authz_sidecar.fronts.responses import Rendered, ResponseCache
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.model.reasons import Reason

_parse = view.CheckRequestView.FromString
# What _outcome reads has the same names in both.
_Request = pb.CheckRequest | view.CheckRequestView


class CheckHandler:
    """Decides ext_authz CheckRequests; a plain function, whatever the server model."""

    def __init__(self, answering: Answering) -> None:
        self._answering = answering
        self._decider = answering.decider
        self._responses = ResponseCache()

    def check(self, request: pb.CheckRequest) -> pb.CheckResponse:
        """Decide one CheckRequest message; for in-process callers and tests."""
        return self._guarded(request).message

    def check_wire(self, raw: bytes) -> bytes:
        """Decide serialised CheckRequest bytes and return serialised CheckResponse bytes.

        The server path: the request is parsed once here, and the response bytes were built when
        that response was first needed, so nothing is serialised per request.
        """
        try:
            request = _parse(raw)
        except DecodeError:
            return self._render(self._decider.refuse(Reason.MALFORMED_REQUEST)).wire
        return self._guarded(request).wire

    def _guarded(self, request: _Request) -> Rendered:
        headers = None
        if self._answering.traced and request.attributes.request.HasField("http"):
            headers = request.attributes.request.http.headers
        return self._render(self._answering.answer(headers, self._outcome, request))

    def _outcome(self, request: _Request) -> Outcome:
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
        )

    def _render(self, outcome: Outcome) -> Rendered:
        ev = outcome.evaluation
        if ev is not None and ev.allowed:
            return self._responses.allow(ev.decided_by, ev.enforced.meta.version, ev.selection)
        return self._responses.deny(outcome.reason, outcome.permission)
