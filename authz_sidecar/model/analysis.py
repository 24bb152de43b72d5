"""One analysis of a canary step: the gates, each with its value and threshold, and the outcome.

Read from the shadow reports the sidecars publish (:mod:`authz_sidecar.telemetry.reports`): the
counts of the sidecars in the step's region since the window opened, and, for coverage, what
traffic in every region exercised. Two kinds of gate:

- *failing* gates (unexpected mismatches, the denial budget): breached, the outcome is Failed at
  once, even part way through an interval: a change that hurts people is rolled back within
  seconds, not at the end of a two-minute window;
- *holding* gates (enough evaluations, every reporting sidecar fresh, coverage before the
  promotion): short, the outcome is Inconclusive: not enough evidence, which is not evidence of harm.

Pure: the controller reads etcd, this decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from authz_sidecar.model.cases import CaseResult
from authz_sidecar.model.rolloutplan import Counters, Outcome, RolloutPlan, Window

Triple = tuple[str, str, str | None]


@dataclass(frozen=True, slots=True)
class Report:
    """What one sidecar published about one shadow."""

    sidecar: str
    region: str
    at: float  # when it was published (the sidecar's clock)
    interval: float  # how often it publishes
    revision: int  # the etcd revision of the snapshot it serves
    state: str  # the shadow's state in that snapshot ("" when it does not have the shadow)
    counters: Counters
    # Principals the shadow denied where the active set allowed, each with when it last did (the
    # sidecar's clock; bounded: the denials of principals past the bound are Counters.unlisted).
    denied: Mapping[str, float]
    exercised: frozenset[Triple]


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    value: Any
    threshold: Any
    passed: bool
    # A failing gate fails the analysis; a holding gate only leaves it Inconclusive.
    failing: bool
    detail: str = ""

    def document(self) -> dict[str, Any]:
        return {
            "gate": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
            "kind": "fail" if self.failing else "hold",
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass(frozen=True, slots=True)
class Analysis:
    outcome: Outcome | None  # None: a check part way through a window that found nothing failing
    gates: tuple[Gate, ...]
    reason: str

    def document(self, at: float) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value if self.outcome else "Running",
            "reason": self.reason,
            "at": at,
            "gates": [g.document() for g in self.gates],
        }


@dataclass(frozen=True, slots=True)
class Impact:
    """What the coverage gate measures against: the change's whole impact (declared or not) and
    its changed handles."""

    triples: frozenset[Triple]

    def handles(self) -> frozenset[str]:
        return frozenset(h for _p, h, _s in self.triples)

    def covered(self, exercised: Iterable[Triple]) -> tuple[frozenset[Triple], float, frozenset[str]]:
        """What traffic hit of this impact, that share of it, and the changed handles it never
        exercised: one rule for `ctl report` and the coverage gates."""
        hit = frozenset(exercised) & self.triples
        share = round(len(hit) / len(self.triples), 4) if self.triples else 1.0
        return hit, share, self.handles() - {h for _p, h, _s in hit}


def fresh(report: Report, now: float, live_revision: int) -> str:
    """Why `report` cannot be trusted as evidence ('' when it can): too old for its publication
    interval, from a snapshot older than the live pointers, or of a stale shadow."""
    if now - report.at > 3 * report.interval + 1:
        return f"{report.sidecar}: its report is {now - report.at:.0f}s old"
    if report.revision < live_revision:
        return f"{report.sidecar}: serves revision {report.revision}, the pointers are at {live_revision}"
    if report.state in ("", "stale"):
        return f"{report.sidecar}: {'does not see the shadow' if not report.state else 'sees it stale'}"
    return ""


def window_counts(reports: Iterable[Report], window: Window) -> tuple[Counters, frozenset[str], int]:
    """The counts since `window` opened, summed over `reports`, the principals denied in it, and
    the denials in it of principals past the reports' bound (each counted as one more principal)."""
    evaluations = unexpected = denied = unlisted = 0
    principals: set[str] = set()
    for report in reports:
        base = window.baseline.get(report.sidecar, Counters())
        if report.counters.evaluations < base.evaluations:  # the sidecar restarted under the same id
            base = Counters()
        evaluations += report.counters.evaluations - base.evaluations
        unexpected += report.counters.unexpected - base.unexpected
        denied += report.counters.denied - base.denied
        unlisted += report.counters.unlisted - base.unlisted
        principals.update(p for p, last in report.denied.items() if last >= window.started)
    return Counters(evaluations, unexpected, denied, unlisted), frozenset(principals), unlisted


def opening(reports: Iterable[Report], now: float) -> Window:
    """A window opening at `now`: every report's counters as they are."""
    return Window(started=now, baseline={r.sidecar: r.counters for r in reports})


def analyse(
    plan: RolloutPlan,
    step: int,
    window: Window,
    reports: Iterable[Report],
    *,
    now: float,
    live_revision: int,
    impact: Impact | None,
    complete: bool,
    cases: Sequence[CaseResult] | None = None,
) -> Analysis:
    """Judge step `step` of `plan` on `reports` (every region's; the step's region is picked here).
    With `complete` (the interval has passed) every gate is judged; without, only the failing ones,
    and the outcome is Failed or None."""
    everywhere = list(reports)
    region = plan.steps[step].region
    here = [r for r in everywhere if r.region == region]
    counts, denied, unlisted = window_counts(here, window)
    gates = [
        Gate(
            "unexpected_mismatches",
            counts.unexpected,
            plan.gates.max_unexpected,
            counts.unexpected <= plan.gates.max_unexpected,
            failing=True,
        ),
        Gate(
            "denied_requests",
            counts.denied,
            plan.gates.max_denied_requests,
            counts.denied <= plan.gates.max_denied_requests,
            failing=True,
            detail="requests the shadow denies where the active set allows",
        ),
        Gate(
            "denied_principals",
            len(denied) + unlisted,
            plan.gates.max_denied_principals,
            len(denied) + unlisted <= plan.gates.max_denied_principals,
            failing=True,
            detail=", ".join(sorted(denied)[:5]) + (" ..." if len(denied) > 5 else ""),
        ),
    ]
    failed = [g for g in gates if not g.passed]
    if failed:
        return Analysis(Outcome.FAILED, tuple(gates), _reason(failed, region))
    if not complete:
        return Analysis(None, tuple(gates), f"{region}: nothing failing so far")
    stale = [why for why in (fresh(r, now, live_revision) for r in here) if why]
    gates += [
        Gate("sidecars_reporting", len(here), ">= 1", bool(here), failing=False, detail=f"in {region}"),
        Gate("sidecars_fresh", len(here) - len(stale), len(here), not stale, failing=False, detail="; ".join(stale)),
        Gate(
            "evaluations",
            counts.evaluations,
            plan.gates.min_evaluations,
            counts.evaluations >= plan.gates.min_evaluations,
            failing=False,
        ),
    ]
    if cases is not None:
        wrong = [r for r in cases if not r.passed]
        gates.append(
            Gate(
                "cases",
                len(wrong),
                0,
                not wrong,
                failing=False,
                detail="; ".join(
                    f"{r.case.name!r} expected {'allow' if r.case.allow else 'deny'}: {r.error or r.why}"
                    for r in wrong[:5]
                )
                + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""),
            )
        )
    if plan.is_last(step) and impact is not None:
        gates += _coverage_gates(plan, impact, everywhere)
    holding = [g for g in gates if not g.passed]
    if holding:
        return Analysis(Outcome.INCONCLUSIVE, tuple(gates), _reason(holding, region))
    return Analysis(Outcome.SUCCESSFUL, tuple(gates), f"{region}: every gate passed")


def _coverage_gates(plan: RolloutPlan, impact: Impact, reports: list[Report]) -> list[Gate]:
    """Before the promotion: how much of the whole impact traffic exercised (in any region), and the
    changed handles it never did, unless waived by name."""
    _hit, coverage, unexercised = impact.covered(frozenset().union(*(r.exercised for r in reports)))
    never = sorted(unexercised - set(plan.waived))
    waived = sorted(set(plan.waived) & impact.handles())
    return [
        Gate("coverage", coverage, plan.gates.min_coverage, coverage >= plan.gates.min_coverage, failing=False),
        Gate(
            "unexercised_handles",
            never,
            [],
            not never,
            failing=False,
            detail=(
                "changed handles no request exercised: waive one with --accept-unexercised HANDLE --reason"
                if never
                else ""
            )
            + (f"; waived: {', '.join(waived)}" if waived else ""),
        ),
    ]


def _reason(gates: list[Gate], region: str) -> str:
    return f"{region}: " + "; ".join(
        f"{g.name} {_shown(g.value)} (threshold {_shown(g.threshold)})" + (f": {g.detail}" if g.detail else "")
        for g in gates
    )


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value[:5])) + (" ..." if len(value) > 5 else "") + "]"
    return str(value)
