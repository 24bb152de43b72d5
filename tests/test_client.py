"""authz_sidecar.client against a real sidecar over real gRPC: typed answers, sync and asyncio,
errors mapped to the documented exceptions, and UNAVAILABLE (a sidecar still starting) retried."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar.client import (
    AsyncAuthzClient,
    AuthzClient,
    Decision,
    InvalidRequestError,
    SidecarUnavailableError,
    TokenRefusedError,
    UntrustedCallerError,
)
from authz_sidecar.config import Settings
from authz_sidecar.local.processes import LOOPBACK, free_port
from authz_sidecar.local.tokens import DemoIssuer

from .helpers import RunningSidecar, sidecar_settings, write_policy


def jwt_settings(tmp_path: Path, issuer: DemoIssuer, **overrides: Any) -> Settings:
    return sidecar_settings(
        write_policy(tmp_path / "policy"),
        jwks_file=issuer.write_jwks(tmp_path / "jwks.json"),
        jwt_issuers=(issuer.issuer,),
        jwt_audiences=("things",),
        identity=("jwt",),
        **overrides,
    )


def test_sync_and_async_clients_answer_with_typed_decisions(running: RunningSidecar, issuer: DemoIssuer) -> None:
    target = f"{LOOPBACK}:{running.sidecar.grpc_port}"
    with AuthzClient(target) as authz:
        decision = authz.check("things:edit", principal="alice")
        assert decision == Decision(True, "allowed", "active", "v1", "v1", "default", decision.revision)
        assert not authz.check("things:edit", token=issuer.token("bob")).allowed
        assert authz.check("things:edit", principal="carol", scope="account:acme").allowed
        with pytest.raises(TokenRefusedError):
            authz.check("things:edit", token="not-a-token")
        with pytest.raises(InvalidRequestError):
            authz.check("things:edit", token=issuer.token("bob"), principal="alice")

    async def asynchronously() -> Decision:
        async with AsyncAuthzClient(target) as authz:
            return await authz.check("things:view", token=issuer.token("bob"))

    assert asyncio.run(asynchronously()).allowed


def test_an_untrusted_callers_bare_principal_raises(tmp_path: Path, issuer: DemoIssuer) -> None:
    side = RunningSidecar(jwt_settings(tmp_path, issuer, app_trusted_peers=("none",)))
    try:
        side.wait_ready()
        with AuthzClient(f"{LOOPBACK}:{side.sidecar.grpc_port}") as authz:
            with pytest.raises(UntrustedCallerError, match="trusted callers"):
                authz.check("things:view", principal="bob")
            assert authz.check("things:view", token=issuer.token("bob")).allowed
    finally:
        side.close()


def test_a_sidecar_still_starting_is_retried_and_one_that_never_comes_raises(
    tmp_path: Path, issuer: DemoIssuer
) -> None:
    port = free_port()
    started: list[RunningSidecar] = []

    def start_late() -> None:
        time.sleep(0.4)
        side = RunningSidecar(jwt_settings(tmp_path, issuer, listen=f"{LOOPBACK}:{port}"))
        started.append(side)

    late = threading.Thread(target=start_late)
    late.start()
    try:
        with AuthzClient(f"{LOOPBACK}:{port}", timeout=10, retries=6) as authz:
            assert authz.check("things:view", principal="bob").allowed
    finally:
        late.join(10)
        for side in started:
            side.close()
    with AuthzClient(f"{LOOPBACK}:{free_port()}", timeout=3, retries=2) as authz:
        began = time.monotonic()
        with pytest.raises(SidecarUnavailableError):
            authz.check("things:view", principal="bob")
        assert time.monotonic() - began < 3


def test_the_client_filters_a_manifest_and_signs_and_verifies_events_with_a_token(
    tmp_path: Path, issuer: DemoIssuer
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from authz_sidecar.client import Block, ManifestSummary, RefusedBlock

    from .helpers import ACTIVE, CATALOG

    key = tmp_path / "event.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    catalog = {**CATALOG, "permissions": [*CATALOG["permissions"], {"handle": "snapshots:export"}]}
    active = {
        **ACTIVE,
        "roles": {**ACTIVE["roles"], "exporter": ["snapshots:export"]},
        "grants": [*ACTIVE["grants"], {"principal": "alice", "roles": ["exporter"], "scope": "account:acme"}],
    }
    settings = sidecar_settings(
        write_policy(tmp_path / "exports", active=active, catalog=catalog),
        jwks_file=issuer.write_jwks(tmp_path / "jwks.json"),
        jwt_issuers=(issuer.issuer,),
        jwt_audiences=("things",),
        identity=("jwt",),
        event_key=(key,),
    )
    side = RunningSidecar(settings)
    try:
        side.wait_ready()
        blocks = [Block(f"{account}-{i}", account) for account in ("acme", "globex") for i in range(1_500)]
        with AuthzClient(f"{LOOPBACK}:{side.sidecar.grpc_port}", timeout=10) as authz:
            items = list(authz.filter_manifest(blocks, action="export", token=issuer.token("alice")))
            allowed = {i.block_id for i in items if isinstance(i, Block)}
            refused = [i for i in items if isinstance(i, RefusedBlock)]
            summary = items[-1]
            assert isinstance(summary, ManifestSummary) and summary.complete
            assert allowed == {b.block_id for b in blocks if b.origin_account == "acme"}
            assert {r.origin_account for r in refused} == {"globex"} and len(refused) == 1_500
            envelope = authz.sign(b'{"delete": "things/42"}', "things:edit", token=issuer.token("alice"))
            assert envelope.principal == "alice"
            first = authz.verify_and_check(envelope)
            assert (first.valid, first.allowed, first.reason) == (True, True, "allowed")
            assert authz.verify_and_check(envelope).reason == "replayed"
    finally:
        side.close()
