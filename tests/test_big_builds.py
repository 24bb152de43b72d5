"""The etcd source's builder with large sets: a proposal is read and compiled against the active
set, the answers are those of a whole build, and a build does not leave work for the collector nor
hold the GIL in long slices."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from authz_sidecar.documents import bigsets
from authz_sidecar.documents.parsers import dump_permission_set
from authz_sidecar.model import pacing
from authz_sidecar.model.assembly import LastGood
from authz_sidecar.model.engine import compile_set, impact
from authz_sidecar.model.values import Grant, Metadata, PermissionSet, Rollout
from authz_sidecar.store import layout
from authz_sidecar.store.layout import Layout
from authz_sidecar.store.sources import etcd as etcd_source
from authz_sidecar.store.sources.etcd import SnapshotBuilder

LAYOUT = Layout("/authz")
ROLES = {"viewer": ("things:view",), "editor": ("things:view", "things:edit")}
CATALOG = {"service": "things", "permissions": [{"handle": "things:view"}, {"handle": "things:edit"}]}


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(bigsets, "PIECE", 256)
    yield


def permissions(version: str, grants: list[Grant], **roles: tuple[str, ...]) -> PermissionSet:
    meta = Metadata(version=version, parent="v1" if version != "v1" else "")
    return PermissionSet(roles={**ROLES, **roles}, grants=tuple(grants), meta=meta)


def keys(active: PermissionSet, *shadows: PermissionSet) -> dict[str, bytes]:
    kv: dict[str, bytes] = {LAYOUT.catalog("things"): json.dumps(CATALOG).encode()}
    for permission_set in (active, *shadows):
        kv.update(LAYOUT.set_keys(permission_set.version, dump_permission_set(permission_set)))
    kv[LAYOUT.active] = layout.encode_active(active.version)
    kv[LAYOUT.shadows] = layout.encode_shadows({s.version: Rollout() for s in shadows})
    return kv


def grants(n: int) -> list[Grant]:
    return [Grant(f"user-{i}", ("viewer",), "account:a" if i % 7 == 0 else None) for i in range(n)]


def test_a_proposal_is_read_against_the_active_set_and_answers_as_a_whole_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recompiled: list[Any] = []
    monkeypatch.setattr("authz_sidecar.model.snapshot.recompile", _spy(recompiled, "authz_sidecar.model.snapshot"))
    active = permissions("v1", grants(2000))
    changed = grants(2000)
    changed[1000] = Grant("user-1000", ("editor",), None)
    changed.insert(10, Grant("newcomer", ("editor",), "account:b"))
    del changed[1500]
    shadow = permissions("v2", changed)
    edited = permissions("v3", grants(2000), viewer=("things:view", "things:edit"))
    builder = SnapshotBuilder(LAYOUT, service="things", region="here", source="test")
    first, _ = builder.build(keys(active), 1, LastGood())
    assembly, _ = builder.build(keys(active, shadow, edited), 2, first.last_good)
    assert assembly.snapshot is not None and not assembly.refusals
    assert len(recompiled) == 2  # both shadows compiled from the active set's compiled set
    views = {v.version: v for v in assembly.snapshot.shadows}
    whole_active = compile_set(active)
    for version, expected in (("v2", shadow), ("v3", edited)):
        whole = compile_set(expected)
        assert views[version].compiled.unscoped == whole.unscoped
        assert views[version].compiled.scoped == whole.scoped
        assert views[version].compiled.scoped_only == whole.scoped_only
        assert frozenset(views[version].impact) == impact(whole_active, whole)
    assert {p for p, _h, _s in views["v2"].impact} == {"user-1000", "newcomer", "user-1499"}


def _spy(calls: list[Any], module: str) -> Any:
    real = sys.modules[module].recompile

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    return spy


def test_a_large_build_is_frozen_out_of_the_collectors_sight(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = SnapshotBuilder(LAYOUT, service="things", region="here", source="test")
    gc.unfreeze()
    try:
        monkeypatch.setattr(etcd_source, "FREEZE_AFTER", 10_000)
        builder.build(keys(permissions("v1", grants(500))), 1, LastGood())
        assert gc.get_freeze_count() == 0  # a small build leaves the collector alone
        builder = SnapshotBuilder(LAYOUT, service="things", region="here", source="test")
        monkeypatch.setattr(etcd_source, "FREEZE_AFTER", 400)
        builder.build(keys(permissions("v1", grants(500))), 1, LastGood())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_build_hands_the_gil_over_more_often_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    real = bigsets.read_set

    def read(*args: Any, **kwargs: Any) -> Any:
        seen.append(sys.getswitchinterval())
        return real(*args, **kwargs)

    monkeypatch.setattr(etcd_source, "read_set", read)
    before = sys.getswitchinterval()
    builder = SnapshotBuilder(LAYOUT, service="things", region="here", source="test")
    builder.build(keys(permissions("v1", grants(10))), 1, LastGood())
    assert seen == [pytest.approx(pacing.QUICK_SWITCH_INTERVAL)]  # kept in whole microseconds
    assert sys.getswitchinterval() == before
