"""A shadow's rollout plan and its progress, and the one rule that moves a plan on.

A rollout plan (the shape Flagger and Argo Rollouts gave canaries, applied to permission changes):
ordered steps of region and canary weight (or region and cohort: people named, or the holders of
a role combination), an analysis every ``interval``, the number of consecutive
Successful analyses a step needs, how many Inconclusive ones it tolerates before pausing, the gates
the analyses apply (:mod:`authz_sidecar.model.analysis`), and the changed handles waived from the
coverage gate by name, each with its reason.

Its progress lives in etcd beside it, never in a controller's memory, so that any controller can
take over mid-plan: the step it is at, whether that step's weight is applied yet, the analyses
counted so far, and the window the next analysis measures (each reporting sidecar's counters when
it opened).

:func:`next_move` is the whole of the controller's judgement, pure: given the plan, its progress and
an analysis, what to do. The controller only carries it out, fenced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

from authz_sidecar.model.values import Cohort


class Outcome(StrEnum):
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


class PlanState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # by an operator, or by too many Inconclusive analyses: `ctl resume` goes on
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"  # by an operator: the weights are gone, the shadow stays live (observed only)
    DEAD_LETTER = "dead_letter"  # the rollback failed after its retries: an operator must finish it
    ENDED = "ended"  # the shadow left the live ones outside the plan (promoted or rolled back by hand)

    @property
    def finished(self) -> bool:
        return self not in (PlanState.RUNNING, PlanState.PAUSED)


class Step(NamedTuple):
    """A region and what the shadow gets there: a canary weight, or (weight 0) a cohort."""

    region: str
    weight: int
    cohort: Cohort | None = None

    @property
    def amount(self) -> str:
        """``25%`` or ``cohort``: how ``describe`` and ``ctl status`` name the step's size."""
        return "cohort" if self.cohort is not None else f"{self.weight}%"

    def describe(self) -> str:
        if self.cohort is None:
            return f"{self.region} at {self.weight}%"
        named, combinations = len(self.cohort.principals), len(self.cohort.role_sets)
        return (
            f"{self.region} cohort ({named} named, {combinations} role combination{'' if combinations == 1 else 's'})"
        )


@dataclass(frozen=True, slots=True)
class Gates:
    """What an analysis requires. Every default is the safe one: no unexpected mismatch at all, a
    small budget of denials of what the active set allows, every changed handle seen in traffic
    before the promotion."""

    # Evaluations of the shadow in the step's region within the interval (fewer: Inconclusive).
    min_evaluations: int = 100
    # Unexpected mismatches (flips no declared change explains) within the interval (more: Failed).
    max_unexpected: int = 0
    # The shadow's denials of what the active set allows, requests and distinct principals, within
    # the interval (more: Failed): a declared change that hurts far more people than planned stops.
    max_denied_requests: int = 100
    max_denied_principals: int = 20
    # Share of the whole impact (principal, handle, scope) that traffic exercised, before promoting.
    min_coverage: float = 0.0
    # Every registered policy test case passes on the shadow (when any are registered).
    cases: bool = True

    def document(self) -> dict[str, Any]:
        return {
            "min_evaluations": self.min_evaluations,
            "max_unexpected": self.max_unexpected,
            "max_denied_requests": self.max_denied_requests,
            "max_denied_principals": self.max_denied_principals,
            "min_coverage": self.min_coverage,
            "cases": self.cases,
        }


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    steps: tuple[Step, ...]
    interval: float = 120.0  # seconds
    # Consecutive Successful analyses a step needs before the next (or the promotion).
    successes: int = 1
    # Inconclusive analyses a step tolerates; one more pauses the plan, saying why.
    inconclusive_limit: int = 5
    gates: Gates = field(default_factory=Gates)
    # Changed handles the coverage gate does not wait for: handle -> the reason, audited.
    waived: Mapping[str, str] = field(default_factory=dict)
    # Webhook URLs and their timeout and retries, as the control plane's webhooks module reads them.
    webhooks: Mapping[str, Any] = field(default_factory=dict)

    def weights_at(self, index: int) -> dict[str, int]:
        """The canary weight of every region the plan has reached once step `index` is applied: a
        region keeps the weight of its last step when the plan moves on to the next region."""
        return self.rollout_at(index)[0]

    def rollout_at(self, index: int) -> tuple[dict[str, int], dict[str, Cohort]]:
        """The weights and the cohorts once step `index` is applied. A region keeps the weight of
        its last weight step and the cohort of its last cohort step: a cohort step leaves the
        region's weight as it was, and a weight step after it widens the shadow beyond the cohort
        without taking the cohort off it (its people stay where they were moved)."""
        weights: dict[str, int] = {}
        cohorts: dict[str, Cohort] = {}
        for step in self.steps[: index + 1]:
            if step.cohort is not None:
                cohorts[step.region] = step.cohort
            else:
                weights[step.region] = step.weight
        return weights, cohorts

    def is_last(self, index: int) -> bool:
        return index >= len(self.steps) - 1

    def describe(self) -> str:
        """``eu-west=5,25,100 then us-east=10,50,100 every 120s``: the plan as an operator wrote it
        (a cohort step is ``cohort``: ``eu-west=cohort,25,100``)."""
        groups: list[tuple[str, list[str]]] = []
        for step in self.steps:
            size = "cohort" if step.cohort is not None else str(step.weight)
            if groups and groups[-1][0] == step.region:
                groups[-1][1].append(size)
            else:
                groups.append((step.region, [size]))
        runs = " then ".join(f"{region}=" + ",".join(sizes) for region, sizes in groups)
        return f"{runs} every {self.interval:g}s"


class Counters(NamedTuple):
    """One sidecar's cumulative counts for a shadow, as its report says."""

    evaluations: int = 0
    unexpected: int = 0
    denied: int = 0  # allow_to_deny mismatches, expected or not
    unlisted: int = 0  # of those, denials of principals past the report's bound (not itemised)


@dataclass(frozen=True, slots=True)
class Window:
    """What the next analysis measures from: when it opened and every reporting sidecar's counters
    then (a sidecar not listed started after: all its counts are new)."""

    started: float
    baseline: Mapping[str, Counters] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Progress:
    state: PlanState = PlanState.RUNNING
    step: int = 0
    # Whether the current step's weight has been written (a step is applied, then analysed).
    applied: bool = False
    successes: int = 0
    inconclusive: int = 0
    window: Window | None = None
    message: str = ""
    # The latest analysis, as shown by `ctl status` (outcome, every gate, when).
    last: Mapping[str, Any] | None = None
    # The latest moves, newest last (bounded): what the plan did and why.
    history: tuple[Mapping[str, Any], ...] = ()


# Moves kept in a plan's history.
HISTORY = 20


class Move(StrEnum):
    APPLY = "apply"  # write the current step's weights (after the pre-step webhook)
    RECORD = "record"  # write the progress only (a window closed, a count went up)
    PROMOTE = "promote"  # the last step succeeded (after the confirm-promotion webhook)
    ROLLBACK = "rollback"  # an analysis failed: discard the shadow at once
    PAUSE = "pause"  # too many Inconclusive analyses


@dataclass(frozen=True, slots=True)
class Decision:
    move: Move
    progress: Progress  # what the progress is once the move is done
    message: str


def next_move(plan: RolloutPlan, progress: Progress, outcome: Outcome, now: float, reason: str) -> Decision:
    """What a completed analysis with `outcome` leads to. `reason` is the analysis's one-line
    explanation; `now` opens the next window (its baselines are the caller's to fill)."""
    at = f"step {progress.step + 1}/{len(plan.steps)}"
    if outcome is Outcome.FAILED:
        return Decision(Move.ROLLBACK, replace(progress, state=PlanState.ROLLED_BACK), f"{at} Failed: {reason}")
    if outcome is Outcome.INCONCLUSIVE:
        count = progress.inconclusive + 1
        if count > plan.inconclusive_limit:
            message = f"{at} paused after {count} Inconclusive analyses (limit {plan.inconclusive_limit}): {reason}"
            return Decision(Move.PAUSE, replace(progress, state=PlanState.PAUSED, inconclusive=count), message)
        message = f"{at} Inconclusive ({count} of at most {plan.inconclusive_limit}): {reason}"
        return Decision(Move.RECORD, replace(progress, inconclusive=count, successes=0), message)
    count = progress.successes + 1
    if count < plan.successes:
        message = f"{at} Successful ({count} of {plan.successes} in a row)"
        return Decision(Move.RECORD, replace(progress, successes=count), message)
    if plan.is_last(progress.step):
        message = f"{at} Successful ({count} of {plan.successes}): promote"
        return Decision(Move.PROMOTE, replace(progress, state=PlanState.PROMOTED, successes=count), message)
    following = plan.steps[progress.step + 1]
    message = f"{at} Successful ({count} of {plan.successes}): next, {following.describe()}"
    advanced = replace(progress, step=progress.step + 1, applied=False, successes=0, inconclusive=0, window=None)
    return Decision(Move.APPLY, advanced, message)


def with_history(progress: Progress, entry: Mapping[str, Any]) -> Progress:
    return replace(progress, history=(*progress.history, entry)[-HISTORY:])
