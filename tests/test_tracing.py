"""Every Check is an `authz.check` span in the request's own trace, saying which set decided."""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path

import pytest

from authz_sidecar.model.selection import stable_bucket
from authz_sidecar.telemetry import otlpencoding, sampling, tracecontext, tracing

from .helpers import ACTIVE, RunningSidecar, check, request, shadow, sidecar_settings, status_of, write_policy
from .otlp import OtlpReceiver


def traced_sidecar(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, model: str) -> RunningSidecar:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "things-authz")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")  # milliseconds
    policy = write_policy(tmp_path / "policy", shadows=[shadow("v2", weights={"us-east": 100}, testers=["qa-bot"])])
    side = RunningSidecar(
        sidecar_settings(policy, identity=("header",), dev_principal_header="x-user", server_model=model)
    )
    side.wait_ready()
    return side


def ids() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_hex(8)


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not tracing.enabled({})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert not tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_SDK_DISABLED": "true"})


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_span_is_a_child_of_the_request_trace_with_the_decision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, receiver: OtlpReceiver, model: str
) -> None:
    side = traced_sidecar(monkeypatch, tmp_path, receiver.endpoint, model)
    try:
        # W3C traceparent; bob is canaried to v2 (100% in us-east), which makes him an editor.
        trace_id, parent = ids()
        headers = {"x-user": "bob", "traceparent": f"00-{trace_id}-{parent}-01"}
        assert status_of(check(side, request("/things/1", "PUT", headers=headers))) == 200
        span = receiver.wait_for(trace_id)
        assert span.parent_span_id == parent and span.service == "things-authz"
        a = span.attributes
        assert a["authz.decision"] == "allow" and a["authz.decided_by"] == "shadow"
        assert a["authz.selection"] == "canary" and a["authz.enforced_version"] == "v2"
        assert a["authz.active_version"] == "v1" and a["authz.permission"] == "things:edit"
        assert a["authz.region"] == "us-east" and a["authz.reason"] == "allowed"
        assert a["authz.mismatch"] is True and a["authz.active.decision"] == "deny"
        # B3 single header; a tester picks v2 by header.
        trace_id, parent = ids()
        headers = {"x-user": "qa-bot", "b3": f"{trace_id}-{parent}-1", "x-authz-shadow-version": "v2"}
        check(side, request("/things/1", "GET", headers=headers))
        a = receiver.wait_for(trace_id).attributes
        assert a["authz.selection"] == "header" and a["authz.decided_by"] == "shadow"
        # B3 multi headers; alice is denied nothing: the active set... and carol outside her scope is.
        trace_id, parent = ids()
        headers = {"x-user": "carol", "x-b3-traceid": trace_id, "x-b3-spanid": parent, "x-b3-sampled": "1"}
        assert status_of(check(side, request("/accounts/globex/things", "GET", headers=headers))) == 403
        a = receiver.wait_for(trace_id).attributes
        assert a["authz.decision"] == "deny" and a["authz.reason"] == "missing_permission"
        # No identity: a span too, decided by no set.
        trace_id, parent = ids()
        check(side, request("/things/1", "GET", headers={"traceparent": f"00-{trace_id}-{parent}-01"}))
        a = receiver.wait_for(trace_id).attributes
        assert a["authz.decided_by"] == "none" and a["authz.reason"] == "no_identity"
    finally:
        side.close()


def test_an_unreachable_collector_never_fails_a_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    timings = {}
    cases = (("collector down", f"http://127.0.0.1:{dead}"), ("collector up", receiver.endpoint), ("off", ""))
    for label, endpoint in cases:
        side = traced_sidecar(monkeypatch, tmp_path / label.replace(" ", "-"), endpoint, "threads")
        assert (side.sidecar.tracer is None) == (not endpoint)
        try:
            started = time.perf_counter()
            for i in range(300):
                trace_id, parent = ids()
                headers = {"x-user": "alice", "traceparent": f"00-{trace_id}-{parent}-01"}
                assert status_of(check(side, request(f"/things/{i}", "GET", headers=headers))) == 200
            timings[label] = (time.perf_counter() - started) / 300
        finally:
            side.close()
    print(
        "\n  300 Checks over gRPC each (not asserted): "
        + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in timings.items())
    )


@pytest.mark.envoy
def test_a_request_through_envoy_is_one_trace_with_envoy_and_the_sidecar(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    from authz_sidecar.local.envoy import validate
    from authz_sidecar.local.mesh import Mesh

    policy = write_policy(
        tmp_path / "policy",
        shadows=[
            shadow("v2", testers=["qa-bot"], weights={"us-east": 10}),
            # The active set's grants again (it locks no handle): bob, in its cohort, is decided by it.
            shadow("v3", grants=ACTIVE["grants"], cohorts={"us-east": {"principals": ["bob"]}}),
        ],
    )
    canaried = next(f"user-{i}" for i in range(1000) if stable_bucket(f"user-{i}", "v2") < 1000)
    mesh = Mesh(workdir=tmp_path, policy_dir=policy, region="us-east", collector=("127.0.0.1", receiver.port))
    mesh.start()
    try:
        assert validate(tmp_path / "envoy.yaml").returncode == 0  # the mesh's config, with Envoy's tracer
        traces: list[str] = []
        for principal, extra, decided_by in (
            ("alice", {}, "active"),
            ("qa-bot", {"x-authz-shadow-version": "v2"}, "shadow"),
            (canaried, {}, "shadow"),
            ("bob", {}, "shadow"),
        ):
            trace_id, parent = ids()
            headers = {"traceparent": f"00-{trace_id}-{parent}-01", **extra}
            status, _h, _b = mesh.request("GET", "/things/1", principal, headers)
            assert status == (200 if principal != canaried else 403)  # the canaried user has no grant
            span = receiver.wait_for(trace_id)
            assert span.service == "authz-sidecar" and span.parent_span_id == parent
            assert span.attributes["authz.decided_by"] == decided_by
            if principal == canaried:
                assert span.attributes["authz.selection"] == "canary"
            if principal == "bob":  # in v3's cohort here, whatever v2's weight would draw
                assert span.attributes["authz.selection"] == "cohort"
                assert span.attributes["authz.enforced_version"] == "v3"
            assert span.attributes["authz.permission"] == "things:view"
            traces.append(trace_id)
            print(f"\n  trace {trace_id}: {span.name} {json.dumps(span.attributes, sort_keys=True)}")
        for trace_id in traces:  # Envoy exports its spans in batches (every 5 s): wait once for all
            assert _wait_envoy(receiver, trace_id).trace_id == trace_id
    finally:
        mesh.stop()


def receiver_spans(receiver: OtlpReceiver, trace_id: str) -> list:  # type: ignore[type-arg]
    return [s for s in receiver.spans if s.trace_id == trace_id]


def _wait_envoy(receiver: OtlpReceiver, trace_id: str, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [s for s in receiver_spans(receiver, trace_id) if s.service == "envoy"]
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(f"no span from Envoy in trace {trace_id}")


def test_trace_context_from_w3c_and_b3_headers_and_garbage() -> None:
    t, s = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    w3c = tracecontext.parent_from({"traceparent": f"00-{t}-{s}-01", "tracestate": "vendor=x"})
    assert w3c == tracecontext.Parent(int(t, 16), int(s, 16), True, "vendor=x")
    assert tracecontext.parent_from({"traceparent": f"00-{t}-{s}-00"}).sampled is False  # type: ignore[union-attr]
    assert tracecontext.parent_from({"b3": f"{t}-{s}-0"}).sampled is False  # type: ignore[union-attr]
    assert tracecontext.parent_from({"b3": f"{t[16:]}-{s}"}).trace_id == int(t[16:], 16)  # type: ignore[union-attr]
    multi = {"x-b3-traceid": t, "x-b3-spanid": s, "x-b3-sampled": "1"}
    assert tracecontext.parent_from(multi) == tracecontext.Parent(int(t, 16), int(s, 16), True)
    for bad in (
        {"traceparent": "00-xyz-abc-01"},
        {"traceparent": f"00-{'0' * 32}-{s}-01"},  # all-zero trace id is invalid
        {"traceparent": f"ff-{t}-{s}-01"},
        {"b3": "0"},  # "deny" in B3 single: no parent
        {"x-b3-traceid": t},
    ):
        assert tracecontext.parent_from(bad) is None, bad


def test_samplers_follow_the_spec() -> None:
    parent = tracecontext.Parent(1, 2, sampled=False)
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    sampler = sampling.Sampler.from_env(env)
    assert sampler.sampled(5, parent) is False  # the parent decided
    ids_ = [secrets.randbits(128) for _ in range(20_000)]
    share = sum(sampler.sampled(i, None) for i in ids_) / len(ids_)
    assert 0.22 < share < 0.28
    assert sampling.Sampler.from_env({"OTEL_TRACES_SAMPLER": "always_off"}).sampled(5, None) is False
    assert sampling.Sampler.from_env({}).sampled(5, parent) is False  # parentbased_always_on
    assert sampling.Sampler.from_env({}).sampled(5, None) is True


def test_spans_encoded_by_hand_are_valid_otlp() -> None:
    from opentelemetry.proto.trace.v1 import trace_pb2

    parent = tracecontext.Parent(0xABC, 0xDEF, True, "k=v")
    attributes = otlpencoding.encode_attributes({"authz.decision": "allow", "authz.mismatch": True})
    span = trace_pb2.Span.FromString(otlpencoding.encode_span((0xABC, 0x123, parent, 10, 20, attributes)))
    assert span.name == "authz.check" and span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == f"{0xABC:032x}" and span.parent_span_id.hex() == f"{0xDEF:016x}"
    assert (span.start_time_unix_nano, span.end_time_unix_nano, span.trace_state) == (10, 20, "k=v")
    assert {a.key: (a.value.string_value or a.value.bool_value) for a in span.attributes} == {
        "authz.decision": "allow",
        "authz.mismatch": True,
    }
