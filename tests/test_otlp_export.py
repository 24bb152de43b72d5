"""Spans leave the sidecar the way OpenTelemetry users configure an exporter: OTLP/gRPC or OTLP/HTTP
(protobuf) chosen by OTEL_EXPORTER_OTLP_PROTOCOL, endpoints, headers, timeouts in milliseconds and
TLS from the specification's variables (signal-specific ones first), and every span the exporter
loses is counted in authz_spans_dropped_total."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_sidecar.errors import ConfigError
from authz_sidecar.local.processes import free_port
from authz_sidecar.telemetry import tracing
from authz_sidecar.telemetry.otlpexport import ExportSettings

from .certs import make_certs
from .helpers import RunningSidecar, check, request, scrape, shadow, sidecar_settings, status_of, write_policy
from .otlp import OtlpHttpReceiver, OtlpReceiver

PROTOCOLS = ["grpc", "http/protobuf"]
DROPPED = "authz_spans_dropped_total"


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    r = OtlpHttpReceiver()
    try:
        yield r
    finally:
        r.stop()


def receiver_for(
    protocol: str, grpc_receiver: OtlpReceiver, http_receiver: OtlpHttpReceiver
) -> OtlpReceiver | OtlpHttpReceiver:
    return grpc_receiver if protocol == "grpc" else http_receiver


def traced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> RunningSidecar:
    """A sidecar whose only OTEL_* variables are `env` (exports every 50 ms)."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "things-authz")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    policy = write_policy(tmp_path / "policy", shadows=[shadow("v2", testers=["qa-bot"])])
    side = RunningSidecar(sidecar_settings(policy, identity=("header",), dev_principal_header="x-user"))
    side.wait_ready()
    return side


def traced_check(side: RunningSidecar, user: str = "alice") -> str:
    """One sampled Check (a W3C parent with the sampled flag); its trace id."""
    trace_id = secrets.token_hex(16)
    headers = {"x-user": user, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    assert status_of(check(side, request("/things/1", "GET", headers=headers))) == 200
    return trace_id


def dropped(side: RunningSidecar, reason: str) -> float:
    return scrape(side).get((DROPPED, (("reason", reason),)), 0.0)


def wait_dropped(side: RunningSidecar, reason: str, at_least: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while (n := dropped(side, reason)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{DROPPED}{{reason={reason!r}}} is {n}, expected >= {at_least}")
        time.sleep(0.05)
    return n


# --- against real receivers -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spans_and_configured_headers_arrive_over_each_protocol(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    grpc_receiver: OtlpReceiver,
    http_receiver: OtlpHttpReceiver,
    protocol: str,
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL picks the transport; the headers' values are percent-decoded;
    OTLP/HTTP posts to <endpoint>/v1/traces over one kept-alive connection."""
    receiver = receiver_for(protocol, grpc_receiver, http_receiver)
    side = traced(
        monkeypatch,
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc%3D%3D , x-tenant = acme",
        },
    )
    try:
        span = receiver.wait_for(traced_check(side))
        assert span.service == "things-authz"
        a = span.attributes
        assert (a["authz.decision"], a["authz.decided_by"], a["authz.permission"]) == ("allow", "active", "things:view")
        assert a["authz.region"] == "us-east" and a["authz.active_version"] == "v1"
        receiver.wait_for(traced_check(side, "bob"))  # a second export, after the first was answered
        for export in receiver.exports:
            assert export.headers["authorization"] == "Bearer abc=="
            assert export.headers["x-tenant"] == "acme"
        if protocol == "http/protobuf":
            assert {e.path for e in receiver.exports} == {"/v1/traces"}
            assert receiver.exports[0].headers["content-type"] == "application/x-protobuf"
            assert len(http_receiver.connections) == 1  # the connection was kept
        other = http_receiver if protocol == "grpc" else grpc_receiver
        assert other.spans == []
        assert dropped(side, "export_failed") == 0 and dropped(side, "queue_full") == 0
    finally:
        side.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_gzip_compression(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    grpc_receiver: OtlpReceiver,
    http_receiver: OtlpHttpReceiver,
    protocol: str,
) -> None:
    """OTEL_EXPORTER_OTLP_COMPRESSION=gzip: OTLP/HTTP bodies carry Content-Encoding: gzip, gRPC
    messages are compressed by gRPC; the collector reads the same spans."""
    receiver = receiver_for(protocol, grpc_receiver, http_receiver)
    side = traced(
        monkeypatch,
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        },
    )
    try:
        assert receiver.wait_for(traced_check(side)).attributes["authz.decision"] == "allow"
        if protocol == "http/protobuf":  # (gRPC decompresses before the servicer sees anything)
            assert receiver.exports[0].headers["content-encoding"] == "gzip"
    finally:
        side.close()


def test_signal_specific_variables_win_and_the_traces_endpoint_is_used_as_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, grpc_receiver: OtlpReceiver, http_receiver: OtlpHttpReceiver
) -> None:
    """The generic variables point at the gRPC receiver; the TRACES_ ones send OTLP/HTTP to a path of
    the HTTP receiver, unchanged, with the traces headers only."""
    side = traced(
        monkeypatch,
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-generic=1",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{http_receiver.endpoint}/custom/traces",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-traces=2",
        },
    )
    try:
        span = http_receiver.wait_for(traced_check(side))
        assert span.attributes["authz.decision"] == "allow"
        export = http_receiver.exports[0]
        assert export.path == "/custom/traces"
        assert export.headers["x-traces"] == "2" and "x-generic" not in export.headers
        assert grpc_receiver.exports == []
    finally:
        side.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_hanging_collector_is_given_up_after_the_timeout_in_milliseconds(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    grpc_receiver: OtlpReceiver,
    http_receiver: OtlpHttpReceiver,
    protocol: str,
) -> None:
    """OTEL_EXPORTER_OTLP_TIMEOUT=300 is 300 ms (the specification's unit): the exporter hangs up on
    a collector that never answers after about that long, counts the batch as dropped, and Checks
    answer all along."""
    receiver = receiver_for(protocol, grpc_receiver, http_receiver)
    receiver.hang = True
    side = traced(
        monkeypatch,
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "300",
        },
    )
    try:
        for _ in range(5):
            traced_check(side)
        waited = receiver.wait_abandoned(1)
        assert 0.15 <= waited[0] < 10, waited  # about 300 ms (less the time to connect and send), never 300 s
        for _ in range(5):
            traced_check(side)  # the exporter is stuck or backing off; Checks do not notice
        wait_dropped(side, "export_failed", 10)
        assert dropped(side, "queue_full") == 0
    finally:
        receiver.release()
        side.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spans_lost_to_a_collector_that_is_down_are_counted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, protocol: str
) -> None:
    """Nothing listens at the endpoint: every span is dropped, and counted as export_failed."""
    side = traced(
        monkeypatch,
        tmp_path,
        {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    )
    try:
        for _ in range(20):
            traced_check(side)
        assert wait_dropped(side, "export_failed", 20) == 20
        assert dropped(side, "queue_full") == 0
    finally:
        side.close()


def test_a_sick_collector_costs_spans_until_it_recovers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, http_receiver: OtlpHttpReceiver
) -> None:
    """OTLP/HTTP: a 503 drops the batch (counted); a collector that closes kept connections behind
    the exporter's back costs nothing (the export is sent again once, on a new connection); once the
    collector answers 200 again, spans arrive again after the exporter's back-off."""
    side = traced(
        monkeypatch,
        tmp_path,
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint},
    )
    try:
        http_receiver.close_after_answer = True
        for _ in range(3):
            http_receiver.wait_for(traced_check(side))
        assert len(http_receiver.connections) == 3 and dropped(side, "export_failed") == 0
        http_receiver.status = 503
        for _ in range(5):
            traced_check(side)
        wait_dropped(side, "export_failed", 5)
        http_receiver.status = 200
        http_receiver.wait_for(traced_check(side))
    finally:
        side.close()


def test_a_full_queue_drops_spans_and_counts_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, http_receiver: OtlpHttpReceiver
) -> None:
    """With the exporter stuck on a collector that does not answer, a queue of 20 (OTEL_BSP_MAX_QUEUE_SIZE)
    takes 20 spans and one batch of 10 is in flight: the other 70 Checks answer and their spans
    are counted as queue_full."""
    http_receiver.hang = True
    side = traced(
        monkeypatch,
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "30000",
            "OTEL_BSP_MAX_QUEUE_SIZE": "20",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
        },
    )
    try:
        for _ in range(100):
            traced_check(side)
        assert dropped(side, "queue_full") >= 70
    finally:
        http_receiver.release()
        side.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_the_configured_ca_and_client_certificate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, protocol: str
) -> None:
    """An https endpoint verified against OTEL_EXPORTER_OTLP_CERTIFICATE, presenting
    OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE/_KEY to a collector that requires a client certificate."""
    certs = make_certs(tmp_path / "certs")
    receiver: OtlpReceiver | OtlpHttpReceiver = (
        OtlpReceiver(certs, client_auth=True) if protocol == "grpc" else OtlpHttpReceiver(certs, client_auth=True)
    )
    try:
        side = traced(
            monkeypatch,
            tmp_path,
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_CERTIFICATE": str(certs["ca"]),
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(certs["client_cert"]),
                "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(certs["client_key"]),
            },
        )
        try:
            assert receiver.endpoint.startswith("https://")
            assert receiver.wait_for(traced_check(side)).attributes["authz.decision"] == "allow"
        finally:
            side.close()
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' is not supported"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'thrift'"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key"}, "OTEL_EXPORTER_OTLP_HEADERS: entry 1 is not key=value"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'collector:4318' is not an http:// or https:// URL",
        ),
    ],
)
def test_an_export_the_sidecar_cannot_make_is_refused_at_start_up(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    """One line on stderr and exit 1 before anything listens, rather than a sidecar that runs and
    drops every span."""
    policy = write_policy(tmp_path / "p")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    argv = [sys.executable, "-m", "authz_sidecar", "serve", "--policy-dir", str(policy)]
    argv += ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]
    proc = subprocess.Popen(
        argv,
        env={**clean, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the sidecar started") from None
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], err


# --- the settings, as the specification reads the variables --------------------------------------------


def settings(**env: str) -> ExportSettings:
    return ExportSettings.from_env(env)


def test_endpoints_follow_the_specification() -> None:
    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    # OTEL_TRACES_EXPORTER=otlp alone turns tracing on, to the default endpoint of the protocol.
    assert tracing.enabled({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.enabled({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert (settings().protocol, settings().endpoint, settings().secure) == ("grpc", "localhost:4317", False)
    assert settings(**http).endpoint == "http://localhost:4318/v1/traces"
    # The generic endpoint is a base URL: v1/traces is appended to its path.
    for base in ("http://c:4318/mycollector/", "http://c:4318/mycollector"):
        assert settings(**http, OTEL_EXPORTER_OTLP_ENDPOINT=base).endpoint == "http://c:4318/mycollector/v1/traces"
    assert settings(**http, OTEL_EXPORTER_OTLP_ENDPOINT="https://c").endpoint == "https://c/v1/traces"
    assert settings(**http, OTEL_EXPORTER_OTLP_ENDPOINT="https://u:pw@c").endpoint == "https://c/v1/traces"
    # The traces endpoint is used as it is (an empty path is /), and wins; an empty variable is unset.
    traces = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    both = {**http, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318"}
    assert settings(**both, **{traces: "http://c:4318/v1/traces"}).endpoint == "http://c:4318/v1/traces"
    assert settings(**both, **{traces: "http://c:4318/custom"}).endpoint == "http://c:4318/custom"
    assert settings(**both, **{traces: "http://c:4318"}).endpoint == "http://c:4318/"
    assert settings(**both, **{traces: ""}).endpoint == "http://base:4318/v1/traces"
    # gRPC: the scheme says whether TLS is used; without one, OTEL_EXPORTER_OTLP_INSECURE does.
    grpc_cases = [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317/"}, "c:4317", False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c"}, "c:443", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"}, "c:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"}, "c:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "TRUE"}, "c:4317", False),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false",
            },
            "c:4317",
            True,
        ),
        ({traces: "http://t:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "t:4317", False),
    ]
    for env, target, secure in grpc_cases:
        s = settings(**env)
        assert (s.protocol, s.endpoint, s.secure) == ("grpc", target, secure), env
    assert settings(
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc"
    ).protocol == ("grpc")


def test_timeouts_are_milliseconds_and_headers_are_percent_decoded() -> None:
    def settings(**env: str) -> ExportSettings:
        return ExportSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **env})

    timeout, traces_timeout = "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    assert settings().timeout == 10.0  # the specification's default, 10000 ms
    assert settings(**{timeout: "500"}).timeout == 0.5
    assert settings(**{timeout: "2"}).timeout == 0.002
    assert settings(**{timeout: "15000"}).timeout == 15.0
    assert settings(**{timeout: "500", traces_timeout: "250"}).timeout == 0.25
    assert settings(**{timeout: "0"}).timeout is None  # zero is no limit
    for bad in ("-5", "soon", "2.5"):  # a warning, and the default
        assert settings(**{timeout: bad}).timeout == 10.0, bad
    headers = "OTEL_EXPORTER_OTLP_HEADERS"
    decoded = settings(**{headers: " Api-Key = a%2Cb%3Dc ,, x-empty= ,x-raw=a=b"}).headers
    assert decoded == (("api-key", "a,b=c"), ("x-empty", ""), ("x-raw", "a=b"))
    generic_and_traces = {headers: "x-generic=1", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-traces=2"}
    assert settings(**generic_and_traces).headers == (("x-traces", "2"),)
    compression = "OTEL_EXPORTER_OTLP_COMPRESSION"
    assert settings(**{compression: "gzip"}).gzip and not settings().gzip
    assert not settings(**{compression: "gzip", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "none"}).gzip
    assert not settings(**{compression: "zstd"}).gzip  # unknown: a warning, and no compression


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "'http/json' is not supported"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=1,b"}, "OTEL_EXPORTER_OTLP_HEADERS: entry 2 is not key=value"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "bad key=1"}, "OTEL_EXPORTER_OTLP_HEADERS: 'bad key' is not a header name"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "x-a=1%0D%0Ax-b: 2"}, "OTEL_EXPORTER_OTLP_HEADERS: the value of 'x-a'"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "grpc-timeout=1"}, "'grpc-timeout' is reserved"),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        ({"OTEL_EXPORTER_OTLP_CLIENT_KEY": __file__}, "go together"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:port"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **env})
    assert needle in str(caught.value)
    assert "%0D" not in str(caught.value)  # header values (secrets, often) are never repeated
