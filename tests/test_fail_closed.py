"""A fault inside the sidecar denies the request; it never escapes as an RPC error or an allow."""

from __future__ import annotations

from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.decider import Decider
from authz_sidecar.decision.identity import Identifier, RequestIdentityInputs
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import parse_catalog, parse_permission_set
from authz_sidecar.fronts.extauthz import CheckHandler
from authz_sidecar.model.snapshot import build_snapshot
from authz_sidecar.telemetry.metrics import Metrics

from .helpers import ACTIVE, CATALOG, request, status_of


def broken_source(_inputs: RequestIdentityInputs) -> str | None:
    raise RuntimeError("a bug")


def test_internal_error_denies_with_500() -> None:
    store = SnapshotStore()
    store.install(build_snapshot(parse_permission_set(ACTIVE, "a"), [], [parse_catalog(CATALOG, "c")]))
    metrics = Metrics(store)
    handler = CheckHandler(Answering(Decider(store, Identifier([("broken", broken_source)]), metrics), metrics))
    resp = handler.check(request(sub="alice"))
    assert status_of(resp) == 500
    assert resp.denied_response.body == '{"error":"internal_error","reason":"internal_error"}'
    assert b'reason="internal_error"' in metrics.render()


def test_the_wire_path_answers_as_the_message_path_does() -> None:
    """check_wire parses only the fields a decision reads (the request view) and keeps the
    dynamic metadata as bytes; every answer is the one the full message gives, whatever else
    Envoy sends beside those fields."""
    from google.protobuf.struct_pb2 import Struct

    from authz_sidecar.decision.identity import build_identifier

    store = SnapshotStore()
    store.install(build_snapshot(parse_permission_set(ACTIVE, "a"), [], [parse_catalog(CATALOG, "c")]))
    metrics = Metrics(store)
    identifier = build_identifier(["jwt_authn", "mtls"], jwt_authn_payload_key="jwt_payload")
    handler = CheckHandler(Answering(Decider(store, identifier, metrics), metrics))
    cases = [
        request(sub="alice"),
        request(sub="alice", method="DELETE"),
        request(sub="mallory"),
        request(),
        request(peer="spiffe://cluster/ns/x/sa/alice"),
        request(sub="alice", extensions={"permission": "things:edit"}),
        request(sub="alice", headers={"x-authz-shadow-version": "v9"}),
        request(sub="alice", path="/nowhere"),
    ]
    for req in cases:
        attrs = req.attributes
        attrs.source.address.socket_address.address, attrs.source.address.socket_address.port_value = "10.0.0.1", 4
        attrs.destination.principal = "spiffe://cluster/ns/x/sa/things"
        attrs.request.time.GetCurrentTime()
        attrs.request.http.host, attrs.request.http.scheme, attrs.request.http.protocol = "things", "http", "HTTP/2"
        other = Struct()
        other.update({"k": [1, "two", {"three": None}]})
        attrs.metadata_context.filter_metadata["envoy.filters.http.other"].CopyFrom(other)
        attrs.route_metadata_context.filter_metadata["route"].CopyFrom(other)
        attrs.tls_session.sni = "things"
        wire = handler.check_wire(req.SerializeToString())
        assert wire == handler.check(req).SerializeToString(), req
