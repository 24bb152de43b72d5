"""Replay recorded decisions against a proposed set: what would have flipped, for whom, before any
traffic reaches it.

The plan (:mod:`authz_sidecar.model.plan`) says exactly who gains or loses what; it cannot say which
of those answers anybody actually asks for. A decision log (``serve --decision-log``) can: replayed
here, each recorded (principal, handle, scope) is decided by the active set and by the proposal, and
every disagreement is a request that would have been answered otherwise. The comparison is with
what the active set answers *now*, not with the recorded answer: the log may span canary traffic
and earlier active sets, and a replay is about the change from the current active set. Records the
active set now answers otherwise than they were answered are counted apart (``drift``), so a log
from before a promotion is seen for what it is.

Pure: no I/O, no clock. A million records usually hold a few thousand distinct questions, so the
reader counts them (:func:`tally`) and each distinct one is decided once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from authz_sidecar.model.engine import CompiledSet
from authz_sidecar.model.reasons import Reason

# One recorded decision, as replay needs it: principal, handle, scope, and whether it was allowed.
Decision = tuple[str, str, str | None, bool]


class Flipped(NamedTuple):
    """A recorded question the proposal answers otherwise than the active set, with how often it
    was asked."""

    handle: str
    principal: str
    scope: str | None
    gains: bool
    requests: int

    def describe(self) -> str:
        where = f" in {self.scope}" if self.scope else ""
        return f"{self.principal} {'gains' if self.gains else 'loses'} {self.handle}{where}: {self.requests} request(s)"


@dataclass(frozen=True, slots=True)
class HandleFlips:
    """Per handle, each direction apart: an allow that becomes a deny breaks someone's work; a deny
    that becomes an allow widens access. Requests, and the distinct principals behind them."""

    allow_to_deny_requests: int
    allow_to_deny_principals: int
    deny_to_allow_requests: int
    deny_to_allow_principals: int


@dataclass(frozen=True, slots=True)
class Replay:
    active: str
    proposed: str
    # Records replayed, and the distinct (principal, handle, scope, answer) among them.
    requests: int
    distinct: int
    flipped_requests: int
    flipped_principals: int
    by_handle: dict[str, HandleFlips]
    # Every flipped question, sorted by handle, principal and scope.
    flips: tuple[Flipped, ...]
    # Records the active set now answers otherwise than they were answered (an older active set,
    # a canary's answer, a log from another deployment).
    drift: int
    # Handles the change moves that no record asks for at all, and that no record would see flip:
    # the part of the change this log says nothing about.
    changed_not_requested: tuple[str, ...]
    changed_not_exercised: tuple[str, ...]


def tally(decisions: Iterable[Decision]) -> Counter[Decision]:
    """How often each distinct decision was recorded."""
    return Counter(decisions)


def replay(
    decisions: Mapping[Decision, int],
    active: CompiledSet,
    proposed: CompiledSet,
    changed_handles: Iterable[str] = (),
) -> Replay:
    """Decide each distinct recorded question with both sets and count what flips.

    `changed_handles`: the handles the plan of `proposed` against `active` moves (Plan.by_handle),
    to name those the recorded traffic never touched."""
    allowed = Reason.ALLOWED
    requests = 0
    drift = 0
    asked: set[str] = set()
    per_question: dict[tuple[str, str, str | None], list[int]] = {}  # -> [gains (0/1), requests]
    for (principal, handle, scope, recorded), n in decisions.items():
        requests += n
        asked.add(handle)
        before = active.decide(principal, handle, scope) is allowed
        if before != recorded:
            drift += n
        question = (principal, handle, scope)
        entry = per_question.get(question)
        if entry is not None:  # the same question recorded with the other answer
            entry[1] += n
            continue
        if (proposed.decide(principal, handle, scope) is allowed) != before:
            per_question[question] = [0 if before else 1, n]
    flips = tuple(
        Flipped(handle, principal, scope, bool(entry[0]), entry[1])
        for (principal, handle, scope), entry in sorted(
            per_question.items(), key=lambda item: (item[0][1], item[0][0], item[0][2] or "")
        )
    )
    directions: dict[tuple[str, bool], tuple[list[int], set[str]]] = {}
    for flip in flips:
        counted = directions.get((flip.handle, flip.gains))
        if counted is None:
            counted = directions[(flip.handle, flip.gains)] = ([0], set())
        counted[0][0] += flip.requests
        counted[1].add(flip.principal)
    by_handle: dict[str, HandleFlips] = {}
    for handle in sorted({handle for handle, _gains in directions}):
        lose = directions.get((handle, False), ([0], set()))
        gain = directions.get((handle, True), ([0], set()))
        by_handle[handle] = HandleFlips(lose[0][0], len(lose[1]), gain[0][0], len(gain[1]))
    changed = set(changed_handles)
    exercised = {flip.handle for flip in flips}
    return Replay(
        active=active.version,
        proposed=proposed.version,
        requests=requests,
        distinct=len(decisions),
        flipped_requests=sum(flip.requests for flip in flips),
        flipped_principals=len({flip.principal for flip in flips}),
        by_handle=by_handle,
        flips=flips,
        drift=drift,
        changed_not_requested=tuple(sorted(changed - asked)),
        changed_not_exercised=tuple(sorted(changed - exercised)),
    )
