"""Applications asking directly (authz_sidecar.v1.Authz/Check) go through the same decision path as
Envoy's Check: the same answers, and the same telemetry (decision and per-set counters, mismatches,
refusals, the latency histogram, the authz.check span, the mismatch log event)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from authz_sidecar.v1 import authz_pb2, authz_pb2_grpc

from .helpers import RunningSidecar, check, request, scrape, shadow, sidecar_settings, write_policy
from .otlp import OtlpReceiver

# Families whose movement must be the same whichever front asked.
FAMILIES = (
    "authz_decisions_total",
    "authz_set_decisions_total",
    "authz_mismatches_total",
    "authz_shadow_evaluations_total",
    "authz_check_duration_seconds_count",
)
# (principal, method, path, permission, scope, shadow header)
CASES = [
    ("bob", "PUT", "/things/1", "things:edit", "", ""),  # v1 denies, v2 would allow: a mismatch
    ("alice", "GET", "/things/1", "things:view", "", ""),  # allowed everywhere
    ("qa-bot", "PUT", "/things/1", "things:edit", "", "v2"),  # a tester picks v2
    ("bob", "PUT", "/things/1", "things:edit", "", "v2"),  # not a tester: header ignored
    ("carol", "GET", "/accounts/acme/things", "things:view", "account:acme", ""),  # scoped grant
    ("carol", "GET", "/accounts/other/things", "things:view", "account:other", ""),  # out of scope
    ("nobody", "GET", "/things/1", "things:view", "", ""),  # unknown principal
]


@pytest.fixture(params=["aio", "threads"])
def side(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, receiver: OtlpReceiver
) -> Iterator[RunningSidecar]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")
    policy = write_policy(tmp_path / "policy", shadows=[shadow("v2", testers=["qa-bot"])])
    running = RunningSidecar(
        sidecar_settings(policy, identity=("header",), dev_principal_header="x-user", server_model=request.param)
    )
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


def moved(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {
        key: after.get(key, 0.0) - before.get(key, 0.0)
        for key in before.keys() | after.keys()
        if key[0] in FAMILIES and after.get(key, 0.0) != before.get(key, 0.0)
    }


def app_check(side: RunningSidecar, req: authz_pb2.CheckRequest, traceparent: str) -> authz_pb2.CheckResponse:
    stub = authz_pb2_grpc.AuthzStub(side.channel)
    return stub.Check(req, timeout=5, metadata=(("traceparent", traceparent),))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("principal", "method", "path", "permission", "scope", "header"), CASES)
def test_same_answers_and_same_telemetry_through_both_fronts(
    side: RunningSidecar,
    receiver: OtlpReceiver,
    principal: str,
    method: str,
    path: str,
    permission: str,
    scope: str,
    header: str,
) -> None:
    headers = {"x-user": principal}
    if header:
        headers["x-authz-shadow-version"] = header
    envoy_trace, app_trace = secrets.token_hex(16), secrets.token_hex(16)
    headers["traceparent"] = f"00-{envoy_trace}-{secrets.token_hex(8)}-01"

    before = scrape(side)
    with structlog.testing.capture_logs() as envoy_logs:
        envoy = check(side, request(path, method, headers=headers))
    envoy_moved = moved(before, scrape(side))

    before = scrape(side)
    with structlog.testing.capture_logs() as app_logs:
        app = app_check(
            side,
            authz_pb2.CheckRequest(principal=principal, permission=permission, scope=scope, shadow_version=header),
            f"00-{app_trace}-{secrets.token_hex(8)}-01",
        )
    app_moved = moved(before, scrape(side))

    envoy_metadata = dict(envoy.dynamic_metadata)
    assert envoy.HasField("ok_response") == app.allowed
    assert envoy_metadata.get("decided_by", app.decided_by) == app.decided_by
    assert envoy_metadata.get("selection", app.selection) == app.selection
    assert app_moved == envoy_moved and envoy_moved
    assert [e["event"] for e in app_logs if e["event"] == "mismatch"] == [
        e["event"] for e in envoy_logs if e["event"] == "mismatch"
    ]
    assert receiver.wait_for(app_trace).attributes == receiver.wait_for(envoy_trace).attributes


def test_refusals_are_counted_and_traced_for_applications(side: RunningSidecar, receiver: OtlpReceiver) -> None:
    """A malformed application request is a counted, traced deny, never an error."""
    for bad in (
        authz_pb2.CheckRequest(principal="bob", permission="not a handle"),
        authz_pb2.CheckRequest(principal="", permission="things:view"),
        authz_pb2.CheckRequest(principal="bob\n", permission="things:view"),
        authz_pb2.CheckRequest(principal="bob", permission="things:view", scope="account:\x00"),
    ):
        trace_id = secrets.token_hex(16)
        before = scrape(side)
        reply = app_check(side, bad, f"00-{trace_id}-{secrets.token_hex(8)}-01")
        assert not reply.allowed and reply.reason == "malformed_request"
        key = (
            "authz_decisions_total",
            (("decided_by", "none"), ("decision", "deny"), ("reason", "malformed_request"), ("selection", "none")),
        )
        assert scrape(side).get(key, 0.0) - before.get(key, 0.0) == 1.0
        assert receiver.wait_for(trace_id).attributes["authz.reason"] == "malformed_request"
