"""etcd misbehaves and the sidecar keeps deciding from its last good snapshot, then catches up.

Each test starts etcd members of its own (one, or a three-member cluster) on free loopback ports,
and stops every one of them by pid, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import free_port
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions

from .helpers import (
    ACTIVE,
    CATALOG,
    ctl,
    decision,
    etcd_sidecar,
    health,
    raw_put,
    seed,
    shadow,
    status,
    unique_prefix,
    wait_for,
    write_json,
)


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
            wait_for(partial(lambda w: decision(side, "bob") == w, want), timeout=15, what=f"bob -> {want}")
            cluster.restart(cluster.members[victim])
    finally:
        side.close()


@pytest.mark.parametrize("damage", ["pointer_to_missing_version", "broken_catalog"])
def test_restarted_while_etcds_data_does_not_build_serves_the_disk_copy(
    member: EtcdCluster, tmp_path: Path, damage: str
) -> None:
    """etcd answers, but what it holds does not build: the restarted sidecar serves its disk copy,
    marked stale and with the refusal reported, until etcd's data builds again."""
    prefix = seeded(member, tmp_path, with_shadow=False)
    lay = layout.Layout(prefix)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        wait_for((tmp_path / "snapshot-cache.json").exists, what="the disk copy")
    finally:
        side.close()
    broken = lay.active if damage == "pointer_to_missing_version" else lay.catalog("things")
    raw_put(member.endpoints, broken, layout.encode_active("v404") if broken == lay.active else b"{broken")
    side = etcd_sidecar(member.endpoints, prefix, tmp_path)
    try:
        side.wait_ready(timeout=10)
        st = status(side)
        assert st["stale"] is True and st["active_version"] == "v1"
        assert [r["document"] for r in st["refused_documents"]] == [broken]
        assert "authz_snapshot_stale 1.0" in metrics(side)
        assert decision(side, "alice") == 200 and decision(side, "bob") == 403
        # etcd's data builds again: the fresh snapshot replaces the disk copy and stale clears.
        if broken == lay.active:
            raw_put(member.endpoints, broken, layout.encode_active("v1"))
        else:
            raw_put(member.endpoints, broken, json.dumps(CATALOG).encode())
        wait_for(lambda: status(side)["stale"] is False, timeout=10, what="etcd's own data")
        assert status(side)["refused_documents"] == [] and decision(side, "alice") == 200
    finally:
        side.close()


def test_a_wiped_etcd_on_the_same_port_is_followed(member: EtcdCluster, tmp_path: Path) -> None:
    """etcd loses its data (a restore from nothing) and comes back on the same port with a new
    state at revisions below the one the sidecar had applied: the sidecar lists again and follows."""
    prefix = seeded(member, tmp_path)
    pad(member.endpoints, 40)  # the old etcd ends well past the revisions the new one will use
    side = etcd_sidecar(member.endpoints, prefix, tmp_path, etcd_liveness=1.0)
    try:
        side.wait_ready()
        assert decision(side, "bob") == 403
        member.replace(member.members[0])
        seed(member.endpoints, prefix, tmp_path / "new", active={**BOB_EDITS, "version": "v7"})
        wait_for(lambda: status(side)["active_version"] == "v7", timeout=20, what="the new etcd's state")
        assert decision(side, "bob") == 200 and status(side)["shadows"] == []
    finally:
        side.close()


def test_a_replaced_etcd_with_another_cluster_id_is_followed(member: EtcdCluster, tmp_path: Path) -> None:
    """Another cluster takes the endpoint, already past the sidecar's revision, with its state
    written at revisions the sidecar had already passed: the new cluster id makes it list again."""
    prefix = seeded(member, tmp_path)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path, etcd_liveness=1.0)
    try:
        side.wait_ready()
        old = member.members[0]
        port = old.client_port
        # Build the replacement on another port, out of the sidecar's reach, then move it over.
        old.wipe()
        old.cluster_token = "another-cluster"
        old.client_port = free_port()
        member.restart(old)
        seed(member.endpoints, prefix, tmp_path / "new", active={**BOB_EDITS, "version": "v7"})
        pad(member.endpoints, 40)
        old.stop()
        old.client_port = port
        member.restart(old)
        wait_for(lambda: status(side)["active_version"] == "v7", timeout=20, what="the new cluster's state")
        assert decision(side, "bob") == 200
    finally:
        side.close()


def test_progress_reports_never_move_the_resume_revision(member: EtcdCluster, tmp_path: Path) -> None:
    """Progress reports prove the stream alive; the revision the sidecar resumes from moves only
    with what it has listed or applied (etcd 3.5.1 can report progress ahead of queued events)."""
    prefix = seeded(member, tmp_path)
    side = etcd_sidecar(member.endpoints, prefix, tmp_path, etcd_liveness=0.6)
    try:
        side.wait_ready()
        source = side.sidecar.source
        applied = source.revision  # type: ignore[attr-defined]
        pad(member.endpoints, 5)  # writes outside the sidecar's prefix move etcd's revision
        written = time.monotonic()
        wait_for(
            lambda: status(side)["source_silent_seconds"] < time.monotonic() - written - 0.05,
            what="a progress report after the writes",
        )
        assert source.revision == applied  # type: ignore[attr-defined]
        canary(member.endpoints, prefix, 100)
        wait_for(lambda: decision(side, "bob") == 200, what="the next change")
        assert source.revision > applied  # type: ignore[attr-defined]
    finally:
        side.close()


BOB_EDITS = {
    **ACTIVE,
    "grants": [g if g["principal"] != "bob" else {"principal": "bob", "roles": ["editor"]} for g in ACTIVE["grants"]],
}


def pad(endpoints: str, writes: int) -> None:
    """Move etcd's revision on by `writes`, outside every test's prefix."""
    for i in range(writes):
        raw_put(endpoints, f"/padding/{i}", b"x")
