"""The snapshot: everything one sidecar decides with, built and validated, then swapped in.

A snapshot is immutable. :func:`build_snapshot` checks documents together and refuses them all on
the first problem (``ctl`` and ``validate`` use it so); the policy sources first take or refuse
each document on its own (:mod:`authz_sidecar.model.assembly`) and build from the ones taken, so a bad
document can never decide a request nor block the valid ones beside it. The rules: every handle a
set uses is in some catalog; shadow versions are unique and differ from the active version; per
region, live shadows' weights sum to at most 100; a live shadow's cohorts name only roles of the
active set. Cohorts do not count towards the weights: they are people named, not a share.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from authz_sidecar.errors import DocumentError
from authz_sidecar.model.cohorts import describe_missing, members, missing_roles, unscoped_combinations
from authz_sidecar.model.engine import (
    CompiledSet,
    Interner,
    Predicted,
    changed_roles,
    compile_set,
    declared_compiled,
    grants_of,
    impact_of,
    predict,
    principals_holding,
    recompile,
)
from authz_sidecar.model.pacing import pause
from authz_sidecar.model.routes import RouteTable
from authz_sidecar.model.values import Catalog, Cohort, PermissionSet, Rollout, ShadowSet


@dataclass(frozen=True, slots=True)
class ShadowView:
    """A live shadow as this sidecar sees it: compiled, with its rollout resolved for our region."""

    compiled: CompiledSet
    rollout: Rollout
    # This region's canary weight in basis points (percent * 100), 0 when not canaried here.
    weight_bp: int
    # (principal, handle, scope) triples the change is predicted to alter; scope None = unscoped.
    impact: Predicted
    # Its parent is no longer the active set (or it was marked stale on a promotion): never enforced.
    stale: bool = False
    # The principals it decides for in our region by cohort (resolved against the active set when
    # the snapshot was built); empty when stale or without a cohort here.
    cohort: frozenset[str] = frozenset()

    @property
    def version(self) -> str:
        return self.compiled.meta.version

    def is_tester(self, principal: str) -> bool:
        """Whether the principal may pick this shadow by header. A privilege, never a default: Envoy
        passes the header from outside, and a proposal may allow more than the active set. Nobody
        may pick a stale shadow."""
        return not self.stale and principal in self.rollout.testers


@dataclass(frozen=True, slots=True)
class Snapshot:
    active: CompiledSet
    shadows: tuple[ShadowView, ...]
    by_version: Mapping[str, ShadowView]
    # Shadows with a weight in this region, in version order: the canary walk's input.
    canaries: tuple[ShadowView, ...]
    routes: RouteTable
    handles: frozenset[str]
    catalogs: tuple[Catalog, ...]
    region: str
    revision: int = 0
    source: str = ""
    built_at: float = field(default_factory=time.time)
    # Shadows with a cohort in this region, in version order: checked before the canary walk.
    cohorts: tuple[ShadowView, ...] = ()
    # Answers computed from this snapshot, filled by the decision path. It lives here, not beside
    # the snapshot, so that a memo and the snapshot it belongs to can only change together: a thread
    # still deciding with an older snapshot writes into that snapshot's memo, never into the new one.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def active_version(self) -> str:
        return self.active.meta.version


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while documents are parsed and compiled.

    Parsing a large set allocates millions of dicts, lists and tuples that are all still alive, and
    every few hundred allocations the collector would scan them for cycles there are none of: with
    it running, loading a million grants took three times as long. Reference counting still frees
    everything; the collector resumes (if it was on) when the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: v2 before v10, 1.9 before 1.10."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p)


def is_stale(shadow: ShadowSet, active_version: str) -> bool:
    """Made against a set that is no longer active (or marked stale on a promotion): enforcing it
    would revert whatever was promoted since, for everyone it reached. It is still observed (its
    mismatches stay visible), never enforced: no weight, no cohort, no header."""
    parent = shadow.permissions.meta.parent
    return shadow.rollout.state == "stale" or bool(parent and parent != active_version)


def _check_handles(permissions: PermissionSet, known: frozenset[str], document: str) -> None:
    unknown = sorted(permissions.handles() - known)
    if unknown:
        raise DocumentError(
            f"handles not in any catalog: {', '.join(unknown)} (register them in the owning service's catalog)",
            document=document,
            field="roles",
            value=unknown,
        )


class CompileCache:
    """Compiled sets and predicted impacts kept between snapshots, keyed by the document object.

    Documents are immutable, so a source that hands the same PermissionSet object again (a file
    that did not change; an etcd version, which never changes) gets the same CompiledSet back and
    a rebuild compiles only what changed. Entries hold their document, so an id is never reused
    while it is a key; :meth:`retain` drops what the latest snapshot no longer uses.
    """

    def __init__(self) -> None:
        self._sets: dict[int, tuple[PermissionSet, CompiledSet]] = {}
        self._impacts: dict[tuple[int, int], Predicted] = {}
        self._interner = Interner()
        # id(child) -> (child, parent, principals whose grants differ): see derived().
        self._derived: dict[int, tuple[PermissionSet, PermissionSet, frozenset[str]]] = {}
        # (active set, cohort) -> its members: a rebuild for another reason (a weight moved, a
        # shadow came) does not walk a million grants again.
        self._cohorts: dict[tuple[int, Cohort], frozenset[str]] = {}

    def derived(self, child: PermissionSet, parent: PermissionSet, principals: frozenset[str]) -> None:
        """Say that `child` holds the same grants as `parent` but for those of `principals` (as
        the source found comparing their documents): `child` is then compiled from `parent`'s
        compiled set, and its impact against `parent` compares only those principals and the
        holders of roles defined differently."""
        edited = changed_roles(parent.roles, child.roles)
        moved = principals | principals_holding(child.grants, edited) if edited else principals
        self._derived[id(child)] = (child, parent, moved)

    def compiled(self, permissions: PermissionSet) -> CompiledSet:
        entry = self._sets.get(id(permissions))
        if entry is None:
            hint = self._derived.get(id(permissions))
            parent = self._sets.get(id(hint[1])) if hint is not None else None
            if hint is not None and parent is not None:
                moved = hint[2]
                grants = grants_of(permissions.grants, moved)
                compiled = recompile(parent[1], permissions, moved, grants, self._interner)
            else:
                compiled = compile_set(permissions, self._interner)
            entry = self._sets[id(permissions)] = (permissions, compiled)
        return entry[1]

    def impact(self, active: PermissionSet, shadow: PermissionSet) -> Predicted:
        key = (id(active), id(shadow))
        found = self._impacts.get(key)
        if found is None:
            compiled_active = self.compiled(active)
            hint = self._derived.get(id(shadow))
            if shadow.changes:
                # Predicted from what the proposal declares it changes, when it declares anything:
                # the active set with those changes applied, folded again for whom they name.
                intended, moved = declared_compiled(active, compiled_active, shadow, self._interner)
                found = impact_of(compiled_active, intended, moved)
            elif hint is not None and hint[1] is active:
                found = impact_of(compiled_active, self.compiled(shadow), hint[2])
            else:
                found = predict(compiled_active, self.compiled(shadow))
            self._impacts[key] = found
        return found

    def cohorts(self, active: PermissionSet, cohorts: Iterable[Cohort]) -> dict[Cohort, frozenset[str]]:
        """The members of each cohort, against `active`; its combinations are found at most once
        per call, and only when a cohort not seen before names one. What is kept for `active`
        afterwards is exactly these cohorts: one a plan has moved past is forgotten."""
        self.compiled(active)  # keeps `active` alive while its id is a key here
        found: dict[Cohort, frozenset[str]] = {}
        holders: dict[frozenset[str], list[str]] | None = None
        for cohort in cohorts:
            known = self._cohorts.get((id(active), cohort))
            if known is None:
                if holders is None and cohort.role_sets:
                    holders = unscoped_combinations(active)
                known = members(cohort, holders or {})
            found[cohort] = known
        kept = {k: v for k, v in self._cohorts.items() if k[0] != id(active)}
        self._cohorts = kept | {(id(active), cohort): known for cohort, known in found.items()}
        return found

    def retain(self, used: Iterable[PermissionSet]) -> None:
        keep = {id(p) for p in used}
        self._sets = {k: v for k, v in self._sets.items() if k in keep}
        self._impacts = {k: v for k, v in self._impacts.items() if k[0] in keep and k[1] in keep}
        self._cohorts = {k: v for k, v in self._cohorts.items() if k[0] in keep}
        self._derived = {k: v for k, v in self._derived.items() if k in keep and id(v[1]) in keep}
        self._interner.keep(compiled for _, compiled in self._sets.values())


def build_snapshot(
    active: PermissionSet,
    shadows: Iterable[ShadowSet],
    catalogs: Iterable[Catalog],
    *,
    service: str = "",
    region: str = "",
    revision: int = 0,
    source: str = "",
    cache: CompileCache | None = None,
) -> Snapshot:
    """Validate the documents together and compile them; raise DocumentError on the first problem."""
    catalogs = tuple(catalogs)
    known = frozenset(h for c in catalogs for h in c.handles())
    if not active.meta.version:
        raise DocumentError("the active set needs a version", document="active", field="version", value=None)
    _check_handles(active, known, f"active set {active.version}")
    cache = cache if cache is not None else CompileCache()
    compiled_active = cache.compiled(active)
    views: list[ShadowView] = []
    totals: dict[str, int] = {}
    seen = {active.version}
    ordered = sorted(shadows, key=lambda s: version_key(s.version))
    here = [
        s.rollout.cohorts[region] for s in ordered if region in s.rollout.cohorts and not is_stale(s, active.version)
    ]
    pause()
    cohorts = cache.cohorts(active, here) if here else {}
    for shadow in ordered:
        pause()
        document = f"shadow set {shadow.version}"
        if shadow.version in seen:
            raise DocumentError(
                f"version {shadow.version!r} is used twice", document=document, field="version", value=shadow.version
            )
        seen.add(shadow.version)
        _check_handles(shadow.permissions, known, document)
        for r, w in shadow.rollout.weights.items():
            totals[r] = totals.get(r, 0) + w
            if totals[r] > 100:
                raise DocumentError(
                    f"canary weights in region {r!r} sum to {totals[r]} (over 100)",
                    document=document,
                    field=f"weights.{r}",
                    value=w,
                )
        stale = is_stale(shadow, active.version)
        missing = [] if stale else missing_roles(shadow.rollout.cohorts, active.roles)
        if missing:
            raise DocumentError(
                describe_missing(missing, active.roles, active.version),
                document=document,
                field=f"cohorts.{missing[0][0]}",
                value=[role for _r, role in missing],
            )
        cohort = shadow.rollout.cohorts.get(region)
        views.append(
            ShadowView(
                compiled=cache.compiled(shadow.permissions),
                rollout=shadow.rollout,
                weight_bp=0 if stale else shadow.rollout.weights.get(region, 0) * 100,
                impact=cache.impact(active, shadow.permissions),
                stale=stale,
                cohort=cohorts.get(cohort, frozenset()) if cohort is not None and not stale else frozenset(),
            )
        )
    own = [c for c in catalogs if c.service == service] if service else list(catalogs)
    return Snapshot(
        active=compiled_active,
        shadows=tuple(views),
        by_version={v.version: v for v in views},
        canaries=tuple(v for v in views if v.weight_bp > 0),
        cohorts=tuple(v for v in views if v.cohort),
        routes=RouteTable(r for c in own for r in c.routes),
        handles=known,
        catalogs=catalogs,
        region=region,
        revision=revision,
        source=source,
    )
