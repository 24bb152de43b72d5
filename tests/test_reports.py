"""Shadow reports: each sidecar publishes what traffic exercised; ctl report sums them."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http

from .helpers import (
    ACTIVE,
    ctl,
    ctl_json,
    decision,
    etcd_sidecar,
    request,
    seed,
    status_of,
    unique_prefix,
    wait_for,
    write_json,
)

ROLES = {**ACTIVE["roles"], "owner": ["things:view", "things:edit", "things:delete"]}
# v2: bob becomes an editor; qa-bot an owner (edit and delete): three predicted changes.
V2 = {
    "version": "v2",
    "parent": "v1",
    "roles": ROLES,
    "grants": [
        {"principal": "alice", "roles": ["editor"]},
        {"principal": "bob", "roles": ["editor"]},
        {"principal": "carol", "roles": ["editor"], "scope": "account:acme"},
        {"principal": "qa-bot", "roles": ["owner"]},
    ],
}


def test_reports_are_summed_expire_with_their_sidecar_and_show_coverage(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active={**ACTIVE, "roles": ROLES})
    why = ("--request-id", "CR-9", "--reason", "bob edits, qa-bot owns")
    assert ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", V2), *why) == 0
    inside = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "a", report_interval=0.3)
    grpc_port, http_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "authz_sidecar", "serve", "--etcd", etcd.endpoints, "--prefix", prefix,
        "--service", "things", "--region", "us-east", "--listen", f"{LOOPBACK}:{grpc_port}",
        "--http", f"{LOOPBACK}:{http_port}", "--identity", "header", "--dev-principal-header", "x-user",
        "--cache-file", "off", "--report-interval", "0.3",
    ]  # fmt: skip
    (tmp_path / "b").mkdir()
    other = Process("sidecar-b", argv, tmp_path / "b")
    try:
        inside.wait_ready()
        wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", other)
        assert decision(inside, "bob") == 403  # v1 denies; v2 observed would allow: expected mismatch
        assert decision(inside, "alice", "GET") == 200
        with grpc.insecure_channel(f"{LOOPBACK}:{grpc_port}") as channel:
            reply = pb_grpc.AuthorizationStub(channel).Check(
                request("/things/1", "PUT", headers={"x-user": "bob"}), timeout=5
            )
            assert status_of(reply) == 403

        def report() -> dict:  # type: ignore[type-arg]
            return ctl_json(etcd.endpoints, prefix, "report", "v2")  # type: ignore[no-any-return]

        wait_for(lambda: len(report()["sidecars"]) == 2, what="both sidecars' reports")
        summed = report()
        assert summed["evaluations"] == 3  # two Checks in one sidecar, one in the other
        assert summed["mismatches"] == {"expected/deny_to_allow": 2}
        assert summed["predicted_impact"] == 3 and summed["exercised"] == 1
        assert summed["coverage"] == round(1 / 3, 4)
        assert summed["handles_never_exercised"] == ["things:delete"]
        # A sidecar killed outright: its report goes with its lease.
        other.kill()
        wait_for(lambda: len(report()["sidecars"]) == 1, timeout=10, what="the dead sidecar's report to expire")
        assert report()["evaluations"] == 2
    finally:
        other.stop()
        inside.close()


def test_the_unexpected_tally_is_bounded_and_its_report_accounts_for_every_mismatch() -> None:
    """A change that surprises everyone costs a bounded dict per shadow, and the published list is
    capped; what is left out is counted, so the listed and unlisted add up to every mismatch."""
    from authz_sidecar.telemetry.reports import MAX_UNEXPECTED_PAIRS, PUBLISHED_UNEXPECTED_PAIRS, Tally

    tally = Tally()
    for i in range(MAX_UNEXPECTED_PAIRS + 500):
        tally.count_unexpected(f"user-{i}", "things:edit")
    for _ in range(7):
        tally.count_unexpected("user-3", "things:edit")
    tally.count_unexpected("user-3", "things:view")  # a new pair past the cap: counted, not kept
    assert len(tally.unexpected) == MAX_UNEXPECTED_PAIRS
    document = tally.document()
    listed = document["unexpected"]
    assert len(listed) == PUBLISHED_UNEXPECTED_PAIRS
    assert listed[0] == ["user-3", "things:edit", 8]
    assert sum(n for _p, _h, n in listed) + document["unexpected_unlisted"] == MAX_UNEXPECTED_PAIRS + 500 + 8


def test_a_request_the_shadow_decides_counts_its_disagreement_with_the_active_set() -> None:
    """At 100% in a region every request is decided by the shadow: its disagreements with the active
    set (what a canary's gates judge) must be tallied as mismatches, with their direction, whether
    the change predicted them, and the principals it denied."""
    from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_shadow
    from authz_sidecar.model.evaluation import evaluate
    from authz_sidecar.model.snapshot import build_snapshot
    from authz_sidecar.telemetry.reports import ShadowReports

    from .helpers import CATALOG

    active = parse_permission_set({**ACTIVE, "roles": ROLES}, "active")
    # v2 takes things:edit from editors (declared) and, by mistake, things:view from viewers.
    roles = {**ROLES, "editor": ["things:view"], "viewer": []}
    v2 = parse_shadow(
        {
            **ACTIVE,
            "version": "v2",
            "parent": "v1",
            "roles": roles,
            "changes": [{"role": "editor", "remove": ["things:edit"]}],
            "weights": {"us-east": 100},
        },
        "v2",
    )
    snapshot = build_snapshot(active, [v2], [parse_catalog(CATALOG, "catalog")], region="us-east")
    reports = ShadowReports()
    for principal, handle in (("alice", "things:edit"), ("alice", "things:view"), ("bob", "things:view")):
        evaluation = evaluate(snapshot, principal, handle, None)
        assert evaluation.decided_by == "shadow"
        reports.observe(snapshot, evaluation, principal, handle, None)
    tally = reports.tallies["v2"]
    assert tally.evaluations == 3
    assert tally.mismatches == {"expected/allow_to_deny": 1, "unexpected/allow_to_deny": 1}, tally.mismatches
    assert set(tally.denied) == {"alice", "bob"}
    assert tally.unexpected == {("bob", "things:view"): 1}
