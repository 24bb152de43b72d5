"""etcd misbehaves and the sidecar keeps deciding from its last good snapshot, then catches up.

Each test starts etcd members of its own (one, or a three-member cluster) on free loopback ports,
and stops every one of them by pid, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from authz_sidecar.etcd.client import Etcd, EtcdOptions
from authz_sidecar.local.etcd import EtcdCluster

from .conftest import shadow
from .etcd_helpers import ctl, decision, etcd_sidecar, seed, unique_prefix, wait_for, write_json
from .test_etcd_source import health, status


@pytest.fixture
def member(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd3", size=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def metrics(side) -> str:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{side.sidecar.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def canary(endpoints: str, prefix: str, weight: int) -> None:
    assert ctl(endpoints, prefix, "canary", "v2", "--weight", f"us-east={weight}") == 0


def seeded(member: EtcdCluster, tmp: Path, *, with_shadow: bool = True) -> str:
    """Start the member, write a catalog and v1 (and shadow v2, 0% canary) under a fresh prefix."""
    member.start()
    prefix = unique_prefix()
    seed(member.endpoints, prefix, tmp)
    if with_shadow:
        propose(member.endpoints, prefix, tmp)
    return prefix


def propose(endpoints: str, prefix: str, tmp: Path) -> None:
    path = write_json(tmp / "v2.json", shadow("v2"))
    assert ctl(endpoints, prefix, "propose", "--file", path, "--request-id", "CR-2", "--reason", "bob edits") == 0


def test_etcd_down_at_start_then_up(member: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)  # nothing listens there yet
    try:
        time.sleep(0.5)
        assert health(side) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert decision(side, "alice") == 503
        member.start()
        seed(member.endpoints, prefix, tmp_path)
        side.wait_ready(timeout=15)
        assert decision(side, "alice") == 200
    finally:
        side.close()


def test_killed_etcd_decisions_go_on_and_later_writes_are_seen(member: EtcdCluster, tmp_path: Path) -> None:
    prefix = seeded(member, tmp_path)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        assert decision(side, "bob") == 403
        member.members[0].kill()
        time.sleep(0.5)
        assert decision(side, "bob") == 403 and decision(side, "alice") == 200  # still deciding
        member.restart(member.members[0])
        canary(member.endpoints, prefix, 100)
        wait_for(lambda: decision(side, "bob") == 200, timeout=15, what="the write after the restart")
        assert status(side)["stale"] is False
    finally:
        side.close()


def test_restarted_while_etcd_is_down_serves_the_disk_copy_marked_stale(member: EtcdCluster, tmp_path: Path) -> None:
    prefix = seeded(member, tmp_path, with_shadow=False)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        wait_for((tmp_path / "snapshot-cache.json").exists, what="the disk copy")
    finally:
        side.close()
    member.members[0].kill()
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)
    try:
        side.wait_ready(timeout=10)
        st = status(side)
        assert st["stale"] is True and st["active_version"] == "v1"
        assert "authz_snapshot_stale 1.0" in metrics(side)
        assert decision(side, "alice") == 200 and decision(side, "bob") == 403
        member.restart(member.members[0])
        wait_for(lambda: status(side)["stale"] is False, timeout=15, what="a fresh listing")
    finally:
        side.close()


def test_max_staleness_denies_while_etcd_is_silent_and_serves_again(member: EtcdCluster, tmp_path: Path) -> None:
    prefix = seeded(member, tmp_path, with_shadow=False)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path, max_staleness=1.0, etcd_liveness=0.6)
    try:
        side.wait_ready()
        time.sleep(1.5)  # progress reports keep it fresh
        assert decision(side, "alice") == 200
        member.members[0].kill()
        wait_for(lambda: decision(side, "alice") == 503, timeout=10, what="denying when stale")
        assert health(side) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "authz_snapshot_withheld 1.0" in metrics(side)
        assert status(side)["withheld_for_staleness"] is True
        member.restart(member.members[0])
        wait_for(lambda: decision(side, "alice") == 200, timeout=15, what="serving again")
    finally:
        side.close()


def test_paused_etcd_is_noticed_within_the_liveness_window(member: EtcdCluster, tmp_path: Path) -> None:
    prefix = seeded(member, tmp_path)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path, etcd_liveness=1.0)
    try:
        side.wait_ready()
        source = side.sidecar.source
        before = source.reconnects  # type: ignore[attr-defined]
        member.members[0].pause()
        took = wait_for(lambda: source.reconnects > before, timeout=5, what="the dead stream noticed")  # type: ignore[attr-defined]
        assert took < 3.0
        assert decision(side, "alice") == 200  # deciding all along
        member.members[0].resume()
        canary(member.endpoints, prefix, 100)
        wait_for(lambda: decision(side, "bob") == 200, timeout=15, what="following again")
    finally:
        side.close()


def test_compacted_resume_revision_lists_again(member: EtcdCluster, tmp_path: Path) -> None:
    prefix = seeded(member, tmp_path)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        source = side.sidecar.source
        # Disconnect the source (as a network cut would), write and compact past where it stands.
        side.call(_stop_source(side))
        canary(member.endpoints, prefix, 50)  # two writes: the first one's revision is compacted away
        canary(member.endpoints, prefix, 100)

        async def compact() -> None:
            async with Etcd(EtcdOptions(endpoints=(member.endpoints,))) as etcd:
                revision, _ = await etcd.list_prefix("/")
                await etcd.call(etcd.kv.compact, revision, physical=True)

        asyncio.run(compact())
        relists = source.relists  # type: ignore[attr-defined]
        side.call(_start_source(side))
        wait_for(lambda: decision(side, "bob") == 200, timeout=10, what="current after relisting")
        assert source.relists == relists + 1  # type: ignore[attr-defined]
    finally:
        side.close()


async def _stop_source(side) -> None:  # type: ignore[no-untyped-def]
    task = side.sidecar._source_task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _start_source(side) -> None:  # type: ignore[no-untyped-def]
    side.sidecar._source_task = asyncio.create_task(side.sidecar.source.run(side.sidecar.store))


def test_three_member_cluster_with_a_member_killed(cluster: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(cluster.endpoints, prefix, tmp_path)
    propose(cluster.endpoints, prefix, tmp_path)
    side = etcd_sidecar(cluster.endpoints, prefix, tmp_path, etcd_liveness=1.0)
    try:
        side.wait_ready()
        for weight, want, victim in ((100, 200, 0), (0, 403, 1), (100, 200, 2)):
            cluster.members[victim].kill()
            alive = ",".join(m.endpoint for i, m in enumerate(cluster.members) if i != victim)
            canary(alive, prefix, weight)
            wait_for(lambda want=want: decision(side, "bob") == want, timeout=15, what=f"bob -> {want}")
            cluster.restart(cluster.members[victim])
    finally:
        side.close()
