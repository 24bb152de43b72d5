"""The gRPC server's bounds, over real gRPC on loopback in both server models: a request message over
--grpc-max-message-bytes and RPCs beyond --grpc-max-concurrent-rpcs are answered RESOURCE_EXHAUSTED
(Envoy then fails closed) and counted in authz_rejected_total."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_sidecar.fronts.grpcfront import RpcLimits, _Bounds, _PoolRoutes
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.v1 import authz_pb2, authz_pb2_grpc, registry_pb2, registry_pb2_grpc

from .helpers import (
    CATALOG,
    RunningSidecar,
    check,
    decision,
    etcd_sidecar,
    request,
    scrape,
    seed,
    sidecar_settings,
    status_of,
    unique_prefix,
)

MODELS = ["aio", "threads"]


def rejected(side: RunningSidecar, reason: str) -> float:
    return scrape(side).get(("authz_rejected_total", (("front", "grpc"), ("reason", reason))), 0.0)


def sidecar(policy_dir: Path, model: str, **overrides: object) -> RunningSidecar:
    side = RunningSidecar(sidecar_settings(policy_dir, server_model=model, **overrides))
    side.wait_ready()
    return side


@pytest.fixture(params=MODELS)
def default_side(request: pytest.FixtureRequest, policy_dir: Path) -> Iterator[RunningSidecar]:
    side = sidecar(policy_dir, request.param)
    try:
        yield side
    finally:
        side.close()


def test_a_message_over_the_default_limit_is_resource_exhausted_and_counted(default_side: RunningSidecar) -> None:
    """4 MiB (gRPC's own default) is the default; a Check of 4.1 MiB is refused and counted, and the
    server answers the next request as before."""
    over = request(headers={"x-big": "a" * (4 * 1024 * 1024 + 100_000)}, sub="alice")
    with pytest.raises(grpc.RpcError) as err:
        check(default_side, over)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejected(default_side, "message_too_large") == 1
    assert status_of(check(default_side, request(sub="alice"))) == 200


@pytest.mark.parametrize("model", MODELS)
def test_every_method_refuses_a_message_over_the_configured_limit(policy_dir: Path, model: str) -> None:
    """Envoy's Check and the application API alike; a message far over the limit is refused too."""
    side = sidecar(policy_dir, model, grpc_max_message_bytes=64 * 1024)
    try:
        assert status_of(check(side, request(headers={"x-fill": "a" * 60_000}, sub="alice"))) == 200
        app = authz_pb2_grpc.AuthzStub(side.channel)
        calls: list[Callable[[], object]] = [
            lambda: check(side, request(headers={"x-big": "a" * 70_000}, sub="alice")),
            lambda: app.Check(authz_pb2.CheckRequest(principal="a" * 70_000, permission="things:view"), timeout=5),
            lambda: check(side, request(headers={"x-big": "a" * 2_000_000}, sub="alice")),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rejected(side, "message_too_large") >= 2
        # Bytes that do not parse as the method's request: the client's fault.
        with pytest.raises(grpc.RpcError) as err:
            side.channel.unary_unary("/authz_sidecar.v1.Authz/Check", None, None)(b"\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        side.close()


def test_every_service_is_served_through_the_bounds(default_side: RunningSidecar) -> None:
    """Health (Check and the Watch stream), reflection and the application API are found by the same
    lookup as Check; a method nobody serves is UNIMPLEMENTED and counted as no refusal."""
    health = health_pb2_grpc.HealthStub(default_side.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="authz_sidecar.v1.Authz"), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    refl = reflection_pb2_grpc.ServerReflectionStub(default_side.channel)
    listed = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "authz_sidecar.v1.Registry" in {s.name for s in listed.list_services_response.service}
    app = authz_pb2_grpc.AuthzStub(default_side.channel)
    assert app.Check(authz_pb2.CheckRequest(principal="alice", permission="things:view"), timeout=5).allowed
    with pytest.raises(grpc.RpcError) as err:
        default_side.channel.unary_unary("/authz_sidecar.v1.Authz/Nothing", None, None)(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert status_of(check(default_side, request(sub="alice"))) == 200
    assert rejected(default_side, "concurrency") == 0


@pytest.mark.parametrize("model", MODELS)
def test_rpcs_beyond_the_concurrency_limit_are_resource_exhausted_and_counted(tmp_path: Path, model: str) -> None:
    """With a limit of 1, a Registry call waiting on a paused etcd takes the only slot: Checks are
    refused until etcd answers that call, then answered again."""
    cluster = EtcdCluster(tmp_path / "etcd").start()
    prefix = unique_prefix()
    seed(cluster.endpoints, prefix, tmp_path / "seed")
    side = etcd_sidecar(
        cluster.endpoints, prefix, tmp_path, server_model=model, grpc_max_concurrent_rpcs=1, etcd_timeout=30.0
    )
    etcd = cluster.members[0]
    try:
        side.wait_ready()
        assert decision(side, "alice", "GET") == 200
        etcd.pause()
        held = registry_pb2_grpc.RegistryStub(side.channel).ListPermissions.future(
            registry_pb2.ListPermissionsRequest(), timeout=60
        )
        refused = 0
        for _ in range(500):  # until the server has the held call in flight
            try:
                decision(side, "alice", "GET")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
                break
            time.sleep(0.01)
        assert refused == 1 and not held.done()
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                decision(side, "alice", "GET")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused += 1
        etcd.resume()
        assert len(held.result(timeout=30).permissions) == len(CATALOG["permissions"])
        for _ in range(500):  # the slot is free once the server has finished the held call
            try:
                if decision(side, "alice", "GET") == 200:
                    break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
            time.sleep(0.01)
        assert decision(side, "alice", "GET") == 200
        assert rejected(side, "concurrency") == refused
    finally:
        etcd.resume()
        side.close()
        cluster.stop()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--grpc-max-concurrent-rpcs", "0"], {}, "--grpc-max-concurrent-rpcs must be > 0"),
        (["--http-authz-request-timeout", "-1"], {}, "--http-authz-request-timeout must be > 0"),
        ([], {"AUTHZ_GRPC_MAX_MESSAGE_BYTES": "4MB"}, "--grpc-max-message-bytes: '4MB' is not a whole number"),
    ],
)
def test_the_limits_are_flags_and_variables_checked_before_serving(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    from authz_sidecar import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", "--policy-dir", str(tmp_path), *args]) == 2  # a settings error is a usage error
    assert capsys.readouterr().err.strip() == f"authz-sidecar: {needle}"


def test_a_service_registered_only_generically_is_found_and_bounded() -> None:
    """Generated servicers register both ways; one that registered only a generic handler would
    still be served by the thread-pool server, through the same size bound."""
    refused: list[str] = []
    routes = _PoolRoutes(_Bounds(RpcLimits(max_message_bytes=8), refused.append, aio=False), refused.append)
    echo = grpc.unary_unary_rpc_method_handler(lambda raw, _context: raw)
    routes.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("x.Echo", {"Say": echo}),))

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    found = routes.service(Details("/x.Echo/Say"))
    assert found is not None and found is not echo  # wrapped in the bound
    assert found.unary_unary(b"short", None) == b"short"
    routes.submitted()  # as the pool does when the call reaches it
    assert routes.service(Details("/x.Echo/Other")) is None
    assert refused == []
