"""Decide with the enforced set, then observe every other live set beside it (the dark launch).

Observation never changes the answer: it only records what each other set would have said and
whether that disagrees (a mismatch), split into expected (the change's predicted impact contains
the principal, handle and scope) and unexpected. Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz_sidecar.model.engine import CompiledSet
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import Selection, select
from authz_sidecar.model.snapshot import ShadowView, Snapshot


@dataclass(frozen=True, slots=True)
class Observation:
    version: str
    shadow: bool
    reason: Reason
    mismatch: bool
    # Meaningful only when mismatch: the disagreement was predicted by the change's impact.
    expected: bool

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED


@dataclass(frozen=True, slots=True)
class Evaluation:
    reason: Reason
    enforced: CompiledSet
    decided_by: str  # "active" or "shadow"
    selection: Selection
    observed: tuple[Observation, ...]
    mismatch: bool

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED


def _predicted(view: ShadowView | None, principal: str, handle: str, scope: str | None) -> bool:
    if view is None:
        return False
    return view.impact.predicts(principal, handle, scope)


def evaluate(
    snapshot: Snapshot,
    principal: str,
    handle: str,
    scope: str | None,
    *,
    shadow_header: str | None = None,
    stickiness_key: str | None = None,
) -> Evaluation:
    """Select the enforced set, decide, and observe the others."""
    enforced, selection = select(snapshot, principal, shadow_header, stickiness_key or principal)
    return judge(snapshot, enforced, principal, handle, scope, selection=selection)


def judge(
    snapshot: Snapshot,
    enforced: CompiledSet,
    principal: str,
    handle: str,
    scope: str | None,
    *,
    selection: Selection,
) -> Evaluation:
    """Decide with a set already selected, and observe the others. Apart from :func:`evaluate` for a
    request that asks many questions of one selection (a manifest's accounts): selecting once keeps
    every answer of that request to the one set, and the selection's cost to one."""
    reason = enforced.decide(principal, handle, scope)
    allowed = reason is Reason.ALLOWED
    enforced_view = None if enforced is snapshot.active else snapshot.by_version[enforced.meta.version]
    observed: list[Observation] = []
    any_mismatch = False
    if enforced_view is not None:
        r = snapshot.active.decide(principal, handle, scope)
        mismatch = (r is Reason.ALLOWED) != allowed
        expected = mismatch and _predicted(enforced_view, principal, handle, scope)
        observed.append(Observation(snapshot.active.meta.version, False, r, mismatch, expected))
        any_mismatch = mismatch
    for view in snapshot.shadows:
        if view is enforced_view:
            continue
        r = view.compiled.decide(principal, handle, scope)
        mismatch = (r is Reason.ALLOWED) != allowed
        expected = mismatch and (
            _predicted(view, principal, handle, scope) or _predicted(enforced_view, principal, handle, scope)
        )
        observed.append(Observation(view.version, True, r, mismatch, expected))
        any_mismatch = any_mismatch or mismatch
    return Evaluation(
        reason=reason,
        enforced=enforced,
        decided_by="active" if enforced_view is None else "shadow",
        selection=selection,
        observed=tuple(observed),
        mismatch=any_mismatch,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a front renders: the reason, the evaluation when a set was consulted, the permission."""

    reason: Reason
    evaluation: Evaluation | None = None
    permission: str | None = None

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED
