"""Sidecars reaching etcd through etcd's own gRPC proxy (``etcd grpc-proxy start``, the same binary):
what a fleet runs so that the cluster holds one watch per prefix instead of one per sidecar.

Real etcd, real proxy, real sidecar processes. The clusters here send watch progress
notifications every 500 ms, as docs/operations.md asks of a cluster behind proxies: the proxy
drops the progress requests a sidecar's liveness check sends, and without notifications from
etcd a quiet watch through it would be reopened every ``--etcd-liveness`` seconds
(test_the_proxy_leaves_progress_requests_unanswered checks that this is still so)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from etcd3aio.auth import AuthService
from etcd3aio.kv import prefix_range_end

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from authz_sidecar.local.etcd import EtcdCluster, EtcdGrpcProxy, scrape
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.store.etcd import CompactedError, Etcd, EtcdOptions, WatchLostError

from .helpers import ctl, request, seed, shadow, status_of, unique_prefix, write_json

LIVENESS = 1.5
WATCH_GAUGES = ("etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A member of its own: the watch counts read from its /metrics are this test's alone."""
    members = EtcdCluster(tmp_path / "etcd", flags=["--experimental-watch-progress-notify-interval=500ms"])
    try:
        yield members.start()
    finally:
        members.stop()


@pytest.fixture
def proxy(cluster: EtcdCluster, tmp_path: Path) -> Iterator[EtcdGrpcProxy]:
    front = EtcdGrpcProxy(f"http://{cluster.endpoints}", tmp_path)
    try:
        yield front.start()
    finally:
        front.stop()


class Sidecars:
    """Sidecar processes of the test service on etcd, each stopped by its pid."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp = tmp
        self.prefix = prefix
        self.running: list[tuple[Process, int, int]] = []

    def start(self, etcd: str, name: str, env: dict[str, str] | None = None) -> tuple[Process, int, int]:
        grpc_port, http_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "authz_sidecar", "serve", "--etcd", etcd, "--prefix", self.prefix,
            "--service", "things", "--region", "us-east", "--listen", f"{LOOPBACK}:{grpc_port}",
            "--http", f"{LOOPBACK}:{http_port}", "--identity", "header", "--dev-principal-header", "x-user",
            "--cache-file", "off", "--etcd-liveness", str(LIVENESS), "--grace", "0.5",
        ]  # fmt: skip
        started = (Process(name, argv, self.tmp, env=env), grpc_port, http_port)
        self.running.append(started)
        return started

    def stop(self) -> None:
        for process, _grpc, _http in self.running:
            process.stop()
        self.running.clear()


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[Sidecars]:
    fleet = Sidecars(tmp_path, unique_prefix())
    try:
        yield fleet
    finally:
        fleet.stop()


def status(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def put_decision(grpc_port: int, principal: str) -> int:
    with grpc.insecure_channel(f"{LOOPBACK}:{grpc_port}") as channel:
        stub = pb_grpc.AuthorizationStub(channel)
        return status_of(stub.Check(request("/things/1", "PUT", headers={"x-user": principal}), timeout=5))


def test_a_sidecar_behind_the_proxy_serves_and_follows_writes_made_to_etcd(
    cluster: EtcdCluster, proxy: EtcdGrpcProxy, sidecars: Sidecars, tmp_path: Path
) -> None:
    seed(cluster.endpoints, sidecars.prefix, tmp_path / "seed")
    side, grpc_port, http_port = sidecars.start(proxy.endpoints, "sidecar")
    wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", side, timeout=30)
    assert status(http_port)["active_version"] == "v1"
    assert put_decision(grpc_port, "bob") == 403  # a viewer in v1

    # Written to etcd itself, not through the proxy: the proxy's one watch on the cluster brings it.
    shadow_file = write_json(tmp_path / "v2.json", shadow("v2"))
    why = ("--request-id", "CR-2", "--reason", "bob edits")
    assert ctl(cluster.endpoints, sidecars.prefix, "propose", "--file", shadow_file, *why) == 0
    assert ctl(cluster.endpoints, sidecars.prefix, "canary", "v2", "--weight", "us-east=100") == 0

    def follows() -> bool:
        shadows = status(http_port)["shadows"]
        return [(s["version"], s["weight_here"]) for s in shadows] == [("v2", 100)]

    until(follows, "the sidecar behind the proxy to show v2 at 100% in us-east", timeout=10)
    assert put_decision(grpc_port, "bob") == 200  # v2 decides for everyone in us-east now

    # etcd's progress notifications keep the quiet watch alive through the proxy: it is never
    # reopened, over several liveness windows.
    until(lambda: status(http_port)["uptime_seconds"] > 3 * LIVENESS, "three liveness windows to pass")
    final = status(http_port)
    assert final["source_state"] == "connected"
    assert "etcd_unreachable" not in side.log_path.read_text(), side.log_tail()

    # The proxy stopped and started again on its port: the sidecar decides from what it has
    # meanwhile, then resumes from the last revision it applied, so a write made meanwhile arrives.
    proxy.stop()
    assert ctl(cluster.endpoints, sidecars.prefix, "canary", "v2", "--weight", "us-east=0") == 0
    assert put_decision(grpc_port, "bob") == 200
    proxy.start()

    def followed_again() -> bool:
        return [s["weight_here"] for s in status(http_port)["shadows"]] == [0]

    until(followed_again, "the sidecar to follow again through the restarted proxy", timeout=10)
    assert put_decision(grpc_port, "bob") == 403


def test_sidecars_behind_one_proxy_are_one_watch_on_etcd(
    cluster: EtcdCluster, proxy: EtcdGrpcProxy, sidecars: Sidecars, tmp_path: Path
) -> None:
    """Three sidecars through the proxy add one watcher and one watch stream to etcd's count;
    three more on etcd directly add three of each. The proxy's own watches (it watches for leader
    loss) are counted before the sidecars start."""
    seed(cluster.endpoints, sidecars.prefix, tmp_path / "seed")
    member = cluster.members[0]

    def counts() -> tuple[float, ...]:
        found = scrape(member.metrics_url, WATCH_GAUGES)
        return tuple(found[name] for name in WATCH_GAUGES)

    readings = [counts()]

    def settled() -> bool:  # the proxy's own watches are in place: the same count three times
        time.sleep(0.2)
        readings.append(counts())
        return len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]

    until(settled, "etcd's watch counts to settle after the proxy started")
    watchers, streams = readings[-1]

    def ready_all(started: list[tuple[Process, int, int]]) -> None:
        for process, _grpc, http_port in started:
            wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", process, timeout=30)

    ready_all([sidecars.start(proxy.endpoints, f"proxied{i}") for i in range(3)])
    until(lambda: counts() == (watchers + 1, streams + 1), f"one more watcher and stream than {readings[-1]}")

    ready_all([sidecars.start(cluster.endpoints, f"direct{i}") for i in range(3)])
    until(lambda: counts() == (watchers + 4, streams + 4), "three more watchers and streams, one per sidecar")


def test_the_proxy_leaves_progress_requests_unanswered(etcd: EtcdCluster, tmp_path: Path) -> None:
    """etcd 3.5's proxy drops a watch's progress requests. The sidecar's watch asks for progress
    every third of its liveness window and reopens a stream that stays silent for a whole window:
    on a cluster that sends no progress notifications of its own (its default is every 10
    minutes, as here), a quiet watch through a proxy is reopened every window, though nothing is
    wrong. If this test fails, a newer etcd answers them, and the notification interval asked for
    in docs/operations.md is no longer needed."""
    front = EtcdGrpcProxy(f"http://{etcd.endpoints}", tmp_path)
    root = f"{unique_prefix()}/"

    async def quiet_watch(endpoint: str) -> str:
        async with Etcd(EtcdOptions(endpoints=(endpoint,))) as client:
            revision, _cluster = await client.current(root)
            progress = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * LIVENESS):
                    try:
                        async for batch in client.watch(root, revision + 1, LIVENESS):
                            progress += not batch.created
                    except WatchLostError as exc:
                        return str(exc)
            return f"alive, {progress} progress reports"

    async def both() -> tuple[str, str]:
        return await asyncio.gather(quiet_watch(etcd.endpoints), quiet_watch(front.endpoints))

    try:
        front.start()
        direct, proxied = asyncio.run(both())
    finally:
        front.stop()
    assert direct.startswith("alive") and not direct.startswith("alive, 0 "), direct
    assert proxied == f"no answer from etcd for {LIVENESS:g} s"


def test_a_watch_resumed_through_the_proxy_from_a_compacted_revision_is_told_so(
    cluster: EtcdCluster, proxy: EtcdGrpcProxy
) -> None:
    """So a sidecar behind a proxy lists again, as it does on etcd directly, rather than wait for
    revisions that are gone."""
    root = f"{unique_prefix()}/"

    async def resume_after_compaction() -> tuple[int, int]:
        async with Etcd(EtcdOptions(endpoints=(cluster.endpoints,))) as direct:
            for i in range(4):
                await direct.call(direct.kv.put, root + "key", str(i).encode())
            revision, _cluster = await direct.current(root)
            await direct.call(direct.kv.compact, revision)
        async with Etcd(EtcdOptions(endpoints=(proxy.endpoints,))) as proxied:
            try:
                async with asyncio.timeout(10):
                    async for _batch in proxied.watch(root, revision - 2, LIVENESS):
                        pass
            except CompactedError as exc:
                return exc.compact_revision, revision
        raise AssertionError("the watch ended without a word about compaction")

    compacted, revision = asyncio.run(resume_after_compaction())
    assert compacted == revision


def test_a_read_only_etcd_user_follows_through_the_proxy(
    cluster: EtcdCluster, sidecars: Sidecars, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """User and password pass through the proxy: the sidecar authenticates through it and its
    token goes with its reads and its watch, which etcd allows a user who may only read the
    prefix. (The proxy's /health answers 503 while auth is on, so EtcdGrpcProxy waits for its
    /metrics.)"""
    root = f"{sidecars.prefix}/"

    async def enable_auth() -> None:
        async with Etcd(EtcdOptions(endpoints=(cluster.endpoints,))) as client:
            auth = AuthService(client._channel)
            await auth.role_add("root")
            await auth.user_add("root", "s3cret")
            await auth.user_grant_role("root", "root")
            await auth.role_add("reader")
            await auth.role_grant_permission("reader", root.encode(), prefix_range_end(root.encode()))
            await auth.user_add("reader", "r3ad")
            await auth.user_grant_role("reader", "reader")
            await auth.auth_enable()

    asyncio.run(enable_auth())
    monkeypatch.setenv("AUTHZ_ETCD_USER", "root")  # ctl's credentials, in this process
    monkeypatch.setenv("AUTHZ_ETCD_PASSWORD", "s3cret")
    seed(cluster.endpoints, sidecars.prefix, tmp_path / "seed")
    front = EtcdGrpcProxy(f"http://{cluster.endpoints}", tmp_path, name="auth-proxy")
    try:
        front.start()
        reader = {"AUTHZ_ETCD_USER": "reader", "AUTHZ_ETCD_PASSWORD": "r3ad"}
        side, _grpc, http_port = sidecars.start(front.endpoints, "reader", env=reader)
        wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", side, timeout=30)
        assert status(http_port)["active_version"] == "v1"
        shadow_file = write_json(tmp_path / "v2.json", shadow("v2"))
        why = ("--request-id", "CR-2", "--reason", "bob edits")
        assert ctl(cluster.endpoints, sidecars.prefix, "propose", "--file", shadow_file, *why) == 0

        def follows() -> bool:
            return [s["version"] for s in status(http_port)["shadows"]] == ["v2"]

        until(follows, "the reader's sidecar to follow a write through the proxy", timeout=10)
    finally:
        sidecars.stop()
        front.stop()
