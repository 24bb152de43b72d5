"""Cohorts end to end: written with ``ctl canary --cohort/--cohort-roles`` into a real etcd, followed by
real sidecars in two regions, and answered over real gRPC; a cohort naming a role the active set
lacks is refused by ctl before any write and, written around ctl, by the sidecars for that shadow
alone; the flags' usage errors are one line and exit 2."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar import cli
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.model.values import Cohort, Rollout
from authz_sidecar.store import layout

from .helpers import (
    RunningSidecar,
    check,
    ctl_captured,
    ctl_json,
    etcd_sidecar,
    raw_put,
    request,
    scrape,
    seed,
    status,
    status_of,
    unique_prefix,
    wait_for,
    write_json,
)

# bob and qa-bot hold exactly [viewer]; vic [viewer, auditor]; ana [auditor]; carol viewer in acme only.
ACTIVE: dict[str, Any] = {
    "version": "v1",
    "roles": {"viewer": ["things:view"], "editor": ["things:view", "things:edit"], "auditor": ["things:view"]},
    "grants": [
        {"principal": "alice", "roles": ["editor"]},
        {"principal": "bob", "roles": ["viewer"]},
        {"principal": "qa-bot", "roles": ["viewer"]},
        {"principal": "vic", "roles": ["viewer", "auditor"]},
        {"principal": "ana", "roles": ["auditor"]},
        {"principal": "carol", "roles": ["viewer"], "scope": "account:acme"},
    ],
}
EVERYONE = ("alice", "bob", "qa-bot", "vic", "ana", "carol")
# In v2 viewers and auditors may edit: whoever v2 decides for is told apart by a PUT.
V2 = {
    "version": "v2",
    "changes": [{"role": "viewer", "add": ["things:edit"]}, {"role": "auditor", "add": ["things:edit"]}],
}


@pytest.fixture
def regions(etcd: EtcdCluster, tmp_path: Path) -> Iterator[tuple[str, dict[str, RunningSidecar]]]:
    """A prefix seeded with ACTIVE and v2 proposed (observed only), and a sidecar in each of two regions."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    propose(etcd.endpoints, prefix, tmp_path, V2)
    with contextlib.ExitStack() as stack:
        sides: dict[str, RunningSidecar] = {}
        for region in ("eu-west", "us-east"):
            sides[region] = etcd_sidecar(etcd.endpoints, prefix, tmp_path / region, region=region)
            stack.callback(sides[region].close)
            sides[region].wait_ready()
        yield prefix, sides


def propose(endpoints: str, prefix: str, tmp: Path, document: dict[str, Any]) -> None:
    path = write_json(tmp / f"{document['version']}.json", document)
    code, _out, err = ctl_captured(
        endpoints, prefix, "propose", "--file", path, "--request-id", f"CR-{document['version']}", "--reason", "test"
    )
    assert code == 0, err


def answer(side: RunningSidecar, principal: str, method: str = "PUT", shadow: str = "") -> tuple[int, str]:
    """The status of a request, and the selection the sidecar reports (for an allowed one)."""
    headers = {"x-user": principal, **({"x-authz-shadow-version": shadow} if shadow else {})}
    resp = check(side, request("/things/1", method, headers=headers))
    return status_of(resp), str(dict(resp.dynamic_metadata).get("selection", ""))


def shadow_status(side: RunningSidecar, version: str) -> dict[str, Any]:
    return next((s for s in status(side)["shadows"] if s["version"] == version), {})


def test_a_cohort_by_role_combination_moves_exactly_its_holders_in_its_region_only(
    etcd: EtcdCluster, regions: tuple[str, dict[str, RunningSidecar]]
) -> None:
    prefix, sides = regions
    eu, us = sides["eu-west"], sides["us-east"]
    done = ctl_json(etcd.endpoints, prefix, "canary", "v2", "--cohort-roles", "eu-west=viewer")
    assert done["cohorts"] == {"eu-west": {"principals": 0, "role_sets": [["viewer"]]}} and done["state"] == "canary"
    wait_for(lambda: shadow_status(eu, "v2").get("cohort_here") == 2, what="eu-west's cohort of v2")
    # Exactly those holding [viewer] and nothing else, in eu-west: not vic (viewer and auditor),
    # not ana (auditor), not carol (viewer only in a scope).
    assert {p: answer(eu, p) for p in EVERYONE} == {
        "alice": (200, "default"),
        "bob": (200, "cohort"),
        "qa-bot": (200, "cohort"),
        "vic": (403, ""),
        "ana": (403, ""),
        "carol": (403, ""),
    }
    assert answer(eu, "vic", "GET") == (200, "default")
    # The metrics label says it too, where it says canary for a weight.
    by_cohort = [
        (dict(labels)["decided_by"], value)
        for (name, labels), value in scrape(eu).items()
        if name == "authz_decisions_total" and dict(labels).get("selection") == "cohort"
    ]
    assert by_cohort and all(decided_by == "shadow" for decided_by, _ in by_cohort)
    assert sum(value for _, value in by_cohort) == 2  # bob's and qa-bot's PUT
    # us-east keeps everyone on the active set.
    assert shadow_status(us, "v2")["cohort_here"] == 0
    assert {p: answer(us, p)[0] for p in EVERYONE} == {p: 200 if p == "alice" else 403 for p in EVERYONE}
    status_out = ctl_json(etcd.endpoints, prefix, "status")
    assert status_out["shadows"]["v2"]["cohorts"] == {"eu-west": {"principals": [], "role_sets": [["viewer"]]}}
    why = ctl_json(etcd.endpoints, prefix, "explain", "bob", "things:edit")
    assert why["decided_by_region"] == {"eu-west": "v2", "(any other region)": "v1"}
    assert why["selection_by_region"]["eu-west"] == "cohort"


def test_header_beats_cohort_beats_weight_and_a_cleared_cohort_is_audited(
    etcd: EtcdCluster, tmp_path: Path, regions: tuple[str, dict[str, RunningSidecar]]
) -> None:
    prefix, sides = regions
    eu = sides["eu-west"]
    # v3 is bob's to pick by header (it changes another handle: v2 holds the lock on things:edit).
    propose(
        etcd.endpoints,
        prefix,
        tmp_path,
        {"version": "v3", "testers": ["bob"], "changes": [{"role": "viewer", "add": ["things:delete"]}]},
    )
    ctl_json(etcd.endpoints, prefix, "canary", "v2", "--cohort", "eu-west=bob,newcomer", "--weight", "eu-west=100")
    wait_for(lambda: shadow_status(eu, "v2").get("cohort_here") == 2, what="eu-west's cohort of v2")
    assert answer(eu, "bob", "GET", shadow="v3") == (200, "header")
    assert answer(eu, "bob") == (200, "cohort")
    assert answer(eu, "vic") == (200, "canary")
    # Cleared, the region keeps its weight: bob is one of everyone again.
    cleared = ctl_json(etcd.endpoints, prefix, "canary", "v2", "--cohort", "eu-west=", "--request-id", "CR-clear")
    assert cleared["cohorts"] == {} and cleared["weights"] == {"eu-west": 100}
    wait_for(lambda: shadow_status(eu, "v2").get("cohort_here") == 0, what="the cohort cleared")
    assert answer(eu, "bob") == (200, "canary")
    assert "cohorts" not in ctl_json(etcd.endpoints, prefix, "status")["shadows"]["v2"]
    records = [r for r in ctl_json(etcd.endpoints, prefix, "audit")["records"] if r["action"] == "canary"]
    assert records[-2]["cohorts"] == {"eu-west": {"principals": ["bob", "newcomer"], "role_sets": []}}
    assert records[-1]["cohorts"] == {"eu-west": None} and records[-1]["request_id"] == "CR-clear"
    # The same request id again does nothing twice.
    again = ctl_json(etcd.endpoints, prefix, "canary", "v2", "--cohort", "eu-west=", "--request-id", "CR-clear")
    assert again["repeated"] is True


def test_a_cohort_naming_a_role_the_active_set_lacks_is_refused_for_that_shadow_only(
    etcd: EtcdCluster, tmp_path: Path, regions: tuple[str, dict[str, RunningSidecar]]
) -> None:
    prefix, sides = regions
    eu = sides["eu-west"]
    code, out, err = ctl_captured(etcd.endpoints, prefix, "canary", "v2", "--cohort-roles", "eu-west=viewer+editr")
    assert (code, out) == (1, "") and len(err.strip().splitlines()) == 1
    assert "'editr'" in err and "not a role of the active set v1" in err
    assert "cohorts" not in ctl_json(etcd.endpoints, prefix, "status")["shadows"]["v2"]
    # Written around ctl: the sidecars leave v2 out, and v3 beside it still decides for its cohort.
    propose(
        etcd.endpoints, prefix, tmp_path, {"version": "v3", "changes": [{"role": "viewer", "add": ["things:delete"]}]}
    )
    typo = Cohort(role_sets=frozenset({frozenset({"viewer", "editr"})}))
    pointer = layout.encode_shadows(
        {
            "v2": Rollout(state="canary", cohorts={"us-east": typo}),
            "v3": Rollout(state="canary", cohorts={"eu-west": Cohort(principals=frozenset({"bob"}))}),
        }
    )
    raw_put(etcd.endpoints, layout.Layout(prefix).shadows, pointer)

    def refused() -> list[str]:
        return [r["document"] for r in status(eu).get("refused_documents", [])]

    wait_for(lambda: bool(refused()) and shadow_status(eu, "v3").get("cohort_here") == 1, what="v2 refused")
    (entry,) = status(eu)["refused_documents"]
    assert entry["kind"] == "shadow" and "v2" in entry["document"] and "'editr'" in entry["reason"]
    assert [s["version"] for s in status(eu)["shadows"]] == ["v3"]
    assert answer(eu, "bob", "GET") == (200, "cohort")


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--cohort", "eu-west"], "expected REGION=PRINCIPAL,PRINCIPAL"),
        (["--cohort-roles", "eu-west"], "expected REGION=ROLE+ROLE"),
        (["--cohort", "EU=bob"], "not a region name"),
        (["--cohort", "eu-west=bob,,ann"], "an empty name"),
        (["--cohort-roles", "eu-west=viewer++editor"], "an empty name"),
        (["--cohort-roles", "eu-west=no role"], "not a role name"),
        (["--cohort", "eu-west=*"], "not a principal"),
        (["--cohort", "eu-west=bob", "--plan", "eu-west=5"], "not both"),
        ([], "give at least one --weight REGION=PERCENT, --cohort or --cohort-roles"),
    ],
)
def test_a_cohort_flag_usage_error_is_one_line_and_exit_2(flags: list[str], needle: str) -> None:
    code, out, err = run_main("ctl", "canary", "v2", *flags, "--etcd", "127.0.0.1:1", "--etcd-timeout", "1")
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and needle in err, err
