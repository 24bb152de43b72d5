"""Why a set allows or denies: the grants and roles that carry a handle to a principal, or that none
does. Read from the set's document, not its compiled form, which keeps only the handles: the
answer must name the grant an operator would edit.

It follows the engine's rules exactly (:mod:`authz_sidecar.model.engine`): an unscoped grant applies
in every scope, a scoped grant only in its scope, and a handle is held when a role of such a grant
lists it. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from authz_sidecar.model.values import Grant, PermissionSet

NO_GRANT = "no grant gives this handle"


@dataclass(frozen=True, slots=True)
class Because:
    """One grant and one of its roles that carry the handle."""

    grant: Grant
    role: str

    def describe(self) -> str:
        where = f" in {self.grant.scope}" if self.grant.scope else " (unscoped: every scope)"
        return f"grant of {', '.join(self.grant.roles)} to {self.grant.principal}{where}: role {self.role} has it"


@dataclass(frozen=True, slots=True)
class Explanation:
    version: str
    principal: str
    handle: str
    scope: str | None
    allowed: bool
    # The grants and roles that give the handle (empty for a deny).
    because: tuple[Because, ...]
    # For a deny: the principal's grants that apply here (what it does hold), and the roles that
    # would give the handle (what a grant would need).
    held: tuple[Grant, ...] = ()
    roles_with_handle: tuple[str, ...] = ()
    # Grants of the principal in other scopes that do carry the handle: "allowed elsewhere".
    elsewhere: tuple[Because, ...] = ()

    def reason(self) -> str:
        if self.allowed:
            return "; ".join(b.describe() for b in self.because)
        if not self.held and not self.elsewhere:
            who = f"{self.principal} holds no grant{' in ' + self.scope if self.scope else ''}"
            return f"{NO_GRANT} ({who})"
        parts = [NO_GRANT]
        if self.held:
            roles = sorted({r for g in self.held for r in g.roles})
            parts.append(f"{self.principal} holds {', '.join(roles)} here, none of which has {self.handle}")
        if self.elsewhere:
            parts.append("it would in " + ", ".join(sorted({b.grant.scope or "" for b in self.elsewhere})))
        if self.roles_with_handle:
            parts.append(f"roles with {self.handle}: {', '.join(self.roles_with_handle)}")
        return "; ".join(parts)

    def document(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "principal": self.principal,
            "handle": self.handle,
            "scope": self.scope,
            "answer": "allow" if self.allowed else "deny",
            "why": self.reason(),
            "grants": [
                {"principal": b.grant.principal, "roles": list(b.grant.roles), "scope": b.grant.scope, "role": b.role}
                for b in self.because
            ],
            "roles_with_handle": list(self.roles_with_handle),
        }


def explain(permissions: PermissionSet, principal: str, handle: str, scope: str | None) -> Explanation:
    """Why `permissions` answers as it does for `principal` asking for `handle` in `scope`."""
    roles = permissions.roles
    mine = [g for g in permissions.grants if g.principal == principal]
    applies = [g for g in mine if g.scope is None or (scope is not None and g.scope == scope)]
    because = tuple(Because(g, r) for g in applies for r in g.roles if handle in roles.get(r, ()))
    elsewhere = tuple(Because(g, r) for g in mine if g not in applies for r in g.roles if handle in roles.get(r, ()))
    return Explanation(
        version=permissions.version,
        principal=principal,
        handle=handle,
        scope=scope,
        allowed=bool(because),
        because=because,
        held=tuple(applies) if not because else (),
        roles_with_handle=tuple(sorted(r for r, handles in roles.items() if handle in handles)) if not because else (),
        elsewhere=elsewhere if not because else (),
    )
