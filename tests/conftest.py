"""Shared fixtures: policy directories, a real etcd, a demo token issuer, a sidecar running in a thread,
an OTLP receiver, and a clean environment for every test. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.tokens import DemoIssuer

from .helpers import RunningSidecar, shadow, sidecar_settings, write_policy
from .otlp import OtlpReceiver

# Sidecars run inside the test process; their logs go to stderr so that what a CLI prints on stdout
# (ctl --json) can be read back whole.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "policy", shadows=[shadow("v2", testers=["bob", "qa-bot"])])


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd member for every test that only reads and writes (each uses its own prefix);
    tests that kill, pause or compact start members of their own."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def issuer() -> DemoIssuer:
    return DemoIssuer()


@pytest.fixture(params=["aio", "threads"])
def running(
    request: pytest.FixtureRequest, policy_dir: Path, tmp_path: Path, issuer: DemoIssuer
) -> Iterator[RunningSidecar]:
    """A sidecar with the test policy, once per server model."""
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    side = RunningSidecar(
        sidecar_settings(
            policy_dir,
            jwks_file=jwks,
            jwt_audiences=("things",),
            jwt_issuers=(issuer.issuer,),
            identity=("jwt_authn", "jwt", "mtls"),
            server_model=request.param,
        )
    )
    try:
        side.wait_ready()
        yield side
    finally:
        side.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/gRPC collector on a free loopback port, recording the spans it receives."""
    r = OtlpReceiver()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own AUTHZ_* or OTEL_* variables never reach a test: each sets what it needs."""
    for name in list(os.environ):
        if name.startswith(("AUTHZ_", "OTEL_")):
            monkeypatch.delenv(name)
