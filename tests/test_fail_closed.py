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
