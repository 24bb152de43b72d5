"""Shadow reports: how much traffic has exercised each live shadow, tallied per sidecar.

Each sidecar tallies, per live shadow: how many Checks evaluated it (observed beside the enforced
set, or deciding itself), its mismatches by kind and direction, the handles requests asked for,
which of the shadow's predicted-impact entries (principal, handle, scope) traffic actually hit, and
the (principal, handle) pairs behind unexpected mismatches, so that ``ctl report`` can say who and
what a change affects that nobody predicted.
Every few seconds :mod:`authz_sidecar.store.publisher` writes the tally under
``<prefix>/reports/<version>/<sidecar id>``, attached to a lease that outlives a few publications,
so a sidecar that dies takes its report with it.
``authz-sidecar ctl report VERSION`` sums the reports of every sidecar and computes coverage: the
share of the predicted impact that traffic exercised, and the handles it never did.

The tally is counted on the hot path with dict and set operations (no lock: a rare lost increment
under the threaded server is acceptable for a report; an answer never depends on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from authz_sidecar.model.evaluation import Evaluation
from authz_sidecar.model.snapshot import Snapshot

log = structlog.get_logger("authz_sidecar.telemetry.reports")
# Impact entries listed per report at most: coverage of a huge change is reported as a count.
MAX_EXERCISED = 10_000
# Distinct (principal, handle) pairs behind unexpected mismatches kept per shadow: a change that
# surprises everyone costs a bounded dict; mismatches of pairs past it are counted, not itemised.
MAX_UNEXPECTED_PAIRS = 1_000
# Of those, the most frequent listed in a published report (the rest are counted as unlisted).
PUBLISHED_UNEXPECTED_PAIRS = 100
# Distinct principals the shadow denied where the active set allowed, kept per shadow: enough for
# any sane denial budget (a controller's gate); denials of principals past it are counted.
MAX_DENIED_PRINCIPALS = 1_000


@dataclass
class Tally:
    evaluations: int = 0
    mismatches: dict[str, int] = field(default_factory=dict)  # "expected/allow_to_deny" -> n
    handles: set[str] = field(default_factory=set)
    exercised: set[tuple[str, str, str | None]] = field(default_factory=set)
    unexpected: dict[tuple[str, str], int] = field(default_factory=dict)  # (principal, handle) -> n
    unexpected_unlisted: int = 0  # unexpected mismatches of pairs past MAX_UNEXPECTED_PAIRS
    # Principals behind allow_to_deny mismatches, with when each last was (wall clock: a controller
    # elsewhere counts the ones within its analysis window).
    denied: dict[str, float] = field(default_factory=dict)
    denied_unlisted: int = 0  # allow_to_deny mismatches of principals past MAX_DENIED_PRINCIPALS

    def count_unexpected(self, principal: str, handle: str, times: int = 1) -> None:
        pair = (principal, handle)
        n = self.unexpected.get(pair)
        if n is not None:
            self.unexpected[pair] = n + times
        elif len(self.unexpected) < MAX_UNEXPECTED_PAIRS:
            self.unexpected[pair] = times
        else:
            self.unexpected_unlisted += times

    def count_denied(self, principal: str, times: int = 1) -> None:
        denied = self.denied
        if principal in denied or len(denied) < MAX_DENIED_PRINCIPALS:
            denied[principal] = time.time()
        else:
            self.denied_unlisted += times

    def document(self) -> dict[str, Any]:
        pairs = sorted(self.unexpected.items(), key=lambda item: (-item[1], item[0]))
        listed = pairs[:PUBLISHED_UNEXPECTED_PAIRS]
        return {
            "evaluations": self.evaluations,
            "mismatches": dict(sorted(self.mismatches.items())),
            "handles": sorted(self.handles),
            "exercised": sorted([list(e) for e in self.exercised], key=str)[:MAX_EXERCISED],
            "unexpected": [[p, h, n] for (p, h), n in listed],
            "unexpected_unlisted": self.unexpected_unlisted + sum(n for _pair, n in pairs[PUBLISHED_UNEXPECTED_PAIRS:]),
            "denied_principals": sorted([p, round(t, 3)] for p, t in self.denied.items()),
            "denied_unlisted": self.denied_unlisted,
        }


class ShadowReports:
    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = {}
        # Counts a front holds until they are read (the Check lane's): see add_pending.
        self._pending: list[Callable[[], None]] = []

    def add_pending(self, settle: Callable[[], None]) -> None:
        """`settle` adds counts held elsewhere into the tallies; it runs before they are read."""
        self._pending.append(settle)

    def settle(self) -> None:
        """Take in the counts held elsewhere: call before reading :attr:`tallies`."""
        for settle in self._pending:
            settle()

    def observe(
        self,
        snapshot: Snapshot,
        evaluation: Evaluation,
        principal: str,
        handle: str,
        scope: str | None,
        *,
        times: int = 1,
    ) -> None:
        """Count `times` Checks with this answer against every live shadow they evaluated."""
        tallies = self.tallies
        versions = [o for o in evaluation.observed if o.shadow]
        by_shadow = evaluation.decided_by == "shadow"
        enforced = evaluation.enforced.meta.version if by_shadow else None
        # What the active set answered: a shadow that answered otherwise exercised its impact, the
        # whole of it (declared or not): `ctl report` intersects these with the exact impact.
        active_allowed = (
            next((o.allowed for o in evaluation.observed if not o.shadow), evaluation.allowed)
            if by_shadow
            else evaluation.allowed
        )
        answers = [(o.version, o.allowed) for o in versions] + ([(enforced, evaluation.allowed)] if enforced else [])
        for version, allowed in answers:
            tally = tallies.get(version)
            if tally is None:
                tally = tallies[version] = Tally()
            tally.evaluations += times
            tally.handles.add(handle)
            if allowed != active_allowed:
                tally.exercised.add((principal, handle, scope))
                if scope is not None:
                    tally.exercised.add((principal, handle, None))
        # A mismatch goes to the shadow that disagreed; its direction is from the set it disagreed
        # with to the shadow. For a request the shadow decided (a canary, a tester), that is its
        # disagreement with the active set, the one a canary's gates judge.
        mismatched = [(o.version, o.expected, evaluation.allowed) for o in versions if o.mismatch]
        if enforced is not None:
            mismatched += [
                (enforced, o.expected, o.allowed) for o in evaluation.observed if not o.shadow and o.mismatch
            ]
        for version, expected, before in mismatched:
            key = ("expected/" if expected else "unexpected/") + ("allow_to_deny" if before else "deny_to_allow")
            tally = tallies[version]
            tally.mismatches[key] = tally.mismatches.get(key, 0) + times
            if not expected:
                tally.count_unexpected(principal, handle, times)
            if before:
                tally.count_denied(principal, times)

    def retain(self, live: set[str]) -> None:
        """Forget shadows that are no longer live (after taking in what is held of them)."""
        self.settle()
        self.tallies = {v: t for v, t in self.tallies.items() if v in live}
