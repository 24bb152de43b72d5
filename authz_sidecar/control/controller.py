"""``authz-sidecar controller``: runs every shadow's rollout plan, region by region, on evidence.

Several controllers may run; one leads (:mod:`authz_sidecar.store.election`). The leader, every
``tick`` seconds, reads each running plan and the shadow reports, and asks the pure rules what to do
(:func:`authz_sidecar.model.analysis.analyse`, :func:`authz_sidecar.model.rolloutplan.next_move`):
apply the step's weight, record an analysis, promote, roll back, pause. It keeps nothing that
matters in memory: a plan's progress is written in the same transaction as the move it records,
and every such transaction compares the leader's term and the plan's revision it decided on
(:class:`authz_sidecar.store.policy.Fence`). So a controller killed mid-plan is replaced by another
that goes on from the last move written, no step is taken twice, and a deposed leader's write is
refused.

Failing gates are judged on every tick, so a change that hurts is rolled back within seconds; the
other gates wait for the interval's evidence. A rollback that still fails after its retries goes to
the dead-letter queue, and the plan says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from authz_sidecar.caches import remember
from authz_sidecar.control import deadletters
from authz_sidecar.control.webhooks import WebhookConfig, Webhooks
from authz_sidecar.documents.cohorts import cohort_document
from authz_sidecar.errors import BindError, DocumentError
from authz_sidecar.model.analysis import Analysis, Impact, Report, analyse, opening
from authz_sidecar.model.cases import CaseResult, run_suites
from authz_sidecar.model.engine import CompiledSet, compile_set, impact
from authz_sidecar.model.rolloutplan import (
    Move,
    PlanState,
    Progress,
    next_move,
    with_history,
)
from authz_sidecar.model.values import PermissionSet
from authz_sidecar.store.cases import CaseStore
from authz_sidecar.store.election import Election, Leadership, LostLeadershipError
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.plans import PlanStore, StoredPlan
from authz_sidecar.store.policy import Change, ConflictError, Fence, FencedError, Pointers, PolicyStore, StoreError

log = structlog.get_logger("authz_sidecar.control.controller")
# What ends one pass (or one plan's turn in it) but never the controller: etcd away, a conflict, a
# document that does not parse. The next pass reads everything again.
# Sets and impacts kept compiled between passes (a few plans at once, each an active set and a shadow).
SETS_KEPT = 16
_SURVIVABLE: tuple[type[BaseException], ...] = (*deadletters.TRANSIENT, DocumentError, StoreError)


def controller_id() -> str:
    return f"controller@{socket.gethostname()}:{os.getpid()}"


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.leader = Gauge("authz_controller_leader", "1 while this controller leads", registry=self.registry)
        self.analyses = Counter(
            "authz_controller_analyses", "analyses completed, by outcome", ["outcome"], registry=self.registry
        )
        self.moves = Counter(
            "authz_controller_moves", "moves made (apply, promote, rollback, pause)", ["move"], registry=self.registry
        )
        self.errors = Counter(
            "authz_controller_errors", "ticks that could not finish (etcd away, a conflict)", registry=self.registry
        )
        self.plans = Gauge("authz_controller_plans_running", "plans running", registry=self.registry)


class Controller:
    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        *,
        ident: str = "",
        tick: float = 1.0,
        lease_ttl: int = 5,
        retries: int = 5,
        dlq_file: Path | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.etcd = etcd
        self.policy = PolicyStore(etcd, prefix)
        self.plans = PlanStore(self.policy)
        self.ident = ident or controller_id()
        self.tick = tick
        self.retries = retries
        self.dlq_file = dlq_file or deadletters.default_file()
        self.election = Election(etcd, self.policy.layout.leader, self.ident, lease_ttl)
        self.metrics = metrics or ControllerMetrics()
        self.leadership: Leadership | None = None
        # Sets compiled once, and whole impacts of (active, shadow) pairs, for the coverage and
        # cases gates.
        self._sets: dict[str, tuple[PermissionSet, CompiledSet]] = {}
        self._impacts: dict[tuple[str, str], Impact] = {}
        self._hooks: dict[str, Webhooks] = {}

    # --- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Lead when elected, run the plans while leading, and stand by again when the term ends."""
        while not stop.is_set():
            held = await _until(self.election.campaign(), stop)
            if held is None:
                return
            self.leadership = held
            self.metrics.leader.set(1)
            keeper = asyncio.create_task(self.election.keep(held))
            try:
                while not stop.is_set() and not keeper.done():
                    await self.run_once()
                    await _until(asyncio.wait({keeper}, timeout=self.tick), stop)
                if keeper.done() and not keeper.cancelled() and keeper.exception() is not None:
                    log.warning("leadership_lost", controller=self.ident, error=str(keeper.exception()))
            except LostLeadershipError as exc:
                log.warning("leadership_lost", controller=self.ident, error=str(exc))
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError, LostLeadershipError):
                    await keeper
                self.leadership = None
                self.metrics.leader.set(0)
                if stop.is_set():
                    await self.election.resign(held)
        await self.drain()

    async def drain(self) -> None:
        for hooks in self._hooks.values():
            await hooks.drain(5.0)

    async def run_once(self) -> None:
        """One pass over every running plan. etcd being away, or a conflict, only ends this pass."""
        try:
            plans, broken = await self.plans.all()
            pointers = await self.policy.pointers()
        except _SURVIVABLE as exc:
            self.metrics.errors.inc()
            log.warning("controller_pass_failed", error=str(exc) or type(exc).__name__)
            return
        for key, why in broken.items():
            log.warning("plan_unreadable", key=key, error=why)
        running = [p for p in plans.values() if p.progress.state is PlanState.RUNNING]
        self.metrics.plans.set(len(running))
        # Side by side: one plan waiting on a slow webhook must not delay another's rollback.
        await asyncio.gather(*(self._advance_one(stored, pointers) for stored in running))

    async def _advance_one(self, stored: StoredPlan, pointers: Pointers) -> None:
        try:
            await self.advance(stored, pointers)
        except FencedError as exc:
            await self._check_term(exc)
        except _SURVIVABLE as exc:
            self.metrics.errors.inc()
            log.warning("plan_tick_failed", version=stored.version, error=str(exc) or type(exc).__name__)

    async def _check_term(self, exc: FencedError) -> None:
        """A fenced write was refused: if the term is over, stop acting now."""
        held = self.leadership
        leader = await self.election.leader()
        if held is None or leader is None or leader[1] != held.term:
            raise LostLeadershipError(str(exc))
        log.info("plan_moved_meanwhile", error=str(exc))

    # --- one plan ------------------------------------------------------------------------------

    async def advance(self, stored: StoredPlan, pointers: Pointers) -> None:
        """Move one running plan on by at most one step."""
        version, progress = stored.version, stored.progress
        rollout = pointers.shadows.get(version)
        if rollout is None:
            reason = "the shadow is no longer live (promoted or rolled back by hand)"
            await self._settle(stored, PlanState.ENDED, "plan_end", reason)
            return
        if rollout.state == "stale":
            await self._settle(
                stored,
                PlanState.PAUSED,
                "plan_pause",
                f"stale: another change was promoted over its parent; rebase {version}",
            )
            return
        if not progress.applied:
            await self.apply(stored)
            return
        reports = await self.plans.reports(version)
        analysis, now = await self.analysis(stored, pointers, reports)
        if analysis.outcome is None:
            return
        self.metrics.analyses.labels(analysis.outcome.value).inc()
        decision = next_move(stored.plan, progress, analysis.outcome, now, analysis.reason)
        after = replace(decision.progress, last=analysis.document(now), message=decision.message)
        if decision.move is not Move.APPLY:  # the next analysis measures from here
            after = replace(after, window=opening(reports, now))
        log.info(
            "analysis",
            version=version,
            step=progress.step + 1,
            outcome=analysis.outcome.value,
            move=decision.move.value,
            reason=analysis.reason,
        )
        self._event(stored, "analysis", after, analysis)
        if decision.move is Move.RECORD:
            await self._write(stored, after)
        elif decision.move is Move.PAUSE:
            await self._audited(stored, after, "plan_pause", decision.message)
        elif decision.move is Move.ROLLBACK:
            await self.rollback(stored, after, analysis)
        elif decision.move is Move.PROMOTE:
            await self.promote(stored, after, analysis)
        else:
            await self._write(stored, after)
            moved = await self.plans.get(version)
            if moved is not None and moved.progress.state is PlanState.RUNNING:
                await self.apply(moved)

    async def analysis(
        self, stored: StoredPlan, pointers: Pointers, reports: list[Report], *, complete: bool = False
    ) -> tuple[Analysis, float]:
        """The analysis of the current window: complete once the interval has passed (or when
        asked to be, by `ctl analyze`)."""
        plan, progress = stored.plan, stored.progress
        now = time.time()
        window = progress.window or opening(reports, now)
        complete = complete or now - window.started >= plan.interval
        whole = None
        if complete and plan.is_last(progress.step) and pointers.active is not None:
            whole = await self._impact(pointers.active, stored.version)
        analysis = analyse(
            plan,
            progress.step,
            window,
            reports,
            now=now,
            live_revision=max(pointers.active_revision, pointers.shadows_revision),
            impact=whole,
            complete=complete,
            cases=await self._cases(stored.version) if complete and plan.gates.cases else None,
        )
        return analysis, now

    async def apply(self, stored: StoredPlan) -> None:
        """Write the current step's weight (after the pre-step webhook allows it), its progress and
        the window its analyses measure from, in one fenced transaction."""
        plan, progress = stored.plan, stored.progress
        step = plan.steps[progress.step]
        payload = self._payload(stored, "pre_step", progress, None)
        verdict = await self._webhooks(stored).pre_step(payload)
        if not verdict.allowed:
            message = f"step {progress.step + 1}/{len(plan.steps)} held by the pre-step webhook: {verdict.detail}"
            if progress.message != message:
                await self._write(stored, replace(progress, message=message))
            return
        now = time.time()
        reports = await self.plans.reports(stored.version)
        message = f"step {progress.step + 1}/{len(plan.steps)}: {step.describe()}"
        after = with_history(
            replace(progress, applied=True, successes=0, inconclusive=0, window=opening(reports, now), message=message),
            {"at": now, "move": "apply", "step": progress.step + 1, "region": step.region, "weight": step.weight},
        )
        change = Change(
            "canary",
            subject=f"{stored.version}:step{progress.step + 1}",
            fields={"who": self.ident, "reason": message, "version": stored.version, "plan": stored.plan_id},
        )
        weights, cohorts = plan.rollout_at(progress.step)
        await self._fenced(stored, after).canary(stored.version, weights, change, cohorts=cohorts)
        self.metrics.moves.labels("apply").inc()
        log.info("step_applied", version=stored.version, step=progress.step + 1, region=step.region, weight=step.weight)
        self._event(stored, "step", after, None)

    async def promote(self, stored: StoredPlan, after: Progress, analysis: Analysis) -> None:
        """The last step succeeded: promote once the confirm-promotion webhook agrees."""
        verdict = await self._webhooks(stored).confirm_promotion(
            self._payload(stored, "confirm_promotion", after, analysis)
        )
        if not verdict.allowed:
            held = replace(
                after,
                state=PlanState.RUNNING,
                message=f"promotion held by the confirm-promotion webhook: {verdict.detail}",
            )
            await self._write(stored, held)
            return
        shadow = await self.policy.permission_set(stored.version)
        pointers = await self.policy.pointers()
        parent = shadow.meta.parent or (pointers.active or "")
        change = self._decided("promote", stored, after, analysis)
        after = with_history(after, {"at": time.time(), "move": "promote", "message": after.message})
        try:
            await self._fenced(stored, after).promote(stored.version, parent, change)
        except (FencedError, ConflictError):
            raise
        except StoreError as exc:  # stale: someone promoted another change over its parent
            await self._audited(
                stored, replace(after, state=PlanState.PAUSED, message=str(exc)), "plan_pause", str(exc)
            )
            return
        self.metrics.moves.labels("promote").inc()
        log.info("promoted", version=stored.version, plan=stored.plan_id)
        await self.policy.prune(10)
        self._event(stored, "promoted", after, analysis)

    async def rollback(self, stored: StoredPlan, after: Progress, analysis: Analysis) -> None:
        """An analysis failed: discard the shadow at once, retried with backoff; still failing, the
        rollback goes to the dead-letter queue and the plan says so."""
        change = self._decided("rollback", stored, after, analysis)
        after = with_history(after, {"at": time.time(), "move": "rollback", "message": after.message})
        fenced = self._fenced(stored, after)
        try:
            await deadletters.with_retries(lambda: fenced.discard(stored.version, change), attempts=self.retries)
        except FencedError:
            raise
        except deadletters.TRANSIENT as exc:
            await self._dead_letter(stored, after, change, str(exc) or type(exc).__name__)
            return
        self.metrics.moves.labels("rollback").inc()
        log.warning("rolled_back", version=stored.version, plan=stored.plan_id, reason=after.message)
        self._event(stored, "rolled_back", after, analysis)

    def _decided(self, action: str, stored: StoredPlan, after: Progress, analysis: Analysis) -> Change:
        """The lifecycle's own change, under a request id derived from the plan (so that whichever
        controller makes it, it is made once), audited with the analysis that decided it."""
        return Change(
            action,
            stored.request_id(action),
            subject=stored.version,
            fields={
                "who": self.ident,
                "reason": after.message,
                "version": stored.version,
                "plan": stored.plan_id,
                "analysis": analysis.document(time.time()),
            },
        )

    async def _dead_letter(self, stored: StoredPlan, after: Progress, change: Change, error: str) -> None:
        letter = deadletters.letter(change, stored.version, error, self.retries)
        try:
            await asyncio.wait_for(self.policy.add_dead_letter(change.request_id, letter), timeout=5)
            where = "etcd"
        except deadletters.TRANSIENT:
            deadletters.LocalQueue(self.dlq_file).add(change.request_id, letter)
            where = f"local file {self.dlq_file}"
        message = (
            f"{after.message}; the rollback failed after {self.retries} attempt(s) ({error.splitlines()[0]}) and is "
            f"in the dead-letter queue ({where}) as request {change.request_id}: 'ctl dlq retry {change.request_id}'"
        )
        log.error(
            "rollback_dead_lettered", version=stored.version, request_id=change.request_id, where=where, error=error
        )
        self.metrics.moves.labels("dead_letter").inc()
        dead = replace(after, state=PlanState.DEAD_LETTER, message=message)
        self._event(stored, "dead_letter", dead, None)
        await self._write(stored, dead)

    # --- writes --------------------------------------------------------------------------------

    def _fence(self, stored: StoredPlan, progress: Progress) -> Fence:
        held = self.leadership
        if held is None:
            raise FencedError("this controller does not lead")

        async def holds() -> bool:
            leader = await self.election.leader()
            found = await self.etcd.get(self.policy.layout.plan(stored.version))
            return (
                leader is not None
                and leader[1] == held.term
                and found is not None
                and found.mod_revision == stored.revision
            )

        return Fence(
            compares=(held.compare(), self.plans.unchanged(stored)),
            ops=(self.plans.put(stored, progress),),
            holds=holds,
        )

    def _fenced(self, stored: StoredPlan, progress: Progress) -> PolicyStore:
        return self.policy.fenced(self._fence(stored, progress))

    async def _write(self, stored: StoredPlan, progress: Progress) -> None:
        """Record `progress` alone (no pointer moves), fenced."""
        fence = self._fence(stored, progress)
        response = await self.etcd.call(self.etcd.kv.txn, list(fence.compares), list(fence.ops))
        if not response.succeeded:
            raise FencedError(f"the plan of {stored.version!r} moved, or this controller's term ended")

    async def _audited(self, stored: StoredPlan, progress: Progress, action: str, reason: str) -> None:
        change = Change(
            action, subject=stored.version, fields={"who": self.ident, "reason": reason, "version": stored.version}
        )
        progress = with_history(progress, {"at": time.time(), "move": action, "message": reason})
        await self._fenced(stored, progress).record(change)
        self.metrics.moves.labels(action).inc()
        log.warning(action, version=stored.version, reason=reason)
        self._event(stored, action, progress, None)

    async def _settle(self, stored: StoredPlan, state: PlanState, action: str, reason: str) -> None:
        await self._audited(stored, replace(stored.progress, state=state, message=reason), action, reason)

    # --- evidence and hooks --------------------------------------------------------------------

    async def _compiled(self, version: str) -> tuple[PermissionSet, CompiledSet]:
        """A stored set, parsed and compiled once (off the loop) for as long as plans ask for it."""
        found = self._sets.get(version)
        if found is None:
            permissions = await self.policy.permission_set(version)
            found = (permissions, await asyncio.to_thread(compile_set, permissions))
            remember(self._sets, version, found, SETS_KEPT)
        return found

    async def _impact(self, active: str, version: str) -> Impact:
        key = (active, version)
        found = self._impacts.get(key)
        if found is None:
            (_a, compiled_active), (_s, compiled_shadow) = await self._compiled(active), await self._compiled(version)
            whole = await asyncio.to_thread(impact, compiled_active, compiled_shadow)
            found = remember(self._impacts, key, Impact(frozenset(whole)), SETS_KEPT)
        return found

    async def _cases(self, version: str) -> list[CaseResult] | None:
        """The registered policy test cases run on the shadow (None when none are registered)."""
        suites, broken = await CaseStore(self.policy).all()
        for key, why in broken.items():
            log.warning("cases_unreadable", key=key, error=why)
        if not suites:
            return None
        permissions, compiled = await self._compiled(version)
        return run_suites(suites, permissions, compiled, await self.policy.catalogs())

    def _webhooks(self, stored: StoredPlan) -> Webhooks:
        hooks = self._hooks.get(stored.plan_id)
        if hooks is None:
            hooks = self._hooks[stored.plan_id] = Webhooks(
                WebhookConfig.from_document(stored.plan.webhooks, stored.version)
            )
        return hooks

    def _payload(self, stored: StoredPlan, kind: str, progress: Progress, analysis: Analysis | None) -> dict[str, Any]:
        step = stored.plan.steps[min(progress.step, len(stored.plan.steps) - 1)]
        return {
            "type": kind,
            "version": stored.version,
            "plan_id": stored.plan_id,
            "plan": stored.plan.describe(),
            "state": progress.state.value,
            "step": {
                "index": progress.step + 1,
                "of": len(stored.plan.steps),
                "region": step.region,
                "weight": step.weight,
                "cohort": cohort_document(step.cohort) if step.cohort is not None else None,
            },
            "outcome": analysis.outcome.value if analysis and analysis.outcome else None,
            "gates": [g.document() for g in analysis.gates] if analysis else [],
            "message": progress.message,
            "controller": self.ident,
            "at": time.time(),
        }

    def _event(self, stored: StoredPlan, kind: str, progress: Progress, analysis: Analysis | None) -> None:
        self._webhooks(stored).event(self._payload(stored, kind, progress, analysis))


async def _until(awaitable: Any, stop: asyncio.Event) -> Any:
    """`awaitable`'s result, or None as soon as `stop` is set."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _pending = await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        return None
    finally:
        for pending in (task, stopping):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending


async def serve_controller(
    options: EtcdOptions,
    prefix: str,
    *,
    ident: str,
    tick: float,
    lease_ttl: int,
    retries: int,
    dlq_file: Path,
    metrics_address: tuple[str, int] | None,
) -> None:
    """The controller process: run until SIGTERM or SIGINT, then resign (another takes over at
    once) and let pending event webhooks finish."""
    metrics = ControllerMetrics()
    if metrics_address is not None:
        from prometheus_client import start_http_server

        host, port = metrics_address
        try:
            start_http_server(port, host, registry=metrics.registry)
        except OSError as exc:
            raise BindError.of("--metrics", f"{host}:{port}", exc, "controller") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Etcd(options) as etcd:
        controller = Controller(
            etcd,
            prefix,
            ident=ident,
            tick=tick,
            lease_ttl=lease_ttl,
            retries=retries,
            dlq_file=dlq_file,
            metrics=metrics,
        )
        log.info("controller_started", controller=controller.ident, etcd=etcd.endpoints, prefix=prefix, tick=tick)
        await controller.run(stop)
        log.info("controller_stopped", controller=controller.ident)


__all__ = ["Controller", "ControllerMetrics", "controller_id", "serve_controller"]
