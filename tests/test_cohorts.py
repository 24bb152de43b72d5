"""Cohorts, on plain values: who is in one (by name, by exactly the unscoped role combination held in
the active set), where it decides (its region, a live shadow), what it yields to (a tester's
header) and what it wins over (the canary weight), and how a wrong one is refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_rollout, parse_shadow
from authz_sidecar.documents.cohorts import MAX_COHORT_PRINCIPALS, MAX_COHORT_ROLE_SETS
from authz_sidecar.documents.rolloutplans import parse_rollout_plan, rollout_plan_document
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.assembly import Read, assemble
from authz_sidecar.model.evaluation import evaluate
from authz_sidecar.model.rolloutplan import Step
from authz_sidecar.model.selection import Selection, select
from authz_sidecar.model.snapshot import CompileCache, Snapshot, build_snapshot
from authz_sidecar.model.values import Cohort
from authz_sidecar.store import layout

from .helpers import ACTIVE, CATALOG, shadow

# bob and qa-bot hold exactly [viewer] unscoped; alice [editor]; carol editor only in account:acme.
EVERYONE = ("alice", "bob", "carol", "qa-bot", "mallory")


def snap(*shadows: dict[str, Any], region: str = "eu-west", active: dict[str, Any] = ACTIVE) -> Snapshot:
    return build_snapshot(
        parse_permission_set(active, "active"),
        [parse_shadow(s, s["version"]) for s in shadows],
        [parse_catalog(CATALOG, "catalog")],
        service="things",
        region=region,
    )


def chosen(s: Snapshot, principal: str, header: str | None = None) -> tuple[str, Selection]:
    enforced, how = select(s, principal, header, principal)
    return enforced.version, how


def test_a_role_combination_takes_exactly_its_holders_in_its_region_only() -> None:
    viewers = shadow("v2", cohorts={"eu-west": {"role_sets": [["viewer"]]}})
    here = snap(viewers, region="eu-west")
    assert here.by_version["v2"].cohort == {"bob", "qa-bot"}
    assert {p: chosen(here, p) for p in EVERYONE} == {
        "alice": ("v1", Selection.DEFAULT),
        "bob": ("v2", Selection.COHORT),
        "carol": ("v1", Selection.DEFAULT),
        "qa-bot": ("v2", Selection.COHORT),
        "mallory": ("v1", Selection.DEFAULT),
    }
    elsewhere = snap(viewers, region="us-east")
    assert elsewhere.cohorts == () and all(chosen(elsewhere, p)[0] == "v1" for p in EVERYONE)


def test_exactly_the_combination_not_at_least() -> None:
    """A principal holding viewer and editor unscoped is in the [viewer, editor] cohort and not in
    [viewer]; the order of the roles, and how the grants split them, do not matter; scoped grants
    do not count."""
    active = copy.deepcopy(ACTIVE)
    active["grants"] += [
        {"principal": "dora", "roles": ["viewer"]},
        {"principal": "dora", "roles": ["editor"]},
        {"principal": "erin", "roles": ["editor", "viewer"]},
        {"principal": "bob", "roles": ["editor"], "scope": "account:acme"},
    ]
    s = snap(
        shadow("v2", cohorts={"eu-west": {"role_sets": [["viewer", "editor"]]}}),
        shadow("v3", cohorts={"eu-west": {"role_sets": [["viewer"]]}}),
        active=active,
    )
    assert s.by_version["v2"].cohort == {"dora", "erin"}
    assert s.by_version["v3"].cohort == {"bob", "qa-bot"}


def test_named_principals_are_in_whatever_they_hold() -> None:
    s = snap(shadow("v2", cohorts={"eu-west": {"principals": ["alice", "newcomer"], "role_sets": [["viewer"]]}}))
    assert s.by_version["v2"].cohort == {"alice", "newcomer", "bob", "qa-bot"}
    ev = evaluate(s, "newcomer", "things:view", None)
    assert ev.selection is Selection.COHORT and ev.decided_by == "shadow"


def test_header_beats_cohort_beats_weight() -> None:
    s = snap(
        shadow("v2", weights={"eu-west": 100}),
        shadow("v3", testers=["bob"], cohorts={"eu-west": {"principals": ["bob", "alice"]}}),
        shadow("v4", testers=["bob"]),
    )
    assert chosen(s, "bob", "v4") == ("v4", Selection.HEADER)
    assert chosen(s, "alice", "v4") == ("v1", Selection.HEADER_IGNORED)  # a header still outranks a cohort
    assert chosen(s, "bob") == ("v3", Selection.COHORT)  # v2's 100% does not take him
    assert chosen(s, "qa-bot") == ("v2", Selection.CANARY)


def test_in_two_cohorts_the_first_in_version_order_decides() -> None:
    s = snap(
        shadow("v10", cohorts={"eu-west": {"principals": ["bob"]}}),
        shadow("v9", cohorts={"eu-west": {"role_sets": [["viewer"]]}}),
    )
    assert [v.version for v in s.cohorts] == ["v9", "v10"]
    assert chosen(s, "bob") == ("v9", Selection.COHORT)


def test_a_stale_shadows_cohort_decides_nobody() -> None:
    stale = {**shadow("v2", cohorts={"eu-west": {"principals": ["bob"]}}), "parent": "v0"}
    s = snap(stale)
    assert s.by_version["v2"].stale and s.by_version["v2"].cohort == frozenset() and s.cohorts == ()
    assert chosen(s, "bob") == ("v1", Selection.DEFAULT)
    marked = {**shadow("v3", cohorts={"eu-west": {"principals": ["bob"]}}), "state": "stale"}
    assert chosen(snap(marked), "bob") == ("v1", Selection.DEFAULT)


def test_a_cohort_naming_a_role_the_active_set_lacks_refuses_that_shadow_only() -> None:
    typo = shadow("v2", cohorts={"us-east": {"role_sets": [["viewer", "editr"]]}})
    fine = shadow("v3", cohorts={"eu-west": {"role_sets": [["viewer"]]}})
    result = assemble(
        Read("sets/v1", parse_permission_set(ACTIVE, "sets/v1")),
        [Read(f"sets/{d['version']}", parse_shadow(d, d["version"])) for d in (typo, fine)],
        [Read("catalogs/things", parse_catalog(CATALOG, "catalogs/things"))],
        region="eu-west",
    )
    assert result.snapshot is not None and [s.version for s in result.snapshot.shadows] == ["v3"]
    (refusal,) = result.refusals
    assert (refusal.kind, refusal.document) == ("shadow", "sets/v2")
    assert refusal.reason.startswith("cohorts.us-east: role 'editr' of the us-east cohort is not a role of the active")
    with pytest.raises(DocumentError, match="'editr'"):
        snap(typo)
    # Stale, it decides nobody: the role no longer matters and it stays observed.
    assert snap({**typo, "parent": "v0"}).by_version["v2"].stale


@pytest.mark.parametrize(
    ("cohorts", "needle"),
    [
        ({"EU": {"principals": ["bob"]}}, "not a region name"),
        ({"eu-west": {"principals": ["bob"], "roles": []}}, "unknown field 'roles'"),
        ({"eu-west": {"principals": ["*"]}}, "not a principal"),
        ({"eu-west": {"principals": "bob"}}, "expected a list"),
        ({"eu-west": {"role_sets": [[]]}}, "at least one role"),
        ({"eu-west": {"role_sets": ["viewer"]}}, "expected a list"),
        ({"eu-west": {"role_sets": [["no role"]]}}, "not a role name"),
        ({"eu-west": {"principals": [f"p{i}" for i in range(MAX_COHORT_PRINCIPALS + 1)]}}, "at most 10,000"),
        ({"eu-west": {"role_sets": [[f"r{i}"] for i in range(MAX_COHORT_ROLE_SETS + 1)]}}, "at most 100"),
        ({"eu-west": ["bob"]}, "expected a mapping"),
    ],
)
def test_a_malformed_cohort_is_refused_naming_the_field(cohorts: dict[str, Any], needle: str) -> None:
    with pytest.raises(DocumentError, match=needle) as raised:
        parse_rollout({"cohorts": cohorts}, "shadow v2")
    assert raised.value.field.startswith("cohorts.")


def test_a_cohort_makes_a_canary_and_round_trips_through_the_pointer() -> None:
    rollout = parse_rollout(
        {"cohorts": {"eu-west": {"principals": ["bob", "alice"], "role_sets": [["viewer", "editor"], ["viewer"]]}}},
        "x",
    )
    assert rollout.state == "canary"
    assert rollout.cohorts["eu-west"] == Cohort(
        frozenset({"alice", "bob"}), frozenset({frozenset({"viewer", "editor"}), frozenset({"viewer"})})
    )
    document = layout.rollout_document(rollout)
    assert document["cohorts"] == {
        "eu-west": {"principals": ["alice", "bob"], "role_sets": [["editor", "viewer"], ["viewer"]]}
    }
    assert layout.decode_shadows(layout.encode_shadows({"v2": rollout}), "pointers/shadows") == {"v2": rollout}
    # Without a cohort, the pointer is what it was before cohorts existed; an empty one is none.
    assert "cohorts" not in layout.rollout_document(parse_rollout({"cohorts": {"eu-west": {}}}, "x"))


def test_a_rebuild_reuses_resolved_cohorts_and_forgets_those_moved_past() -> None:
    cache = CompileCache()
    active = parse_permission_set(ACTIVE, "active")
    first = Cohort(role_sets=frozenset({frozenset({"viewer"})}))
    second = Cohort(principals=frozenset({"alice"}))
    found = cache.cohorts(active, [first])
    assert cache.cohorts(active, [first])[first] is found[first]
    cache.cohorts(active, [second])
    assert cache.cohorts(active, [first])[first] is not found[first]


def test_a_plan_step_may_be_a_cohort_and_a_later_weight_keeps_it() -> None:
    plan = parse_rollout_plan(
        {
            "steps": [
                {"region": "eu-west", "cohort": {"principals": ["alice"], "role_sets": [["viewer"]]}},
                {"region": "eu-west", "weight": 25},
                {"region": "us-east", "cohort": {"role_sets": [["editor", "viewer"]]}},
            ]
        },
        "plan",
    )
    cohort = Cohort(frozenset({"alice"}), frozenset({frozenset({"viewer"})}))
    assert plan.steps[0] == Step("eu-west", 0, cohort)
    assert plan.rollout_at(0) == ({}, {"eu-west": cohort})
    assert plan.rollout_at(1) == ({"eu-west": 25}, {"eu-west": cohort})
    assert plan.rollout_at(2)[1].keys() == {"eu-west", "us-east"} and plan.weights_at(2) == {"eu-west": 25}
    assert plan.describe() == "eu-west=cohort,25 then us-east=cohort every 120s"
    assert plan.steps[0].describe() == "eu-west cohort (1 named, 1 role combination)"
    assert parse_rollout_plan(rollout_plan_document(plan), "again") == plan


@pytest.mark.parametrize(
    ("step", "needle"),
    [
        ({"region": "eu-west", "weight": 5, "cohort": {"principals": ["bob"]}}, "a weight or a cohort"),
        ({"region": "eu-west"}, "a weight or a cohort"),
        ({"region": "eu-west", "cohort": {}}, "names principals or role combinations"),
        ({"region": "eu-west", "cohort": {"people": ["bob"]}}, "unknown field 'people'"),
        ({"region": "EU", "cohort": {"principals": ["bob"]}}, "not a region name"),
        ({"region": "eu-west", "weight": 5, "wieght": 5}, "unknown field 'wieght'"),
    ],
)
def test_a_malformed_step_is_refused(step: dict[str, Any], needle: str) -> None:
    with pytest.raises(DocumentError, match=needle):
        parse_rollout_plan({"steps": [step]}, "plan")
