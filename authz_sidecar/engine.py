"""The decision engine: a permission set compiled once, then decided against with dict lookups.

Rules (DESIGN section 3), which this module is the only implementation of:

1. Additive only: a principal's handles are the union of its grants' roles' handles.
2. No wildcards or magic words: those are refused when documents are parsed, so a handle here
   always means exactly itself.
3. A decision is a pure function of (set, principal, handle, scope); unknown principal or missing
   handle denies with a reason.
4. A scoped grant applies only in its scope; an unscoped grant applies in every scope.

Compiling turns grants into frozensets per principal (one for unscoped grants, one per scope), so a
decision is two or three hash lookups and no allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz_sidecar.documents import Metadata, PermissionSet
from authz_sidecar.reasons import Reason

_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CompiledSet:
    """One permission set, ready to decide. Immutable; shared by every request that reads it.

    It keeps no reference to the parsed document, so a snapshot of a million grants holds only the
    compiled dicts (the strings inside are shared with nothing else)."""

    meta: Metadata
    unscoped: dict[str, frozenset[str]]
    scoped: dict[str, dict[str, frozenset[str]]]

    @property
    def version(self) -> str:
        return self.meta.version

    def decide(self, principal: str, handle: str, scope: str | None) -> Reason:
        """ALLOWED if an unscoped grant or a grant in `scope` carries `handle`; otherwise why not."""
        held = self.unscoped.get(principal)
        if held is not None and handle in held:
            return Reason.ALLOWED
        if scope:
            per_scope = self.scoped.get(principal)
            if per_scope is not None and handle in per_scope.get(scope, _EMPTY):
                return Reason.ALLOWED
        if held is None and principal not in self.scoped:
            return Reason.UNKNOWN_PRINCIPAL
        return Reason.MISSING_PERMISSION

    def handles_of(self, principal: str, scope: str | None = None) -> frozenset[str]:
        """Everything `principal` holds in `scope` (unscoped grants included)."""
        held = self.unscoped.get(principal, _EMPTY)
        if scope:
            held = held | self.scoped.get(principal, {}).get(scope, _EMPTY)
        return held

    def principals(self) -> frozenset[str]:
        return frozenset(self.unscoped) | frozenset(self.scoped)


def compile_set(permissions: PermissionSet) -> CompiledSet:
    """Fold grants into per-principal frozensets; the order of roles and grants cannot matter."""
    # One frozenset object per distinct handle set, shared by every principal that holds it: with many
    # grants most principals hold one of a few role combinations, which keeps memory per grant small.
    interned: dict[frozenset[str], frozenset[str]] = {}
    by_roles: dict[tuple[str, ...], frozenset[str]] = {}

    def intern(handles: frozenset[str]) -> frozenset[str]:
        return interned.setdefault(handles, handles)

    def handles_of(roles: tuple[str, ...]) -> frozenset[str]:
        found = by_roles.get(roles)
        if found is None:
            found = by_roles[roles] = intern(frozenset(h for role in roles for h in permissions.roles[role]))
        return found

    unscoped: dict[str, frozenset[str]] = {}
    scoped: dict[str, dict[str, frozenset[str]]] = {}
    for grant in permissions.grants:
        handles = handles_of(grant.roles)
        if grant.scope is None:
            held = unscoped.get(grant.principal)
            unscoped[grant.principal] = handles if held is None else intern(held | handles)
        else:
            per_scope = scoped.setdefault(grant.principal, {})
            held = per_scope.get(grant.scope)
            per_scope[grant.scope] = handles if held is None else intern(held | handles)
    return CompiledSet(meta=permissions.meta, unscoped=unscoped, scoped=scoped)


def impact(active: CompiledSet, proposed: CompiledSet) -> frozenset[tuple[str, str, str | None]]:
    """(principal, handle, scope) triples whose answer differs between the two sets.

    A scope of None stands for the unscoped grants. This is the change's predicted impact: a
    disagreement seen on live traffic that is in it was expected; one that is not was not.
    """
    changed: set[tuple[str, str, str | None]] = set()
    for principal in active.principals() | proposed.principals():
        before = active.unscoped.get(principal, _EMPTY)
        after = proposed.unscoped.get(principal, _EMPTY)
        changed.update((principal, h, None) for h in before ^ after)
        a_scoped = active.scoped.get(principal, {})
        p_scoped = proposed.scoped.get(principal, {})
        for scope in a_scoped.keys() | p_scoped.keys():
            old = a_scoped.get(scope, _EMPTY) | before
            new = p_scoped.get(scope, _EMPTY) | after
            changed.update((principal, h, scope) for h in old ^ new)
    return frozenset(changed)
