"""Shared fixtures: policy directories, a demo token issuer, and a sidecar running in a thread."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import yaml

from authz_sidecar.config import Settings
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.tokens import DemoIssuer
from authz_sidecar.server import Sidecar

from .otlp import OtlpReceiver

# Sidecars run inside the test process; their logs go to stderr so that what a CLI prints on stdout
# (ctl --json) can be read back whole.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

CATALOG: dict[str, Any] = {
    "service": "things",
    "permissions": [
        {"handle": "things:view", "description": "Read a thing"},
        {"handle": "things:edit", "description": "Change a thing"},
        {"handle": "things:delete", "description": "Delete a thing"},
    ],
    "routes": [
        {"method": "GET", "path": "/things", "permission": "things:view"},
        {"method": "GET", "path": "/things/{id}", "permission": "things:view"},
        {"method": "PUT", "path": "/things/{id}", "permission": "things:edit"},
        {
            "method": "GET",
            "path": "/accounts/{account}/things",
            "permission": "things:view",
            "scope": "account:{account}",
        },
    ],
}

ACTIVE: dict[str, Any] = {
    "version": "v1",
    "roles": {"viewer": ["things:view"], "editor": ["things:view", "things:edit"]},
    "grants": [
        {"principal": "alice", "roles": ["editor"]},
        {"principal": "bob", "roles": ["viewer"]},
        {"principal": "carol", "roles": ["editor"], "scope": "account:acme"},
        {"principal": "qa-bot", "roles": ["viewer"]},
    ],
}


def shadow(
    version: str,
    *,
    weights: dict[str, int] | None = None,
    testers: list[str] | None = None,
    grants: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A shadow of ACTIVE in which bob is an editor, unless other grants are given."""
    doc: dict[str, Any] = {
        "version": version,
        "parent": "v1",
        "roles": ACTIVE["roles"],
        "grants": grants
        if grants is not None
        else [
            {"principal": "alice", "roles": ["editor"]},
            {"principal": "bob", "roles": ["editor"]},
            {"principal": "carol", "roles": ["editor"], "scope": "account:acme"},
            {"principal": "qa-bot", "roles": ["viewer"]},
        ],
    }
    if weights is not None:
        doc["weights"] = weights
    if testers is not None:
        doc["testers"] = testers
    return doc


def write_policy(
    directory: Path,
    *,
    active: dict[str, Any] | None = None,
    shadows: list[dict[str, Any]] = (),  # type: ignore[assignment]
    catalog: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shadows").mkdir(exist_ok=True)
    (directory / "active.yaml").write_text(yaml.safe_dump(active or ACTIVE))
    (directory / "catalog.yaml").write_text(yaml.safe_dump(catalog or CATALOG))
    for old in (directory / "shadows").glob("*.yaml"):
        old.unlink()
    for doc in shadows:
        (directory / "shadows" / f"{doc['version']}.yaml").write_text(yaml.safe_dump(doc))
    return directory


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


class RunningSidecar:
    """A Sidecar on its own event loop in a thread, reachable over real gRPC on loopback."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.sidecar: Sidecar = self.call(self._make(settings))
        self.call(self.sidecar.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.sidecar.grpc_port}")

    async def _make(self, settings: Settings) -> Sidecar:
        return Sidecar(settings)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def wait_ready(self, timeout: float = 10) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.sidecar.store.snapshot is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no snapshot: {self.sidecar.store.last_error}")
            time.sleep(0.02)

    def close(self) -> None:
        self.channel.close()
        self.call(self.sidecar.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def sidecar_settings(policy: Path | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http": "127.0.0.1:0",
        "policy_dir": policy,
        "service": "things",
        "region": "us-east",
        "poll_interval": 0.05,
        "jwt_authn_payload_key": "jwt_payload",
        "grace": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


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
