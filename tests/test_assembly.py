"""The per-document rules, on plain values: what is taken, what is refused, what falls back."""

from __future__ import annotations

import copy
from typing import Any

from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.model.assembly import ACTIVE_SLOT, LastGood, Read, Refusal, assemble
from authz_sidecar.model.values import Catalog, PermissionSet, ShadowSet

from .helpers import ACTIVE, CATALOG, shadow

CAT = "catalogs/things"


def active(doc: dict[str, Any] | None = None, name: str = "sets/v1") -> Read[PermissionSet]:
    return Read(name, parse_permission_set(doc or ACTIVE, name))


def catalog(doc: dict[str, Any] | None = None) -> Read[Catalog]:
    return Read(CAT, parse_catalog(doc or CATALOG, CAT))


def shadow_read(version: str, **kwargs: Any) -> Read[ShadowSet]:
    return Read(f"sets/{version}", parse_shadow(shadow(version, **kwargs), version))


def without(handle: str) -> dict[str, Any]:
    return {
        **CATALOG,
        "permissions": [p for p in CATALOG["permissions"] if p["handle"] != handle],
        "routes": [r for r in CATALOG["routes"] if r["permission"] != handle],
    }


def test_nothing_to_serve_before_the_first_good_active_set() -> None:
    assert assemble(None, [], [catalog()]).waiting == "no active set yet"
    bad: Read[Any] = Read("sets/v1", Refusal("active", "sets/v1", "not valid JSON"))
    result = assemble(bad, [], [catalog()])
    assert result.snapshot is None and result.waiting == "sets/v1: not valid JSON"
    assert result.refusals == (bad.value,)


def test_a_refused_active_set_keeps_the_last_good_one() -> None:
    first = assemble(active(), [], [catalog()])
    assert first.snapshot is not None
    bad: Read[Any] = Read("sets/v2", Refusal("active", "sets/v2", "broken"))
    second = assemble(bad, [shadow_read("v3")], [catalog()], last=first.last_good)
    assert second.snapshot is not None and second.snapshot.active_version == "v1"
    assert [s.version for s in second.snapshot.shadows] == ["v3"]
    assert second.refusals == (bad.value,) and not second.stale


def test_a_new_active_set_with_an_unknown_handle_is_refused() -> None:
    first = assemble(active(), [], [catalog()])
    typo = copy.deepcopy(ACTIVE)
    typo["version"] = "v2"
    typo["roles"]["viewer"] = ["things:veiw"]
    second = assemble(active(typo, "sets/v2"), [], [catalog()], last=first.last_good)
    assert second.snapshot is not None and second.snapshot.active_version == "v1"
    (refusal,) = second.refusals
    assert (refusal.kind, refusal.document) == ("active", "sets/v2") and "things:veiw" in refusal.reason


def test_a_catalog_dropping_a_handle_the_active_set_grants_keeps_its_last_good_version() -> None:
    first = assemble(active(), [], [catalog()])
    second = assemble(active(), [], [catalog(without("things:edit"))], last=first.last_good)
    assert second.snapshot is not None and "things:edit" in second.snapshot.handles
    (refusal,) = second.refusals
    assert (refusal.kind, refusal.document) == ("catalog", CAT) and "things:edit" in refusal.reason
    # Once the active set no longer grants it, the smaller catalog is taken.
    smaller = copy.deepcopy(ACTIVE)
    smaller["version"] = "v2"
    smaller["roles"]["editor"] = ["things:view"]
    third = assemble(active(smaller, "sets/v2"), [], [catalog(without("things:edit"))], last=second.last_good)
    assert third.refusals == () and third.snapshot is not None and "things:edit" not in third.snapshot.handles


def test_shadows_are_refused_one_by_one_in_version_order() -> None:
    twin = Read("sets/v2-again", parse_shadow(shadow("v2"), "v2"))
    same_as_active = Read("sets/v1-shadow", parse_shadow(shadow("v1"), "v1"))
    result = assemble(
        active(),
        [
            shadow_read("v10", weights={"us-east": 50}),
            shadow_read("v2", weights={"us-east": 60}),
            shadow_read("v9", weights={"us-east": 40}),
            twin,
            same_as_active,
        ],
        [catalog()],
        region="us-east",
    )
    assert result.snapshot is not None
    assert [s.version for s in result.snapshot.shadows] == ["v2", "v9"]
    reasons = {r.document: r.reason for r in result.refusals}
    assert set(reasons) == {"sets/v10", "sets/v2-again", "sets/v1-shadow"}
    assert "over 100" in reasons["sets/v10"] and "another shadow" in reasons["sets/v2-again"]


def test_documents_from_a_disk_copy_are_stale_until_the_source_confirms_them() -> None:
    disk = assemble(active(), [], [catalog()]).last_good.from_disk()
    assert disk.unconfirmed == {ACTIVE_SLOT, CAT}
    missing: Read[Any] = Read(
        "sets/v9", Refusal("pointer", "pointers/active", "names version 'v9', which is not in etcd")
    )
    served = assemble(missing, [], [catalog()], last=disk)
    assert served.snapshot is not None and served.stale and served.last_good.unconfirmed == {ACTIVE_SLOT}
    confirmed = assemble(active(), [], [catalog()], last=served.last_good)
    assert not confirmed.stale and confirmed.last_good.unconfirmed == frozenset()
    broken: Read[Any] = Read(CAT, Refusal("catalog", CAT, "not valid JSON"))
    assert assemble(active(), [], [broken], last=disk).last_good.unconfirmed == {CAT}


def test_last_good_is_what_served() -> None:
    result = assemble(active(), [shadow_read("v2")], [catalog()])
    assert result.last_good.active is not None and result.last_good.active.document == "sets/v1"
    assert set(result.last_good.catalogs) == {CAT} and set(result.shadows) == {"sets/v2"}
    assert LastGood().from_disk().unconfirmed == frozenset()
