"""Rollout plans and their progress: parsed from a shadow file, from ``ctl canary --plan`` flags, or
from the ``plans/<version>`` key in etcd; and written back.

A plan in a shadow file::

    plan:
      steps:
        - {region: eu-west, cohort: {principals: [alice], role_sets: [[viewer, editor]]}}
        - {region: eu-west, weight: 25}
        - {region: us-east, weight: 10}
      interval: 2m            # or seconds: 120
      successes: 2            # consecutive Successful analyses per step
      inconclusive_limit: 5
      gates: {min_evaluations: 100, max_unexpected: 0, max_denied_requests: 100,
              max_denied_principals: 20, min_coverage: 0.0}
      accept_unexercised: {things:delete: "only the nightly job deletes; checked by hand"}
      webhooks: {confirm_promotion: http://..., pre_step: http://..., event: http://...}

Progress is written by the controller only, and read back with the same care as any document in
etcd: a progress that does not parse is reported, never guessed at.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from authz_sidecar.documents.checks import REGION_RE, check_handle, mapping_of, only_fields, sequence_of
from authz_sidecar.documents.cohorts import check_region, cohort_document, parse_cohort
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.rolloutplan import Counters, Gates, PlanState, Progress, RolloutPlan, Step, Window

MAX_STEPS = 100
# An interval longer than a day is a typo for a shorter one; shorter than 100 ms is no analysis.
MIN_INTERVAL, MAX_INTERVAL = 0.1, 86_400.0
_PLAN_FIELDS = frozenset(
    {"steps", "interval", "successes", "inconclusive_limit", "gates", "accept_unexercised", "webhooks"}
)
_GATE_FIELDS = frozenset(f.name for f in fields(Gates))
_STEP_FIELDS = frozenset({"region", "weight", "cohort"})
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any, document: str, where: str) -> float:
    """Seconds, from a number of seconds or a string such as ``90s``, ``2m``, ``500ms``, ``1h``."""
    if isinstance(value, bool):
        raise DocumentError(f"{value!r} is not a duration", document=document, field=where, value=value)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise DocumentError(
                f"{value!r} is not a duration (seconds, or a number with ms, s, m or h)",
                document=document,
                field=where,
                value=value,
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise DocumentError(
            f"{value!r} is outside {MIN_INTERVAL:g}s..{MAX_INTERVAL / 3600:g}h",
            document=document,
            field=where,
            value=value,
        )
    return seconds


def _whole(value: Any, low: int, high: int, document: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DocumentError(
            f"{value!r} is not a whole number in {low}..{high}", document=document, field=where, value=value
        )
    return value


def _step(region: Any, weight: Any, document: str, where: str) -> Step:
    if not isinstance(region, str) or not REGION_RE.fullmatch(region):
        raise DocumentError(f"{region!r} is not a region name", document=document, field=where, value=region)
    return Step(region, _whole(weight, 1, 100, document, f"{where}.weight"))


def _document_step(entry: Any, document: str, where: str) -> Step:
    """``{region, weight}`` or ``{region, cohort: {principals, role_sets}}``: one or the other."""
    raw = mapping_of(entry, document, where)
    only_fields(raw, _STEP_FIELDS, document, where)
    if ("weight" in raw) == ("cohort" in raw):
        raise DocumentError(
            "a step gives its region a weight or a cohort (one of them)",
            document=document,
            field=where,
            value=dict(raw),
        )
    if "weight" in raw:
        return _step(raw.get("region"), raw["weight"], document, where)
    cohort = parse_cohort(raw["cohort"], document, f"{where}.cohort")
    if not cohort:
        raise DocumentError(
            "a cohort step names principals or role combinations", document=document, field=f"{where}.cohort"
        )
    return Step(check_region(raw.get("region"), document, f"{where}.region"), 0, cohort)


def parse_steps(groups: Sequence[str], document: str = "--plan") -> tuple[Step, ...]:
    """Steps from ``REGION=W1,W2,...`` groups, in order (``--plan eu-west=5,25,100 --then us-east=10,100``)."""
    steps: list[Step] = []
    for group in groups:
        region, sep, weights = group.partition("=")
        if not sep or not weights.strip():
            raise DocumentError(
                f"{group!r} is not REGION=WEIGHT[,WEIGHT...]", document=document, field="steps", value=group
            )
        for text in weights.split(","):
            weight: Any = int(text) if text.strip().isdigit() else text
            steps.append(_step(region.strip(), weight, document, f"steps[{len(steps)}]"))
    return _checked_steps(steps, document)


def _checked_steps(steps: Sequence[Step], document: str) -> tuple[Step, ...]:
    if not steps:
        raise DocumentError("a plan needs at least one step", document=document, field="steps")
    if len(steps) > MAX_STEPS:
        raise DocumentError(f"{len(steps)} steps; a plan has at most {MAX_STEPS}", document=document, field="steps")
    return tuple(steps)


def parse_gates(data: Any, document: str, base: Gates | None = None) -> Gates:
    raw = mapping_of(data or {}, document, "gates")
    only_fields(raw, _GATE_FIELDS, document, "gates")
    values = (base or Gates()).document()
    for name, value in raw.items():
        where = f"gates.{name}"
        if name == "cases":
            if not isinstance(value, bool):
                raise DocumentError(f"{value!r} is not true or false", document=document, field=where, value=value)
            values[name] = value
        elif name == "min_coverage":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise DocumentError(f"{value!r} is not a share in 0..1", document=document, field=where, value=value)
            values[name] = float(value)
        else:
            values[name] = _whole(value, 0, 10**9, document, where)
    return Gates(**values)


def parse_waivers(data: Any, document: str) -> dict[str, str]:
    """Handles waived from the coverage gate, each with its reason (a waiver without one is refused)."""
    waived: dict[str, str] = {}
    for handle, reason in mapping_of(data or {}, document, "accept_unexercised").items():
        checked = check_handle(handle, document, "accept_unexercised")
        if not isinstance(reason, str) or not reason.strip():
            raise DocumentError(
                f"waiving {checked} needs a reason", document=document, field=f"accept_unexercised.{checked}"
            )
        waived[checked] = reason.strip()
    return waived


def parse_rollout_plan(data: Any, document: str) -> RolloutPlan:
    raw = mapping_of(data, document, "plan")
    only_fields(raw, _PLAN_FIELDS, document, "plan")
    steps = [
        _document_step(entry, document, f"steps[{i}]")
        for i, entry in enumerate(sequence_of(raw.get("steps", []), document, "steps"))
    ]
    webhooks = mapping_of(raw.get("webhooks", {}) or {}, document, "webhooks")
    return RolloutPlan(
        steps=_checked_steps(steps, document),
        interval=parse_duration(raw.get("interval", 120), document, "interval"),
        successes=_whole(raw.get("successes", 1), 1, 100, document, "successes"),
        inconclusive_limit=_whole(raw.get("inconclusive_limit", 5), 0, 10_000, document, "inconclusive_limit"),
        gates=parse_gates(raw.get("gates"), document),
        waived=parse_waivers(raw.get("accept_unexercised"), document),
        webhooks=dict(webhooks),
    )


def rollout_plan_document(plan: RolloutPlan) -> dict[str, Any]:
    return {
        "steps": [
            {"region": s.region, "weight": s.weight}
            if s.cohort is None
            else {"region": s.region, "cohort": cohort_document(s.cohort)}
            for s in plan.steps
        ],
        "interval": plan.interval,
        "successes": plan.successes,
        "inconclusive_limit": plan.inconclusive_limit,
        "gates": plan.gates.document(),
        "accept_unexercised": dict(sorted(plan.waived.items())),
        "webhooks": dict(plan.webhooks),
    }


def progress_document(progress: Progress) -> dict[str, Any]:
    window = progress.window
    return {
        "state": progress.state.value,
        "step": progress.step,
        "applied": progress.applied,
        "successes": progress.successes,
        "inconclusive": progress.inconclusive,
        "window": None
        if window is None
        else {
            "started": window.started,
            "baseline": {s: list(c) for s, c in sorted(window.baseline.items())},
        },
        "message": progress.message,
        "last": progress.last,
        "history": list(progress.history),
    }


def parse_progress(data: Any, document: str) -> Progress:
    raw = mapping_of(data, document, "progress")
    try:
        window_raw = raw.get("window")
        window = None
        if window_raw is not None:
            window = Window(
                started=float(window_raw["started"]),
                baseline={str(s): Counters(*map(int, c)) for s, c in window_raw.get("baseline", {}).items()},
            )
        return Progress(
            state=PlanState(raw.get("state", "running")),
            step=int(raw.get("step", 0)),
            applied=bool(raw.get("applied", False)),
            successes=int(raw.get("successes", 0)),
            inconclusive=int(raw.get("inconclusive", 0)),
            window=window,
            message=str(raw.get("message", "")),
            last=raw.get("last"),
            history=tuple(raw.get("history", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DocumentError(
            f"the plan's progress does not parse ({exc})", document=document, field="progress"
        ) from None
