"""The application API's identity and freshness: a token verified as Envoy-less JWTs are, a bare
principal only from trusted callers, and at_least_revision: never an answer from an older snapshot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from authz_sidecar.fronts.appidentity import TrustedPeers
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.tokens import DemoIssuer
from authz_sidecar.v1 import authz_pb2, authz_pb2_grpc

from .helpers import RunningSidecar, ctl_json, etcd_sidecar, seed, sidecar_settings, unique_prefix, write_policy


def test_trusted_peers_parse_and_match() -> None:
    default = TrustedPeers.parse(("loopback", "unix"))
    assert default.trusts("ipv4:127.0.0.1:5555") and default.trusts("ipv6:[::1]:5555") and default.trusts("unix:")
    assert not default.trusts("ipv4:10.1.2.3:5555")
    assert TrustedPeers.parse(("10.0.0.0/8",)).trusts("ipv4:10.1.2.3:80")
    assert not TrustedPeers.parse(("none",)).trusts("ipv4:127.0.0.1:1")
    assert not default.trusts("garbage")


def call(
    channel: grpc.Channel, *, principal: str = "", token: str = "", at_least_revision: int = 0
) -> authz_pb2.CheckResponse:
    stub = authz_pb2_grpc.AuthzStub(channel)
    request = authz_pb2.CheckRequest(
        permission="things:edit", principal=principal, token=token, at_least_revision=at_least_revision
    )
    return stub.Check(request, timeout=5)  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_a_bare_principal_only_from_a_trusted_caller_and_a_token_from_anyone(
    tmp_path: Path, issuer: DemoIssuer, model: str
) -> None:
    socket_path = tmp_path / "authz.sock"
    settings = sidecar_settings(
        write_policy(tmp_path / "policy"),
        listen=f"unix://{socket_path}",
        jwks_file=issuer.write_jwks(tmp_path / "jwks.json"),
        jwt_issuers=(issuer.issuer,),
        jwt_audiences=("things",),
        identity=("jwt",),
        app_trusted_peers=("unix",),  # not loopback: a TCP caller here stands for another host
        server_model=model,
    )
    unix_side = RunningSidecar(settings)
    tcp_side = RunningSidecar(
        sidecar_settings(
            write_policy(tmp_path / "policy2"),
            jwks_file=issuer.write_jwks(tmp_path / "jwks2.json"),
            jwt_issuers=(issuer.issuer,),
            jwt_audiences=("things",),
            identity=("jwt",),
            app_trusted_peers=("unix",),
            server_model=model,
        )
    )
    try:
        unix_side.wait_ready()
        tcp_side.wait_ready()
        with grpc.insecure_channel(f"unix://{socket_path}") as over_unix:
            assert call(over_unix, principal="alice").allowed  # the pod's own socket is trusted
        with pytest.raises(grpc.RpcError) as refused:
            call(tcp_side.channel, principal="alice")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "trusted callers" in (refused.value.details() or "")
        assert call(tcp_side.channel, token=issuer.token("alice")).allowed
        assert not call(tcp_side.channel, token=issuer.token("bob")).allowed  # bob only views
        with pytest.raises(grpc.RpcError) as bad:
            call(tcp_side.channel, token=issuer.token("alice") + "x")
        assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as mixed:
            call(tcp_side.channel, token=issuer.token("bob"), principal="alice")
        assert mixed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        unix_side.close()
        tcp_side.close()


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_at_least_revision_reads_its_own_write_and_refuses_the_future(
    etcd: EtcdCluster, tmp_path: Path, model: str
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side", server_model=model)
    try:
        side.wait_ready()
        assert not call(side.channel, principal="bob").allowed
        change = {"version": "v2", "changes": [{"principal": "bob", "grant": ["editor"]}]}
        (tmp_path / "v2.json").write_text(json.dumps(change))
        ctl_json(
            etcd.endpoints, prefix, "propose", "--file", str(tmp_path / "v2.json"), "--request-id", "r", "--reason", "x"
        )
        written = ctl_json(etcd.endpoints, prefix, "canary", "v2", "--weight", "us-east=100")
        revision = written["revision"]
        assert revision > 0
        # Asked right after the write: the answer waits for the watch, then sees it.
        answer = call(side.channel, principal="bob", at_least_revision=revision)
        assert answer.allowed and answer.enforced_version == "v2" and answer.revision >= revision
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as future:
            authz_pb2_grpc.AuthzStub(side.channel).Check(
                authz_pb2.CheckRequest(principal="bob", permission="things:edit", at_least_revision=revision + 10_000),
                timeout=1.0,
            )
        # Refused in time, saying why: not an old answer, not a deadline the caller has to interpret.
        assert future.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"not {revision + 10_000}" in (future.value.details() or "")
        assert time.monotonic() - started < 3
    finally:
        side.close()
