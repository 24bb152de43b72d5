"""The ctl verbs of rollout plans: ``canary --plan``, ``pause``, ``resume``, ``abort``, ``analyze``,
and what ``status`` shows of them.

ctl writes a plan and the operator's decisions about it; the controller does the rest. Every write
is audited and compares the plan's revision, so an operator's pause and a controller's step never
both win: the loser reads again.
"""

from __future__ import annotations

import argparse
import getpass
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from authz_sidecar.control.webhooks import WebhookConfig
from authz_sidecar.documents.rolloutplans import (
    parse_duration,
    parse_gates,
    parse_rollout_plan,
    parse_steps,
    parse_waivers,
)
from authz_sidecar.errors import ConfigError, DocumentError
from authz_sidecar.model.rolloutplan import PlanState, Progress, RolloutPlan, with_history
from authz_sidecar.model.values import Cohort
from authz_sidecar.store.election import Election
from authz_sidecar.store.plans import PlanStore, StoredPlan
from authz_sidecar.store.policy import Change, PolicyStore, StoreError, mod_is


def who() -> str:
    """Who an audit record says ran the command: the login name, from the environment (USER,
    LOGNAME, ...) or, where a container or CI job sets none, the account ctl runs as."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # an uid with no account (a container's arbitrary uid)
        return "unknown"


def from_shadow_file(data: Any, path: str) -> RolloutPlan | None:
    """The ``plan:`` of a shadow file, checked (webhooks included), or None without one."""
    if not isinstance(data, dict) or data.get("plan") is None:
        return None
    plan = parse_rollout_plan(data["plan"], f"{path} plan")
    WebhookConfig.from_document(plan.webhooks, f"{path} plan.webhooks")
    return plan


def start_change(version: str, plan: RolloutPlan, request_id: str, author: str) -> Change:
    return Change(
        "plan_start",
        subject=version,
        fields={
            "who": author or who(),
            "reason": f"rollout plan {plan.describe()}",
            "version": version,
            "parent_request": request_id,
            "waived": dict(plan.waived),
        },
    )


def _plan_from_flags(ns: argparse.Namespace) -> RolloutPlan:
    """A plan from `ctl canary --plan ... --then ...` and its gate, waiver and webhook flags."""
    steps = parse_steps([ns.plan, *ns.then])
    gates = parse_gates(
        {
            name: value
            for name, value in (
                ("min_evaluations", ns.min_evaluations),
                ("max_unexpected", ns.max_unexpected),
                ("max_denied_requests", ns.max_denied_requests),
                ("max_denied_principals", ns.max_denied_principals),
                ("min_coverage", ns.min_coverage),
            )
            if value is not None
        },
        "ctl canary",
    )
    if ns.accept_unexercised and not ns.reason:
        raise ConfigError("--accept-unexercised HANDLE needs --reason TEXT (a waiver is audited with its reason)")
    webhooks = {
        name: value
        for name, value in (
            ("confirm_promotion", ns.confirm_promotion_url),
            ("pre_step", ns.pre_step_url),
            ("event", ns.event_url),
            ("timeout", ns.webhook_timeout),
            ("retries", ns.webhook_retries),
        )
        if value not in (None, "")
    }
    WebhookConfig.from_document(webhooks, "ctl canary")
    return RolloutPlan(
        steps=steps,
        interval=parse_duration(ns.interval, "ctl canary", "--interval"),
        successes=ns.successes,
        inconclusive_limit=ns.inconclusive_limit,
        gates=gates,
        waived=parse_waivers(dict.fromkeys(ns.accept_unexercised, ns.reason), "ctl canary"),
        webhooks=webhooks,
    )


async def refuse_if_planned(store: PolicyStore, version: str) -> None:
    """Weights set by hand would fight a running plan: pause or abort it first."""
    stored = await PlanStore(store).get(version)
    if stored is not None and not stored.progress.state.finished:
        raise StoreError(
            f"{version!r} has a {stored.progress.state.value} rollout plan ({stored.plan.describe()}); "
            f"abort it first ('ctl abort {version}') to set weights by hand"
        )


async def cmd_start(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """ctl canary VERSION --plan ...: store the plan; the controller runs it."""
    try:
        plan = _plan_from_flags(ns)
    except DocumentError as exc:
        raise ConfigError(str(exc)) from None
    pointers = await store.pointers()
    rollout = pointers.shadow(ns.version)
    if rollout.state == "stale":
        raise StoreError(f"{ns.version!r} is stale (another change was promoted over its parent); rebase it")
    stored = await PlanStore(store).start(ns.version, plan, start_change(ns.version, plan, ns.request_id, ""))
    return {"version": ns.version, "plan": plan.describe(), "plan_id": stored.plan_id, "state": "running"}


async def _operator_move(
    store: PolicyStore,
    version: str,
    action: str,
    reason: str,
    change_progress: Callable[[StoredPlan], Progress],
    *,
    plan: Callable[[StoredPlan], RolloutPlan] | None = None,
    ops: list[Any] | None = None,
) -> dict[str, Any]:
    """An operator's decision on a plan: audited, in one transaction with the plan's new progress,
    compared with the plan as read (a controller's move in between makes this one fail: run it again)."""
    plans = PlanStore(store)
    stored = await plans.require(version)
    progress = with_history(
        change_progress(stored), {"at": time.time(), "move": action, "message": reason, "who": who()}
    )
    if plan is not None:
        stored = replace(stored, plan=plan(stored))
    change = Change(action, subject=version, fields={"who": who(), "reason": reason, "version": version})
    compare = mod_is(store.layout.plan(version), stored.revision)
    entry = await store.record(change, [plans.put(stored, progress), *(ops or [])], [compare])
    return {"version": version, "state": progress.state.value, "message": progress.message, "audit_seq": entry["seq"]}


def _require_reason(ns: argparse.Namespace, verb: str) -> str:
    if not ns.reason:
        raise ConfigError(f"ctl {verb} needs --reason TEXT (it is audited)")
    return str(ns.reason)


async def cmd_pause(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    reason = _require_reason(ns, "pause")

    def paused(stored: StoredPlan) -> Progress:
        if stored.progress.state is not PlanState.RUNNING:
            raise StoreError(f"the plan of {ns.version!r} is {stored.progress.state.value}, not running")
        return replace(stored.progress, state=PlanState.PAUSED, message=f"paused by {who()}: {reason}")

    return await _operator_move(store, ns.version, "plan_pause", reason, paused)


async def cmd_resume(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Resume a paused plan (its Inconclusive count starts again), or add waivers to a running one."""
    reason = _require_reason(ns, "resume")
    waived = parse_waivers(dict.fromkeys(ns.accept_unexercised, reason), "ctl resume")

    def resumed(stored: StoredPlan) -> Progress:
        if stored.progress.state.finished:
            raise StoreError(f"the plan of {ns.version!r} is {stored.progress.state.value}; start a new one")
        message = f"resumed by {who()}: {reason}" + (f" (waived: {', '.join(sorted(waived))})" if waived else "")
        return replace(stored.progress, state=PlanState.RUNNING, inconclusive=0, message=message)

    def amended(stored: StoredPlan) -> RolloutPlan:
        return replace(stored.plan, waived={**stored.plan.waived, **waived})

    result = await _operator_move(store, ns.version, "plan_resume", reason, resumed, plan=amended)
    return {**result, "waived": sorted(waived)}


async def cmd_abort(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Stop a plan and take the shadow's weights and cohorts away (it stays live, observed only), in one
    transaction; ``ctl rollback`` discards it altogether."""
    reason = _require_reason(ns, "abort")
    plans = PlanStore(store)
    stored = await plans.require(ns.version)
    if stored.progress.state.finished:
        raise StoreError(f"the plan of {ns.version!r} is already {stored.progress.state.value}")
    progress = with_history(
        replace(stored.progress, state=PlanState.ABORTED, message=f"aborted by {who()}: {reason}"),
        {"at": time.time(), "move": "plan_abort", "message": reason, "who": who()},
    )
    pointers = await store.pointers()
    if ns.version in pointers.shadows:
        current = pointers.shadow(ns.version)
        zeroes = dict.fromkeys(current.weights, 0)
        fenced = store.fenced(_plan_fence(plans, stored, progress))
        change = Change(
            "plan_abort", subject=ns.version, fields={"who": who(), "reason": reason, "version": ns.version}
        )
        await fenced.canary(ns.version, zeroes, change, cohorts=dict.fromkeys(current.cohorts, Cohort()))
    else:
        await _operator_move(store, ns.version, "plan_abort", reason, lambda _s: progress)
    return {"version": ns.version, "state": "aborted", "message": progress.message}


def _plan_fence(plans: PlanStore, stored: StoredPlan, progress: Progress) -> Any:
    from authz_sidecar.store.policy import Fence

    async def holds() -> bool:
        found = await plans.etcd.get(plans.layout.plan(stored.version))
        return found is not None and found.mod_revision == stored.revision

    return Fence(compares=(plans.unchanged(stored),), ops=(plans.put(stored, progress),), holds=holds)


async def cmd_analyze(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """One analysis of the current window, now, whatever its interval: the gate table. Writes nothing."""
    from authz_sidecar.control.controller import Controller

    plans = PlanStore(store)
    stored = await plans.require(ns.version)
    pointers = await store.pointers()
    reports = await plans.reports(ns.version)
    controller = Controller(store.etcd, store.layout.prefix, ident="ctl-analyze")
    analysis, now = await controller.analysis(stored, pointers, reports, complete=True)
    step = stored.plan.steps[min(stored.progress.step, len(stored.plan.steps) - 1)]
    return {
        "version": ns.version,
        "state": stored.progress.state.value,
        "step": f"{stored.progress.step + 1}/{len(stored.plan.steps)} {step.describe()}",
        "sidecars": sorted(r.sidecar for r in reports if r.region == step.region),
        **analysis.document(now),
    }


def plan_status(stored: StoredPlan) -> dict[str, Any]:
    plan, progress = stored.plan, stored.progress
    step = plan.steps[min(progress.step, len(plan.steps) - 1)]
    last = progress.last or {}
    return {
        "plan": plan.describe(),
        "plan_id": stored.plan_id,
        "state": progress.state.value,
        "step": progress.step + 1,
        "steps": len(plan.steps),
        "at": f"{step.region} {step.amount}" + ("" if progress.applied else " (not applied yet)"),
        "successes": f"{progress.successes}/{plan.successes}",
        "inconclusive": f"{progress.inconclusive}/{plan.inconclusive_limit}",
        "message": progress.message,
        "last_analysis": {"outcome": last.get("outcome"), "reason": last.get("reason"), "at": last.get("at")}
        if last
        else None,
        "waived": sorted(plan.waived),
        "moves": [f"{m.get('move')}: {m.get('message') or m.get('region', '')}" for m in progress.history[-5:]],
    }


async def status(store: PolicyStore, problems: list[str]) -> dict[str, Any]:
    """What `ctl status` shows of the plans and of the controllers."""
    plans, broken = await PlanStore(store).all()
    problems.extend(f"plan {key}: {why}" for key, why in broken.items())
    leader = await Election(store.etcd, store.layout.leader, "ctl").leader()
    return {
        "plans": {version: plan_status(stored) for version, stored in sorted(plans.items())},
        "controller": {"leader": leader[0], "term": leader[1]} if leader else None,
    }


def add_plan_flags(canary: argparse.ArgumentParser) -> None:
    """`ctl canary VERSION --plan ...`: a rollout plan instead of fixed weights."""
    canary.add_argument("--plan", default="", metavar="REGION=W1,W2,...", help="the first region's steps")
    canary.add_argument("--then", action="append", default=[], metavar="REGION=W1,W2,...", help="the next region's")
    canary.add_argument("--interval", default="2m", help="time between analyses (90s, 2m, ...)")
    canary.add_argument("--successes", type=int, default=1, help="consecutive Successful analyses per step")
    canary.add_argument("--inconclusive-limit", type=int, default=5, help="Inconclusive analyses before pausing")
    for flag, kind, text in (
        ("--min-evaluations", int, "evaluations per interval in the step's region (default 100)"),
        ("--max-unexpected", int, "unexpected mismatches per interval (default 0)"),
        ("--max-denied-requests", int, "denials of what the active set allows per interval (default 100)"),
        ("--max-denied-principals", int, "principals newly denied per interval (default 20)"),
        ("--min-coverage", float, "share of the whole impact exercised before promoting (default 0)"),
    ):
        canary.add_argument(flag, type=kind, default=None, help=text)
    canary.add_argument(
        "--accept-unexercised", action="append", default=[], metavar="HANDLE", help="waive a handle (needs --reason)"
    )
    canary.add_argument("--reason", default="", help="why the waivers (audited)")
    canary.add_argument("--confirm-promotion-url", default="", help="non-2xx holds the promotion")
    canary.add_argument("--pre-step-url", default="", help="non-2xx holds a step")
    canary.add_argument("--event-url", default="", help="told of every outcome; never blocks")
    canary.add_argument("--webhook-timeout", type=float, default=None, help="seconds per webhook attempt")
    canary.add_argument("--webhook-retries", type=int, default=None, help="extra attempts per webhook call")


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """pause, resume, abort, analyze."""
    for name, text, handler in (
        ("pause", "pause a shadow's rollout plan (audited)", cmd_pause),
        ("resume", "resume a paused plan, or waive handles on a running one (audited)", cmd_resume),
        ("abort", "stop a plan and take the shadow's weights away; it stays observed (audited)", cmd_abort),
        ("analyze", "one analysis of a plan's current step, now: every gate's value and threshold", cmd_analyze),
    ):
        verb = command(name, text, handler)
        verb.add_argument("version")
        if name != "analyze":
            verb.add_argument("--reason", default="", help="why (audited)")
        if name == "resume":
            verb.add_argument(
                "--accept-unexercised", action="append", default=[], metavar="HANDLE", help="waive a handle"
            )
