"""Rollout plans in etcd: ``plans/<version>`` holds a shadow's plan and its progress, in one value,
so that one compare on its mod revision covers both; and the reports a plan's analyses read.

Every write of a plan is audited and compares the revision it was decided on: an operator's pause
and a controller's step cannot both win, and a step is never taken twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from authz_sidecar.documents.rolloutplans import (
    parse_progress,
    parse_rollout_plan,
    progress_document,
    rollout_plan_document,
)
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.analysis import Report
from authz_sidecar.model.rolloutplan import Counters, Progress, RolloutPlan
from authz_sidecar.store.policy import Change, PolicyStore, StoreError, mod_is


@dataclass(frozen=True, slots=True)
class StoredPlan:
    version: str
    plan: RolloutPlan
    progress: Progress
    # The plan key's mod revision when read: what a write of it compares.
    revision: int
    # Stable for one plan of one version: the request ids of its promotion and rollback derive from it.
    plan_id: str

    def request_id(self, action: str) -> str:
        return f"plan-{self.version}-{self.plan_id}-{action}"


def plan_id(version: str, plan: RolloutPlan, salt: str = "") -> str:
    """Names one plan of one version, started once: the same plan started again after an abort
    is another plan (its promotion another request)."""
    document = json.dumps({"version": version, "salt": salt, **rollout_plan_document(plan)}, sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest()[:12]


def encode(version: str, plan: RolloutPlan, progress: Progress, ident: str) -> bytes:
    return json.dumps(
        {"version": version, "id": ident, "plan": rollout_plan_document(plan), "progress": progress_document(progress)},
        sort_keys=True,
    ).encode()


def decode(value: bytes, key: str, revision: int) -> StoredPlan:
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise DocumentError(f"not valid JSON: {exc}", document=key) from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        raise DocumentError("a plan is an object with version, plan and progress", document=key)
    plan = parse_rollout_plan(data.get("plan"), key)
    return StoredPlan(
        version=data["version"],
        plan=plan,
        progress=parse_progress(data.get("progress", {}), key),
        revision=revision,
        plan_id=str(data.get("id") or plan_id(data["version"], plan)),
    )


def report_of(document: Any) -> Report | None:
    """A sidecar's published report as the analysis reads it; None for one that does not parse
    (a sidecar of another release): it is not evidence, and the freshness gate counts it out."""
    if not isinstance(document, dict):
        return None
    try:
        mismatches = {str(k): int(v) for k, v in document.get("mismatches", {}).items()}
        return Report(
            sidecar=str(document["sidecar"]),
            region=str(document.get("region", "")),
            at=float(document.get("at", 0)),
            interval=float(document.get("interval", 2.0)),
            revision=int(document.get("revision", 0)),
            state=str(document.get("state", "")),
            counters=Counters(
                evaluations=int(document.get("evaluations", 0)),
                unexpected=sum(n for kind, n in mismatches.items() if kind.startswith("unexpected/")),
                denied=sum(n for kind, n in mismatches.items() if kind.endswith("/allow_to_deny")),
                unlisted=int(document.get("denied_unlisted", 0)),
            ),
            denied={str(p): float(t) for p, t in document.get("denied_principals", [])},
            exercised=frozenset(
                (str(p), str(h), None if s is None else str(s)) for p, h, s in document.get("exercised", [])
            ),
        )
    except (KeyError, TypeError, ValueError):
        return None


class PlanStore:
    def __init__(self, policy: PolicyStore) -> None:
        self.policy = policy
        self.etcd = policy.etcd
        self.layout = policy.layout

    async def get(self, version: str) -> StoredPlan | None:
        found = await self.etcd.get(self.layout.plan(version))
        return decode(found.value, found.key, found.mod_revision) if found else None

    async def require(self, version: str) -> StoredPlan:
        stored = await self.get(version)
        if stored is None:
            raise StoreError(f"{version!r} has no rollout plan (start one with 'ctl canary {version} --plan ...')")
        return stored

    async def all(self) -> tuple[dict[str, StoredPlan], dict[str, str]]:
        """Every plan, and the keys whose plan does not parse (with why): shown, never acted on."""
        _revision, kvs = await self.etcd.list_prefix(self.layout.plans)
        plans: dict[str, StoredPlan] = {}
        broken: dict[str, str] = {}
        for kv in kvs:
            try:
                stored = decode(kv.value, kv.key, kv.mod_revision)
                plans[stored.version] = stored
            except DocumentError as exc:
                broken[kv.key] = str(exc)
        return plans, broken

    async def reports(self, version: str) -> list[Report]:
        _revision, kvs = await self.etcd.list_prefix(self.layout.reports(version))
        reports = []
        for kv in kvs:
            try:
                report = report_of(json.loads(kv.value))
            except ValueError:
                report = None
            if report is not None:
                reports.append(report)
        return reports

    def put(self, stored: StoredPlan, progress: Progress) -> Any:
        """The op that writes `progress` for `stored`'s plan (in someone's transaction)."""
        return self.etcd.kv.txn_op_put(
            self.layout.plan(stored.version), encode(stored.version, stored.plan, progress, stored.plan_id)
        )

    def unchanged(self, stored: StoredPlan) -> Any:
        """The compare that holds while the plan is as `stored` read it."""
        return mod_is(self.layout.plan(stored.version), stored.revision)

    async def start(self, version: str, plan: RolloutPlan, change: Change) -> StoredPlan:
        """Store a plan for a live shadow, at its first step, not yet applied: the controller takes
        it from there. A running or paused plan is not replaced (abort it first); a finished one is."""
        key = self.layout.plan(version)
        existing = await self.etcd.get(key)
        if existing is not None:
            current = decode(existing.value, key, existing.mod_revision)
            if not current.progress.state.finished:
                raise StoreError(
                    f"{version!r} already has a {current.progress.state.value} plan "
                    f"({current.plan.describe()}); abort it first with 'ctl abort {version}'"
                )
        kv = self.etcd.kv
        ident = plan_id(version, plan, salt=f"{time.time():.6f}")
        stored = StoredPlan(version, plan, Progress(message="waiting for a controller"), 0, ident)
        compare = mod_is(key, existing.mod_revision) if existing else kv.txn_compare_create_revision(key, 0)
        await self.policy.record(change, [self.put(stored, stored.progress)], [compare])
        return stored
