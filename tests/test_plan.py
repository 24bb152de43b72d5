"""The plan of a change: the exact flips, computed from the two sets, and the part the proposal does
not declare, which ``ctl propose`` refuses unless it is accepted (and then counts as unexpected)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from authz_sidecar.documents import parse_permission_set
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.model.plan import Flip, plan

from .helpers import ROLES_WITH_ADMIN as ROLES
from .helpers import (
    ctl_captured,
    ctl_json,
    decision,
    etcd_sidecar,
    moved,
    scrape,
    seed,
    unique_prefix,
    wait_for,
    write_json,
)

ACTIVE: dict[str, Any] = {
    "version": "v1",
    "roles": ROLES,
    "grants": [
        {"principal": "ann", "roles": ["admin"]},
        {"principal": "ed", "roles": ["editor"]},
        {"principal": "eve", "roles": ["editor"], "scope": "account:acme"},
        {"principal": "vic", "roles": ["viewer"]},
    ],
}


def proposal(*, mistake: bool, version: str = "v2") -> dict[str, Any]:
    """Take things:delete from admins, as declared; with `mistake`, also things:edit from editors."""
    roles = {**ROLES, "admin": ["things:view", "things:edit"]}
    if mistake:
        roles["editor"] = ["things:view"]
    return {
        **ACTIVE,
        "version": version,
        "parent": "v1",
        "roles": roles,
        "changes": [{"role": "admin", "remove": ["things:delete"]}],
    }


def test_the_plan_lists_exactly_who_gains_or_loses_what() -> None:
    active = parse_permission_set(ACTIVE, "v1")
    gaining = parse_permission_set(
        {**ACTIVE, "version": "v2", "grants": [*ACTIVE["grants"], {"principal": "vic", "roles": ["editor"]}]}, "v2"
    )
    change = plan(active, gaining)
    assert change.flips == (Flip("things:edit", "vic", None, gains=True),)
    assert change.undeclared == () and change.by_handle() == {"things:edit": {"gain": 1, "lose": 0}}


def test_flips_the_declared_changes_do_not_explain_are_undeclared() -> None:
    """The declared change explains ann's loss; the editors' losses are a mistake, named."""
    change = plan(parse_permission_set(ACTIVE, "v1"), parse_permission_set(proposal(mistake=True), "v2"))
    assert [f.describe() for f in change.flips] == [
        "ann loses things:delete",
        "ed loses things:edit",
        "eve loses things:edit in account:acme",
    ]
    assert [f.describe() for f in change.undeclared] == [
        "ed loses things:edit",
        "eve loses things:edit in account:acme",
    ]
    assert change.principals() == 3
    honest = plan(parse_permission_set(ACTIVE, "v1"), parse_permission_set(proposal(mistake=False), "v2"))
    assert honest.undeclared == () and len(honest.flips) == 1


def _propose(endpoints: str, prefix: str, path: str, *extra: str) -> tuple[int, str, str]:
    return ctl_captured(endpoints, prefix, "propose", "--file", path, "--request-id", "CR-7", "--reason", "r", *extra)


def test_propose_refuses_undeclared_flips_unless_accepted_and_then_they_are_unexpected(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    mistaken = write_json(tmp_path / "v2.json", {**proposal(mistake=True), "weights": {"us-east": 0}})

    code, _out, err = _propose(etcd.endpoints, prefix, mistaken)
    lines = [line for line in err.splitlines() if line.startswith("authz-sidecar:")]
    assert code == 1 and len(lines) == 1
    assert "2 flip(s)" in lines[0] and "ed loses things:edit" in lines[0] and "--accept-undeclared" in lines[0]
    assert ctl_json(etcd.endpoints, prefix, "status")["shadows"] == {}  # nothing was written

    code, out, _err = _propose(etcd.endpoints, prefix, mistaken, "--accept-undeclared", "--json")
    assert code == 0 and json.loads(out)["plan"]["undeclared"] == 2
    diff = ctl_json(etcd.endpoints, prefix, "diff", "v2", "--limit", "2")
    assert diff["flips"] == 3 and diff["undeclared"] == 2 and diff["principals"] == 3
    assert diff["listed"] == ["ann loses things:delete", "ed loses things:edit"]
    assert diff["by_handle"] == {"things:delete": {"gain": 0, "lose": 1}, "things:edit": {"gain": 0, "lose": 2}}
    assert ctl_json(etcd.endpoints, prefix, "diff", "v2", "--offset", "2")["listed"] == [
        "eve loses things:edit in account:acme"
    ]

    # Live traffic: v1 lets ed edit, v2 would not, and v2 never declared that: unexpected.
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        wait_for(lambda: side.sidecar.store.snapshot is not None and bool(side.sidecar.store.snapshot.shadows))
        before = scrape(side)
        assert decision(side, "ed", "PUT", "/things/1") == 200
        assert decision(side, "ann", "GET", "/things/1") == 200
        after = scrape(side)
        labels = {"version": "v2", "direction": "allow_to_deny"}
        assert moved(before, after, "authz_mismatches_total", kind="unexpected", **labels) == 1
        assert moved(before, after, "authz_mismatches_total", kind="expected", **labels) == 0
    finally:
        side.close()


def test_coverage_covers_the_whole_impact_and_names_what_traffic_never_exercised(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """A change declared for admins that also touches editors (accepted): traffic that reaches
    neither flip leaves both handles named, each with how many principals it changes for, the
    undeclared one included; a request that does reach a flip counts it as exercised."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    mistaken = write_json(tmp_path / "v2.json", proposal(mistake=True))
    assert _propose(etcd.endpoints, prefix, mistaken, "--accept-undeclared")[0] == 0
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side", report_interval=0.3)
    try:
        side.wait_ready()
        wait_for(lambda: side.sidecar.store.snapshot is not None and bool(side.sidecar.store.snapshot.shadows))
        assert decision(side, "vic", "GET") == 200  # not in the impact at all

        def report() -> Any:
            return ctl_json(etcd.endpoints, prefix, "report", "v2")

        wait_for(lambda: report()["evaluations"] >= 1, what="the sidecar's report")
        summed = report()
        assert summed["impact"] == 3 and summed["predicted_impact"] == 1 and summed["coverage"] == 0
        assert summed["never_exercised_principals"] == {"things:delete": 1, "things:edit": 2}
        assert decision(side, "ed", "PUT") == 200  # v1 allows, v2 would not: the undeclared flip, hit
        wait_for(lambda: report()["exercised"] == 1, what="the flip to count as exercised")
        assert report()["never_exercised_principals"] == {"things:delete": 1}
    finally:
        side.close()
