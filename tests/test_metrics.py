"""Dashboards read /metrics: counters move with requests, and a shadow's mismatches are split into
those its proposal declared and those it did not (a role edited by mistake)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_sidecar.documents import parse_permission_set
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.engine import compile_set, declared, impact

from .helpers import CATALOG, RunningSidecar, check, moved, request, scrape, sidecar_settings, status_of, write_policy

ROLES = {
    "viewer": ["things:view"],
    "editor": ["things:view", "things:edit"],
    "admin": ["things:view", "things:edit", "things:delete"],
}
ACTIVE = {
    "version": "v1",
    "roles": ROLES,
    "grants": [
        {"principal": "ed", "roles": ["editor"]},
        {"principal": "ada", "roles": ["admin"]},
        {"principal": "vic", "roles": ["viewer"]},
    ],
}
# v2 means to take things:edit from admins, and by mistake takes it from editors too.
V2 = {
    **ACTIVE,
    "version": "v2",
    "parent": "v1",
    "roles": {**ROLES, "editor": ["things:view"], "admin": ["things:view", "things:delete"]},
    "changes": [{"role": "admin", "remove": ["things:edit"]}],
    "weights": {"us-east": 0},
}


@pytest.fixture
def side(tmp_path: Path) -> Iterator[RunningSidecar]:
    policy = write_policy(tmp_path / "p", active=ACTIVE, shadows=[V2], catalog=CATALOG)
    running = RunningSidecar(sidecar_settings(policy, identity=("header",), dev_principal_header="x-user"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


def test_expected_and_unexpected_mismatches_are_counted_apart(side: RunningSidecar) -> None:
    before = scrape(side)
    for principal in ("ada", "ada", "ed"):
        assert status_of(check(side, request("/things/1", "PUT", headers={"x-user": principal}))) == 200
    assert status_of(check(side, request("/things/1", "GET", headers={"x-user": "vic"}))) == 200
    after = scrape(side)
    mismatches = "authz_mismatches_total"
    assert moved(before, after, mismatches, version="v2", kind="expected", direction="allow_to_deny") == 2
    assert moved(before, after, mismatches, version="v2", kind="unexpected", direction="allow_to_deny") == 1
    decisions = "authz_set_decisions_total"
    assert moved(before, after, decisions, kind="active", version="v1", decision="allow", enforced="true") == 4
    assert moved(before, after, decisions, kind="shadow", version="v2", decision="deny", enforced="false") == 3
    assert moved(before, after, "authz_check_duration_seconds_count") == 4


def test_declared_changes_predict_the_impact() -> None:
    active, v2 = parse_permission_set(ACTIVE, "v1"), parse_permission_set(V2, "v2", extra_fields=frozenset({"weights"}))
    predicted = impact(compile_set(active), compile_set(declared(active, v2)))
    actual = impact(compile_set(active), compile_set(v2))
    assert predicted == {("ada", "things:edit", None)}
    assert actual == {("ada", "things:edit", None), ("ed", "things:edit", None)}
    grant = {**ACTIVE, "changes": [{"principal": "vic", "grant": ["editor"], "revoke": ["viewer"]}]}
    assert impact(compile_set(active), compile_set(declared(active, parse_permission_set(grant, "g")))) == {
        ("vic", "things:edit", None)
    }
    for bad in (
        [{"role": "admin", "principal": "x"}],
        [{"role": "admin", "grant": ["viewer"]}],
        [{"principal": "x", "add": ["things:view"]}],
        [{"role": "admin", "remove": ["things:*"]}],
        [{"role": "admin", "bogus": 1}],
    ):
        with pytest.raises(DocumentError):
            parse_permission_set({**ACTIVE, "changes": bad}, "bad")


def test_declared_changes_survive_the_trip_through_etcds_canonical_json() -> None:
    from authz_sidecar.documents import dump_permission_set, load_document

    v2 = parse_permission_set(V2, "v2", extra_fields=frozenset({"weights"}))
    assert parse_permission_set(load_document(dump_permission_set(v2), "x"), "x") == v2


def test_per_set_counters_move_with_requests(running: RunningSidecar) -> None:
    """Each live set's answers are counted, enforced or observed, and the counters move by exactly
    what was sent (the conftest policy: v1 active, v2 observed beside it)."""
    before = scrape(running)
    for _ in range(3):
        check(running, request(method="PUT", sub="bob"))  # v1 denies, v2 (observed) would allow
    after = scrape(running)
    decisions = "authz_set_decisions_total"
    assert moved(before, after, decisions, kind="active", version="v1", decision="deny", enforced="true") == 3
    assert moved(before, after, decisions, kind="shadow", version="v2", decision="allow", enforced="false") == 3
    kind = {"version": "v2", "kind": "expected", "direction": "deny_to_allow"}
    assert moved(before, after, "authz_mismatches_total", **kind) == 3
    assert after[("authz_ready", ())] == 1.0 and after[("authz_source_connected", ())] == 0.0  # files: local
