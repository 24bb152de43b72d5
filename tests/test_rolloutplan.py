"""Rollout plans, their analyses and the rule that moves them on: the pure parts, alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from authz_sidecar.documents.rolloutplans import (
    parse_duration,
    parse_progress,
    parse_rollout_plan,
    parse_steps,
    progress_document,
)
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.analysis import Impact, Report, analyse, opening
from authz_sidecar.model.rolloutplan import (
    Counters,
    Gates,
    Move,
    Outcome,
    PlanState,
    Progress,
    RolloutPlan,
    Step,
    Window,
    next_move,
)

PLAN = RolloutPlan(
    steps=(Step("eu-west", 5), Step("eu-west", 100), Step("us-east", 50)),
    interval=10,
    successes=2,
    inconclusive_limit=1,
    gates=Gates(min_evaluations=10, max_denied_requests=5, max_denied_principals=2),
)


def report(sidecar: str = "a", region: str = "eu-west", *, at: float = 100.0, **counts: int) -> Report:
    return Report(
        sidecar=sidecar,
        region=region,
        at=at,
        interval=1.0,
        revision=int(counts.pop("revision", 50)),
        state="canary",
        counters=Counters(counts.get("evaluations", 0), counts.get("unexpected", 0), counts.get("denied", 0)),
        denied={f"p{i}": float(counts.get("denied_at", 100)) for i in range(counts.get("denied_principals", 0))},
        exercised=frozenset(),
    )


def judged(
    step: int, reports: list[Report], window: Window | None = None, **kw: object
) -> tuple[Outcome | None, dict[str, bool]]:
    analysis = analyse(
        PLAN,
        step,
        window or Window(started=0.0),
        reports,
        now=100.0,
        live_revision=50,
        impact=kw.get("impact"),  # type: ignore[arg-type]
        complete=bool(kw.get("complete", True)),
    )
    return analysis.outcome, {g.name: g.passed for g in analysis.gates}


def test_steps_parse_from_the_flags_and_keep_their_order() -> None:
    assert parse_steps(["eu-west=5,25,100", "us-east=10,100"]) == (
        Step("eu-west", 5),
        Step("eu-west", 25),
        Step("eu-west", 100),
        Step("us-east", 10),
        Step("us-east", 100),
    )
    assert PLAN.weights_at(2) == {"eu-west": 100, "us-east": 50}
    assert PLAN.describe() == "eu-west=5,100 then us-east=50 every 10s"


@pytest.mark.parametrize(
    "group", ["eu-west=0", "eu-west=101", "EU=5", "eu-west=", "eu-west", "eu-west=5,x", "eu-west=-5"]
)
def test_a_bad_step_is_refused_with_a_reason(group: str) -> None:
    with pytest.raises(DocumentError):
        parse_steps([group])


def test_durations() -> None:
    assert parse_duration("2m", "d", "interval") == 120
    assert parse_duration("500ms", "d", "interval") == 0.5
    assert parse_duration(90, "d", "interval") == 90
    for bad in ("0s", "2d", "-1s", True, "fast", 10**9):
        with pytest.raises(DocumentError):
            parse_duration(bad, "d", "interval")


def test_a_plan_document_is_checked_field_by_field() -> None:
    good = {"steps": [{"region": "eu-west", "weight": 10}], "interval": "30s", "gates": {"max_unexpected": 2}}
    plan = parse_rollout_plan(good, "shadow.yaml")
    assert plan.interval == 30 and plan.gates.max_unexpected == 2 and plan.gates.min_evaluations == 100
    for bad in (
        {**good, "gates": {"max_unexpcted": 2}},  # a typo is not silently ignored
        {**good, "accept_unexercised": {"things:view": ""}},  # a waiver needs its reason
        {**good, "steps": []},
        {**good, "gates": {"min_coverage": 1.5}},
        {**good, "extra": 1},
    ):
        with pytest.raises(DocumentError):
            parse_rollout_plan(bad, "shadow.yaml")


def test_progress_round_trips_through_its_document() -> None:
    progress = Progress(
        state=PlanState.PAUSED,
        step=2,
        applied=True,
        successes=1,
        window=Window(started=5.0, baseline={"a": Counters(3, 0, 1, 0)}),
        message="why",
        history=({"move": "apply"},),
    )
    assert parse_progress(progress_document(progress), "k") == progress
    with pytest.raises(DocumentError):
        parse_progress({"state": "exploded"}, "k")


def test_successes_advance_then_promote_and_inconclusive_breaks_the_run() -> None:
    start = Progress(applied=True)
    once = next_move(PLAN, start, Outcome.SUCCESSFUL, 0, "")
    assert once.move is Move.RECORD and once.progress.successes == 1
    twice = next_move(PLAN, once.progress, Outcome.SUCCESSFUL, 0, "")
    assert twice.move is Move.APPLY and twice.progress.step == 1 and not twice.progress.applied
    broken = next_move(PLAN, once.progress, Outcome.INCONCLUSIVE, 0, "few")
    assert broken.move is Move.RECORD and broken.progress.successes == 0 and broken.progress.inconclusive == 1
    paused = next_move(PLAN, broken.progress, Outcome.INCONCLUSIVE, 0, "few")
    assert paused.move is Move.PAUSE and paused.progress.state is PlanState.PAUSED and "few" in paused.message
    last = Progress(step=2, applied=True, successes=1)
    assert next_move(PLAN, last, Outcome.SUCCESSFUL, 0, "").move is Move.PROMOTE
    failed = next_move(PLAN, last, Outcome.FAILED, 0, "unexpected_mismatches 3")
    assert failed.move is Move.ROLLBACK and failed.progress.state is PlanState.ROLLED_BACK


def test_failing_gates_fail_at_once_and_holding_gates_wait_for_the_interval() -> None:
    window = opening([report(evaluations=100, unexpected=0)], 0.0)
    # Part way through a window: nothing failing is no outcome at all, even with few evaluations.
    assert judged(0, [report(evaluations=101)], window, complete=False)[0] is None
    # One unexpected mismatch since the window opened fails it, complete or not.
    outcome, gates = judged(0, [report(evaluations=101, unexpected=1)], window, complete=False)
    assert outcome is Outcome.FAILED and gates["unexpected_mismatches"] is False
    # Too few evaluations: Inconclusive, not Failed.
    outcome, gates = judged(0, [report(evaluations=105)], window)
    assert outcome is Outcome.INCONCLUSIVE and gates["evaluations"] is False
    assert judged(0, [report(evaluations=120)], window)[0] is Outcome.SUCCESSFUL


def test_only_the_steps_region_counts_and_other_regions_never_fail_it() -> None:
    elsewhere = report("b", "us-east", evaluations=500, unexpected=9)
    assert judged(0, [report(evaluations=50), elsewhere])[0] is Outcome.SUCCESSFUL


def test_the_denial_budget_counts_requests_and_the_principals_denied_within_the_interval() -> None:
    window = opening([report(denied=0, denied_principals=1)], 50.0)
    outcome, gates = judged(0, [report(evaluations=50, denied=6, denied_principals=1)], window)
    assert outcome is Outcome.FAILED and gates["denied_requests"] is False
    outcome, gates = judged(0, [report(evaluations=50, denied=3, denied_principals=4)], window)
    assert outcome is Outcome.FAILED and gates == {**gates, "denied_requests": True, "denied_principals": False}
    # Principals denied before the window opened (the dark launch saw them) are not this interval's.
    stale = report(evaluations=50, denied=3, denied_principals=4, denied_at=10)
    assert judged(0, [stale], window)[0] is Outcome.SUCCESSFUL


def test_a_report_behind_the_pointers_or_old_is_not_evidence() -> None:
    outcome, gates = judged(0, [report(evaluations=50, revision=49)])
    assert outcome is Outcome.INCONCLUSIVE and gates["sidecars_fresh"] is False
    outcome, gates = judged(0, [report(evaluations=50, at=50.0)])
    assert outcome is Outcome.INCONCLUSIVE and gates["sidecars_fresh"] is False
    outcome, gates = judged(0, [])
    assert outcome is Outcome.INCONCLUSIVE and gates["sidecars_reporting"] is False


def test_a_restarted_sidecar_counts_from_zero_not_negative() -> None:
    window = opening([report(evaluations=1000, unexpected=5)], 0.0)
    outcome, _gates = judged(0, [report(evaluations=20, unexpected=1)], window)
    assert outcome is Outcome.FAILED


def test_coverage_holds_the_last_step_until_every_changed_handle_is_seen_or_waived() -> None:
    whole = Impact(frozenset({("bob", "things:edit", None), ("qa", "things:delete", None)}))
    seen = replace(report("a", evaluations=50), exercised=frozenset({("bob", "things:edit", None)}))
    # Not the last step: coverage is not judged yet.
    assert judged(1, [seen], impact=whole)[0] is Outcome.SUCCESSFUL
    last = PLAN.steps.index(Step("us-east", 50))
    here = replace(seen, region="us-east")
    outcome, gates = judged(last, [here], impact=whole)
    assert outcome is Outcome.INCONCLUSIVE and gates["unexercised_handles"] is False
    waived = replace(PLAN, waived={"things:delete": "only a nightly job deletes"})
    analysis = analyse(waived, last, Window(0.0), [here], now=100, live_revision=50, impact=whole, complete=True)
    assert analysis.outcome is Outcome.SUCCESSFUL, analysis.reason


def test_a_report_that_does_not_parse_is_not_evidence() -> None:
    from authz_sidecar.store.plans import report_of

    bad: object
    for bad in (
        None,
        [],
        {"evaluations": 3},
        {"sidecar": "a", "evaluations": "many"},
        {"sidecar": "a", "exercised": [1]},
    ):
        assert report_of(bad) is None
    good = report_of({"sidecar": "a", "region": "eu-west", "mismatches": {"unexpected/allow_to_deny": 2}})
    assert good is not None and good.counters == Counters(0, 2, 2, 0)
