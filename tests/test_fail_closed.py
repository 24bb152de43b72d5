"""A fault inside the sidecar denies the request; it never escapes as an RPC error or an allow."""

from __future__ import annotations

from authz_sidecar.answering import Answering
from authz_sidecar.decider import Decider
from authz_sidecar.documents import parse_catalog, parse_permission_set
from authz_sidecar.extauthz import CheckHandler
from authz_sidecar.identity import Identifier, RequestIdentityInputs
from authz_sidecar.metrics import Metrics
from authz_sidecar.snapshot import build_snapshot
from authz_sidecar.state import SnapshotStore

from .conftest import ACTIVE, CATALOG
from .test_check_grpc import request, status_of


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
