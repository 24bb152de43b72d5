"""Check over real gRPC on loopback, with crafted requests: every outcome is an answer, never a crash."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar.local.tokens import DemoIssuer
from authz_sidecar.v1 import authz_pb2, authz_pb2_grpc

from .helpers import RunningSidecar, check, headers_of, request, shadow, sidecar_settings, status_of, write_policy


def test_allow_adds_decided_by_headers_and_metadata(running: RunningSidecar) -> None:
    resp = check(running, request(sub="alice"))
    assert resp.status.code == 0 and status_of(resp) == 200
    assert headers_of(resp) == {"x-authz-decided-by": "active", "x-authz-set-version": "v1"}
    assert dict(resp.dynamic_metadata) == {"decided_by": "active", "set_version": "v1", "selection": "default"}


def test_deny_is_403_with_json_body_naming_the_permission(running: RunningSidecar) -> None:
    resp = check(running, request(method="PUT", sub="bob"))
    assert status_of(resp) == 403 and resp.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert json.loads(resp.denied_response.body) == {
        "error": "forbidden",
        "reason": "missing_permission",
        "permission": "things:edit",
    }
    assert headers_of(resp)["x-authz-reason"] == "missing_permission"


def test_missing_attributes_are_a_400_not_a_crash(running: RunningSidecar) -> None:
    assert status_of(check(running, pb.CheckRequest())) == 400
    empty_http = pb.CheckRequest()
    empty_http.attributes.request.http.SetInParent()
    assert status_of(check(running, empty_http)) == 401  # no identity is the first thing missing


def test_no_identity_is_401_with_www_authenticate(running: RunningSidecar) -> None:
    resp = check(running, request(headers={}))
    assert status_of(resp) == 401
    assert headers_of(resp)["www-authenticate"].startswith("Bearer")


def test_empty_and_huge_headers(running: RunningSidecar) -> None:
    """Empty values are no identity; a megabyte of headers is decided like any other request."""
    assert status_of(check(running, request(headers={"authorization": "", "x-authz-shadow-version": ""}))) == 401
    huge = {f"x-h{i}": "v" * 10_000 for i in range(100)}
    assert status_of(check(running, request(headers=huge, sub="alice"))) == 200
    assert status_of(check(running, request(headers={"authorization": "Bearer " + "a" * 500_000}))) == 401
    assert status_of(check(running, request(path="/things/" + "x" * 20_000, sub="alice"))) == 400
    resp = check(running, request(headers={"x-authz-shadow-version": "v2" * 50_000}, sub="bob", method="PUT"))
    assert status_of(resp) == 403


def test_unknown_or_malformed_shadow_version_means_active_decides(running: RunningSidecar) -> None:
    for value in ("v9", "../v2", "v2\x7f", " ", "v2,v2"):
        resp = check(running, request(method="PUT", sub="bob", headers={"x-authz-shadow-version": value}))
        assert status_of(resp) == 403, value
    resp = check(running, request(sub="bob", headers={"x-authz-shadow-version": "v9"}))
    assert dict(resp.dynamic_metadata)["selection"] == "header_ignored"


def test_shadow_by_header_for_tester_and_not_for_others(running: RunningSidecar) -> None:
    resp = check(running, request(method="PUT", sub="bob", headers={"x-authz-shadow-version": "v2"}))
    assert status_of(resp) == 200
    assert headers_of(resp) == {"x-authz-decided-by": "shadow", "x-authz-set-version": "v2"}
    # alice is not a tester of v2: active decides even though she asked.
    resp = check(running, request(sub="alice", headers={"x-authz-shadow-version": "v2"}))
    assert headers_of(resp)["x-authz-set-version"] == "v1"


def test_shadow_without_testers_is_not_picked_by_header(tmp_path: Path) -> None:
    """A client naming a testerless shadow gets the active set's answer, and the selection says so."""
    policy = write_policy(tmp_path / "policy", shadows=[shadow("v2")])
    side = RunningSidecar(sidecar_settings(policy))
    try:
        side.wait_ready()
        resp = check(side, request(method="PUT", sub="bob", headers={"x-authz-shadow-version": "v2"}))
        assert status_of(resp) == 403
        resp = check(side, request(sub="bob", headers={"x-authz-shadow-version": "v2"}))
        assert headers_of(resp)["x-authz-set-version"] == "v1"
        assert dict(resp.dynamic_metadata)["selection"] == "header_ignored"
    finally:
        side.close()


def _token(issuer: DemoIssuer, **overrides: Any) -> str:
    return issuer.token("alice", **overrides)


def test_jwt_verified_here(running: RunningSidecar, issuer: DemoIssuer) -> None:
    resp = check(running, request(headers={"authorization": f"Bearer {_token(issuer)}"}))
    assert status_of(resp) == 200


def test_jwt_alg_none_wrong_key_expired_wrong_audience_are_401(running: RunningSidecar, issuer: DemoIssuer) -> None:
    now = int(time.time())
    claims = {"iss": issuer.issuer, "sub": "alice", "aud": "things", "exp": now + 600}
    bad = {
        "alg none": jwt.encode(claims, "", algorithm="none"),
        "wrong key": DemoIssuer(kid=issuer.kid).token("alice"),
        "expired": issuer.token("alice", ttl=-3600),
        "wrong audience": issuer.token("alice", audience="other-service"),
        "hs256 with public key as secret": jwt.encode(claims, "s" * 64, algorithm="HS256", headers={"kid": issuer.kid}),
        "garbage": "not.a.jwt",
    }
    for what, token in bad.items():
        resp = check(running, request(headers={"authorization": f"Bearer {token}"}))
        assert status_of(resp) == 401, what
        assert headers_of(resp)["x-authz-reason"] == "invalid_token", what


def test_mtls_peer_principal_identifies(running: RunningSidecar, policy_dir: Path) -> None:
    resp = check(running, request(peer="spiffe://mesh/ns/default/sa/unknown"))
    assert json.loads(resp.denied_response.body)["reason"] == "unknown_principal"


def test_context_extensions_take_precedence_over_route_table(running: RunningSidecar) -> None:
    resp = check(running, request(method="GET", sub="bob", extensions={"permission": "things:edit"}))
    assert status_of(resp) == 403
    resp = check(running, request(path="/not/in/catalog", sub="bob", extensions={"permission": "things:view"}))
    assert status_of(resp) == 200


def test_route_table_normalises_and_scopes(running: RunningSidecar) -> None:
    assert status_of(check(running, request(path="//things/x/../1/?q=1", sub="bob"))) == 200
    assert status_of(check(running, request(path="/nope", sub="alice"))) == 403
    assert status_of(check(running, request(path="/things%2F1", sub="alice"))) == 400
    assert status_of(check(running, request(path="/accounts/acme/things", sub="carol"))) == 200
    assert status_of(check(running, request(path="/accounts/globex/things", sub="carol"))) == 403


def test_health_serving_and_reflection(running: RunningSidecar) -> None:
    stub = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "envoy.service.auth.v3.Authorization"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"envoy.service.auth.v3.Authorization", "authz_sidecar.v1.Authz", "grpc.health.v1.Health"} <= names


def test_application_check_api(running: RunningSidecar) -> None:
    stub = authz_pb2_grpc.AuthzStub(running.channel)
    reply = stub.Check(authz_pb2.CheckRequest(principal="bob", permission="things:edit"), timeout=5)
    assert not reply.allowed and reply.reason == "missing_permission" and reply.mismatch
    assert [(o.version, o.allowed) for o in reply.observed] == [("v2", True)]
    reply = stub.Check(
        authz_pb2.CheckRequest(principal="bob", permission="things:edit", shadow_version="v2"), timeout=5
    )
    assert reply.allowed and reply.decided_by == "shadow" and reply.selection == "header"
    reply = stub.Check(authz_pb2.CheckRequest(principal="bob", permission="not a handle"), timeout=5)
    assert reply.reason == "malformed_request"


def test_metrics_and_status_over_http(running: RunningSidecar) -> None:
    check(running, request(method="PUT", sub="bob"))
    base = f"http://127.0.0.1:{running.sidecar.http_port}"
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    assert 'authz_decisions_total{decided_by="active",decision="deny",reason="missing_permission"' in text
    assert 'authz_mismatches_total{direction="deny_to_allow",kind="expected",version="v2"}' in text
    status = json.loads(urllib.request.urlopen(base + "/status").read())
    assert status["ready"] and status["active_version"] == "v1"
    assert [s["version"] for s in status["shadows"]] == ["v2"]
    assert urllib.request.urlopen(base + "/readyz").status == 200


def test_not_serving_and_denying_before_first_snapshot(tmp_path: Path) -> None:
    """With no valid policy yet, health says NOT_SERVING and every Check is denied with 503."""
    policy = write_policy(tmp_path / "p")
    (policy / "active.yaml").write_text("roles: [broken")
    side = RunningSidecar(sidecar_settings(policy, dev_principal_header="x-dev-user", identity=("header",)))
    try:
        time.sleep(0.2)
        health = health_pb2_grpc.HealthStub(side.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = check(side, request(headers={"x-dev-user": "alice"}))
        assert status_of(resp) == 503
        assert side.sidecar.store.last_error is not None and "not valid YAML" in side.sidecar.store.last_error
        # Fixing the file makes it ready without a restart.
        write_policy(policy)
        side.wait_ready()
        assert status_of(check(side, request(headers={"x-dev-user": "alice"}))) == 200
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        side.close()


def test_dev_header_identity_only_when_enabled(running: RunningSidecar) -> None:
    """Without the development flag, a principal header is just a header."""
    resp = check(running, request(headers={"x-dev-user": "alice", "x-authz-principal": "alice"}))
    assert status_of(resp) == 401


@pytest.mark.parametrize("stickiness", ["request_id"])
def test_request_id_stickiness(tmp_path: Path, stickiness: str) -> None:

    policy = write_policy(tmp_path / "p", shadows=[shadow("v2", weights={"us-east": 50})])
    side = RunningSidecar(
        sidecar_settings(policy, dev_principal_header="x-dev-user", identity=("header",), stickiness=stickiness)
    )
    try:
        side.wait_ready()
        versions = set()
        for i in range(40):
            req = request(headers={"x-dev-user": "alice"})
            req.attributes.request.http.id = f"req-{i}"
            versions.add(headers_of(check(side, req))["x-authz-set-version"])
        assert versions == {"v1", "v2"}  # one principal, many requests, both sets
    finally:
        side.close()
