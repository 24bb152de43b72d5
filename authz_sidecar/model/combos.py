"""The combinations of roles principals actually hold, and which of them could be merged.

Before moving users onto a new set cohort by cohort, a platform team wants to know which role
combinations exist, how many principals hold each, how many of those are active, and which
combinations are redundant: two combinations that yield exactly the same handles (a role inside one
of them adds nothing), or one whose handles are all inside another's although its roles are not
(it could be folded into the larger one). A combination is taken per scope, as the engine applies
grants: in a scope, a principal holds the roles of its unscoped grants and of its grants in that
scope; unscoped, only the former.

Pure. Linear in the grants; the subset search is over distinct combinations only, with each handle
set as a bit mask, and bounded by :data:`MAX_COMPARED`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from authz_sidecar.model.values import PermissionSet, grant_rows

# Principals listed per combination (the count is always exact).
SAMPLE = 5
# Distinct combinations compared pairwise for subsets, the most held first.
MAX_COMPARED = 1_000


@dataclass(frozen=True, slots=True)
class Combo:
    roles: tuple[str, ...]
    handles: frozenset[str]
    # (principal, scope) pairs holding exactly these roles.
    holders: int
    principals: int
    active: int  # of those principals, the ones seen in recorded decisions
    sample: tuple[str, ...]
    scopes: int  # distinct scopes it is held in (an unscoped holding counts as one)

    def document(self) -> dict[str, Any]:
        return {
            "roles": list(self.roles),
            "handles": sorted(self.handles),
            "holders": self.holders,
            "principals": self.principals,
            "active": self.active,
            "sample": list(self.sample),
            "scopes": self.scopes,
        }


@dataclass(frozen=True, slots=True)
class Combos:
    version: str
    combos: tuple[Combo, ...]  # the most held first
    # Groups of combinations yielding exactly the same handles.
    same_handles: tuple[tuple[tuple[str, ...], ...], ...]
    # (smaller, larger): every handle of the smaller is in the larger, though not all its roles are.
    subsets: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    compared: int  # how many combinations the subset search covered


class _Held:
    """Who holds which roles where, with one frozenset object per distinct combination (unions
    cached), so that grouping a million principals is a dict of identities, not a million sets."""

    def __init__(self) -> None:
        self._canon: dict[Any, frozenset[str]] = {}

    def canon(self, roles: tuple[str, ...]) -> frozenset[str]:
        found = self._canon.get(roles)
        if found is None:
            found = self._canon[roles] = frozenset(roles)
        return found

    def union(self, a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
        if a is b:
            return a
        key = (id(a), id(b))
        found = self._canon.get(key)
        if found is None:
            merged = a | b
            found = self._canon[key] = self._canon.setdefault(tuple(sorted(merged)), merged)
        return found


def combos(permissions: PermissionSet, active: Collection[str] = frozenset()) -> Combos:
    held = _Held()
    unscoped: dict[str, frozenset[str]] = {}
    scoped: dict[tuple[str, str], frozenset[str]] = {}
    for principal, granted, scope in grant_rows(permissions.grants):
        roles = held.canon(granted)
        table: dict[Any, frozenset[str]] = unscoped if scope is None else scoped
        key = principal if scope is None else (principal, scope)
        before = table.get(key)
        table[key] = roles if before is None else held.union(before, roles)
    # Per combination: holders, principals, a few of them, scopes.
    holders: dict[frozenset[str], int] = {}
    samples: dict[frozenset[str], list[str]] = {}
    scopes: dict[frozenset[str], set[str | None]] = {}
    extra: dict[frozenset[str], set[str]] = {}  # principals holding it only in some scope
    for principal, roles in unscoped.items():
        holders[roles] = holders.get(roles, 0) + 1
        sample = samples.setdefault(roles, [])
        if len(sample) < SAMPLE:
            sample.append(principal)
    for (principal, scope), roles in scoped.items():
        base = unscoped.get(principal)
        combo = roles if base is None else held.union(base, roles)
        holders[combo] = holders.get(combo, 0) + 1
        scopes.setdefault(combo, set()).add(scope)
        if base is not combo:
            extra.setdefault(combo, set()).add(principal)
            sample = samples.setdefault(combo, [])
            if len(sample) < SAMPLE and principal not in sample:
                sample.append(principal)
    unscoped_count: dict[frozenset[str], int] = {}
    for roles in unscoped.values():
        unscoped_count[roles] = unscoped_count.get(roles, 0) + 1
    for roles in unscoped_count:
        scopes.setdefault(roles, set()).add(None)
    actives = _actives(unscoped, scoped, held, active)
    role_handles = permissions.roles
    found = [
        Combo(
            roles=tuple(sorted(combo)),
            handles=frozenset(h for r in combo for h in role_handles.get(r, ())),
            holders=n,
            principals=unscoped_count.get(combo, 0) + len(extra.get(combo, ())),
            active=len(actives.get(combo, ())),
            sample=tuple(sorted(samples.get(combo, ()))),
            scopes=len(scopes.get(combo, ())),
        )
        for combo, n in holders.items()
    ]
    found.sort(key=lambda c: (-c.holders, c.roles))
    same, subsets = _candidates(found[:MAX_COMPARED])
    return Combos(permissions.version, tuple(found), same, subsets, min(len(found), MAX_COMPARED))


def _actives(
    unscoped: dict[str, frozenset[str]],
    scoped: dict[tuple[str, str], frozenset[str]],
    held: _Held,
    active: Collection[str],
) -> dict[frozenset[str], set[str]]:
    """Per combination, its holders seen in recorded decisions (nothing to do without any)."""
    found: dict[frozenset[str], set[str]] = {}
    if not active:
        return found
    for principal, roles in unscoped.items():
        if principal in active:
            found.setdefault(roles, set()).add(principal)
    for (principal, _scope), roles in scoped.items():
        if principal in active:
            base = unscoped.get(principal)
            found.setdefault(roles if base is None else held.union(base, roles), set()).add(principal)
    return found


def _candidates(
    found: list[Combo],
) -> tuple[tuple[tuple[tuple[str, ...], ...], ...], tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]]:
    groups: dict[frozenset[str], list[tuple[str, ...]]] = {}
    for combo in found:
        groups.setdefault(combo.handles, []).append(combo.roles)
    same = tuple(tuple(sorted(g)) for g in groups.values() if len(g) > 1)
    bit: dict[str, int] = {}
    for handles in groups:
        for handle in handles:
            bit.setdefault(handle, 1 << len(bit))
    masks = [
        (roles, sum(bit[h] for h in handles), set(roles)) for handles, members in groups.items() for roles in members
    ]
    subsets = []
    for small, small_mask, small_roles in masks:
        for large, large_mask, large_roles in masks:
            if small_mask != large_mask and small_mask & large_mask == small_mask and not small_roles <= large_roles:
                subsets.append((small, large))
    return tuple(sorted(same)), tuple(sorted(subsets))


def document(result: Combos, limit: int) -> dict[str, Any]:
    return {
        "version": result.version,
        "combinations": len(result.combos),
        "holders": sum(c.holders for c in result.combos),
        "listed": [c.document() for c in result.combos[:limit]],
        "same_handles": [[list(r) for r in group] for group in result.same_handles],
        "subsets": [{"smaller": list(s), "larger": list(lg)} for s, lg in result.subsets],
        "compared": result.compared,
    }


def active_principals(decisions: Mapping[tuple[str, str, str | None, bool], int]) -> frozenset[str]:
    """The principals recorded decisions were made for."""
    return frozenset(d[0] for d in decisions)
