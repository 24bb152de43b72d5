"""The plan of a change, like ``terraform plan``: exactly who gains or loses which handle in which
scope, computed from the two sets (never sampled), and the part the proposal does not declare.

A proposal declares what it means to change (``changes:`` in a full set; a change file by
construction). Applied alone to the active set, the declaration predicts an impact; every flip of
the real proposal beyond that prediction is *undeclared*: a handle taken from a second role by
mistake, a grant lost in a copy. ``ctl propose`` refuses undeclared flips unless they are accepted
explicitly, and once accepted they stay outside the predicted impact, so live traffic that hits
them is counted as an unexpected mismatch everywhere. A proposal that declares nothing is its own
declaration: all of its impact is intended.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from authz_sidecar.model.engine import CompiledSet, compile_set, declared, impact
from authz_sidecar.model.values import PermissionSet


class Flip(NamedTuple):
    """One answer that changes: `principal` gains (or loses) `handle` in `scope` (None: unscoped,
    which is every scope the principal holds no scoped grant in). A named tuple: a plan over a
    hundred thousand principals builds as many, and a tuple is several times cheaper to make."""

    handle: str
    principal: str
    scope: str | None
    gains: bool

    def describe(self) -> str:
        where = f" in {self.scope}" if self.scope else ""
        return f"{self.principal} {'gains' if self.gains else 'loses'} {self.handle}{where}"


@dataclass(frozen=True, slots=True)
class Plan:
    active: str
    proposed: str
    # Every flip, sorted by handle, then principal, then scope.
    flips: tuple[Flip, ...]
    # The flips the proposal's declared changes do not explain.
    undeclared: tuple[Flip, ...]

    def by_handle(self) -> dict[str, dict[str, int]]:
        """Per handle: how many (principal, scope) pairs gain it and how many lose it."""
        gains = Counter(f.handle for f in self.flips if f.gains)
        losses = Counter(f.handle for f in self.flips if not f.gains)
        return {h: {"gain": gains[h], "lose": losses[h]} for h in sorted(gains.keys() | losses.keys())}

    def principals(self) -> int:
        return len({f.principal for f in self.flips})


def _flips(triples: frozenset[tuple[str, str, str | None]], proposed: CompiledSet) -> tuple[Flip, ...]:
    """The triples as flips, sorted by handle, principal and scope; each gains when the proposal
    holds the handle there (its unscoped grants, plus the scope's own for a scoped triple)."""
    flips = []
    for principal, handle, scope in sorted(triples, key=lambda t: (t[1], t[0], t[2] or "")):
        held = handle in proposed.held(principal)
        if scope is not None and not held:
            held = handle in proposed.held(principal, scope)
        flips.append(Flip(handle, principal, scope, held))
    return tuple(flips)


def plan(active: PermissionSet, proposal: PermissionSet) -> Plan:
    """The exact impact of making `proposal` active in place of `active`, and its undeclared part."""
    compiled_active, compiled_proposal = compile_set(active), compile_set(proposal)
    changed = impact(compiled_active, compiled_proposal)
    meant = declared(active, proposal)
    undeclared: frozenset[tuple[str, str, str | None]] = frozenset()
    if meant is not proposal:
        undeclared = changed - impact(compiled_active, compile_set(meant))
    flips = _flips(changed, compiled_proposal)
    return Plan(
        active=active.version,
        proposed=proposal.version,
        flips=flips,
        undeclared=tuple(f for f in flips if (f.principal, f.handle, f.scope) in undeclared) if undeclared else (),
    )
