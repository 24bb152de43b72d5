"""``authz-sidecar ctl``: the control plane's commands over etcd.

Each command reads what it needs, checks it the way a sidecar would (a set that a sidecar would
refuse is refused here first), and writes with a compare, so concurrent operators never overwrite
each other. Output is a short human summary, or JSON with ``--json``; errors are one line on stderr.
The connection flags (``--etcd``, ``--prefix``, TLS, authentication) and ``--json`` go before or
after the verb, as with etcdctl and kubectl.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from etcd3aio.errors import EtcdError

from authz_sidecar.control import cohorts, deadletters, rollouts
from authz_sidecar.control.explaining import add_explain_command
from authz_sidecar.control.replay import add_replay_command
from authz_sidecar.control.rolecombos import add_roles_commands
from authz_sidecar.control.testing import add_test_commands
from authz_sidecar.documents import (
    check_handle,
    dump_permission_set,
    load_document,
    parse_catalog,
    parse_permission_set,
    parse_rollout,
    parse_shadow,
)
from authz_sidecar.errors import AuthzError, ConfigError, DocumentError
from authz_sidecar.model.analysis import Impact
from authz_sidecar.model.assembly import check_handles
from authz_sidecar.model.engine import compile_set, declared, impact
from authz_sidecar.model.plan import Plan, plan
from authz_sidecar.model.snapshot import paused_gc
from authz_sidecar.model.values import Permission, PermissionSet, Rollout, ShadowSet
from authz_sidecar.store import audit, layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.plans import PlanStore
from authz_sidecar.store.policy import Change, PolicyStore, StoreError

Command = Callable[[PolicyStore, argparse.Namespace], Awaitable[Any]]
# Principals and handles `ctl report` lists behind unexpected mismatches.
TOP_UNEXPECTED = 10
# The fields a shadow file may carry beside a set: its rollout.
_ROLLOUT_FIELDS = frozenset({"weights", "testers", "state", "cohorts", "plan"})
# Flips listed per page of a plan (ctl propose, ctl diff --limit).
PLAN_PAGE = 50


def _read(path: str) -> Any:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise AuthzError(f"--file {path}: {exc.strerror}") from None
    return load_document(text, path)


async def _check_against_catalogs(store: PolicyStore, permissions: PermissionSet, kind: str = "active set") -> None:
    """Refuse a set a sidecar would refuse: every handle it grants must be in a registered catalog.
    `kind` names the set in the error ("active set", "shadow set")."""
    check_handles(permissions, await store.catalogs(), f"{kind} {permissions.version}")


async def cmd_init(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    permissions = parse_permission_set(_read(ns.file), ns.file)
    if not permissions.version:
        raise DocumentError("the set needs a version", document=ns.file, field="version")
    await _check_against_catalogs(store, permissions)
    await store.init(permissions, dump_permission_set(permissions))
    return {"active": permissions.version, "grants": len(permissions.grants)}


def _subject(data: Any) -> str:
    """What a proposal's request id stands for: the file's own content (a change file's version
    may be assigned, so the content, not the derived set, is what a rerun must match)."""
    named = data.get("version") if isinstance(data, dict) else None
    content = json.dumps(data, sort_keys=True, default=str).encode()
    return f"{named or 'change'}@{hashlib.sha256(content).hexdigest()[:16]}"


async def _from_change_file(store: PolicyStore, data: Any, path: str) -> ShadowSet:
    """A change file: operations against the active set (``changes:`` only, no roles or grants),
    applied to it to make the shadow; its version is assigned when the file names none."""
    written = parse_permission_set(data, path, extra_fields=_ROLLOUT_FIELDS)
    rollout = parse_rollout(data, path)
    pointers = await store.pointers()
    active = await _active_set(store, pointers.active)
    head, _revision = await store.chain_head()
    version = written.version or f"{active.version}-c{head.seq + 1}"
    applied = declared(active, written)
    meta = replace(written.meta, version=version, parent=active.version)
    return ShadowSet(permissions=replace(applied, meta=meta, changes=written.changes), rollout=rollout)


async def _rebased(store: PolicyStore, stale_version: str) -> ShadowSet:
    """A stale shadow's declared changes re-applied onto the current active set, as a new version
    (never the stale set itself applied over someone else's promoted change)."""
    pointers = await store.pointers()
    rollout = pointers.shadow(stale_version)
    stale = await store.permission_set(stale_version)
    if stale.meta.parent == pointers.active and rollout.state != "stale":
        raise StoreError(f"{stale_version!r} is not stale: it was made against the active set {pointers.active!r}")
    if not stale.changes:
        raise StoreError(
            f"{stale_version!r} declares no changes to re-apply; write it again against {pointers.active!r}"
        )
    active = await _active_set(store, pointers.active)
    head, _revision = await store.chain_head()
    rebased = declared(active, stale)
    meta = replace(stale.meta, version=f"{stale_version}-r{head.seq + 1}", parent=active.version)
    return ShadowSet(
        permissions=replace(rebased, meta=meta, changes=stale.changes),
        rollout=Rollout(weights={}, testers=rollout.testers, state="proposed"),
    )


async def cmd_propose(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    if bool(ns.file) == bool(ns.rebase):
        raise ConfigError("ctl propose takes --file SHADOW, or --rebase VERSION of a stale shadow")
    data: Any = None
    if ns.rebase:
        shadow = await _rebased(store, ns.rebase)
    else:
        data = _read(ns.file)
        is_change_file = isinstance(data, dict) and "changes" in data and not {"roles", "grants"} & set(data)
        shadow = await _from_change_file(store, data, ns.file) if is_change_file else parse_shadow(data, ns.file)
    written = shadow.permissions.meta
    # A flag wins over the file's own field; one of them must say why and for which request.
    request_id, reason = ns.request_id or written.request_id, ns.reason or written.reason
    for value, flag, name in ((request_id, "--request-id ID", "request_id"), (reason, "--reason TEXT", "reason")):
        if not value:
            raise ConfigError(f"ctl propose needs {flag}, or {name} in {ns.file or 'the shadow'}")
    # Idempotent by request id: the same file proposed again returns what it did the first time.
    subject = f"{ns.rebase}@{_digest(shadow.permissions)}" if ns.rebase else _subject(data)
    done = await store.done_before(Change("propose", request_id, subject=subject))
    if done is not None:
        proposed = done.get("version") or shadow.version
        return {"proposed": proposed, "repeated": True, "request_id": request_id, "audit_seq": done.get("seq")}
    pointers = await store.pointers()
    meta = replace(
        written,
        request_id=request_id,
        reason=reason,
        author=ns.author or written.author,
        parent=written.parent or (pointers.active or ""),
    )
    permissions = replace(shadow.permissions, meta=meta)
    await _check_against_catalogs(store, permissions, "shadow set")
    await cohorts.check_roles(store, shadow.rollout.cohorts)
    # The plan, before anything is written: a flip the declared changes do not explain stops here.
    change_plan = plan(await _active_set(store, pointers.active), permissions)
    if change_plan.undeclared and not ns.accept_undeclared:
        shown = "; ".join(f.describe() for f in change_plan.undeclared[:PLAN_PAGE])
        more = len(change_plan.undeclared) - PLAN_PAGE
        raise StoreError(
            f"shadow set {permissions.version}: {len(change_plan.undeclared)} flip(s) its declared changes do not "
            f"explain: {shown}{f'; and {more} more' if more > 0 else ''} (fix the set, declare them in "
            "'changes:', or pass --accept-undeclared to count them as unexpected)"
        )
    change_record = Change(
        "propose",
        request_id,
        subject=subject,
        fields={
            "who": meta.author or rollouts.who(),
            "reason": reason,
            "version": permissions.version,
            "parent": meta.parent,
            "impact": {
                "flips": len(change_plan.flips),
                "principals": change_plan.principals(),
                "undeclared": len(change_plan.undeclared),
            },
        },
        take_locks=dict.fromkeys(change_plan.by_handle(), permissions.version),
    )
    if ns.rebase:  # the stale shadow leaves in the same transaction, handing over its locks
        change_record = replace(change_record, fields={**change_record.fields, "rebased": ns.rebase})
    rollout_plan = rollouts.from_shadow_file(data, ns.file) if data is not None else None
    await cohorts.check_roles(store, cohorts.of_plan(rollout_plan))
    if rollout_plan is not None and (shadow.rollout.weights or shadow.rollout.cohorts):
        raise ConfigError(f"{ns.file}: give weights and cohorts or a plan, not both (the plan sets them step by step)")
    done = await store.propose(
        permissions, dump_permission_set(permissions), shadow.rollout, change_record, replaces=ns.rebase or None
    )
    if rollout_plan is not None and not done["repeated"]:
        await PlanStore(store).start(
            permissions.version,
            rollout_plan,
            rollouts.start_change(permissions.version, rollout_plan, request_id, meta.author),
        )
    return {
        "proposed": permissions.version,
        "repeated": done["repeated"],
        "parent": meta.parent,
        "request_id": meta.request_id,
        "reason": meta.reason,
        "author": meta.author,
        "weights": dict(shadow.rollout.weights),
        "testers": sorted(shadow.rollout.testers),
        "plan": _plan_document(change_plan, 0, PLAN_PAGE),
        **({"rollout_plan": rollout_plan.describe()} if rollout_plan is not None else {}),
    }


def _digest(permissions: PermissionSet) -> str:
    """A short digest of a set's content: the same request id with other content is refused."""
    return hashlib.sha256(dump_permission_set(permissions)).hexdigest()[:16]


def _lifecycle_change(ns: argparse.Namespace, action: str, version: str) -> Change:
    if not ns.request_id or not ns.reason:
        raise ConfigError(f"ctl {action} needs --request-id ID and --reason TEXT (they are audited)")
    return Change(
        action,
        ns.request_id,
        subject=version,
        fields={"who": ns.author or rollouts.who(), "reason": ns.reason, "version": version},
    )


async def cmd_promote(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Make a live shadow active, in one transaction (see PolicyStore.promote)."""
    change = _lifecycle_change(ns, "promote", ns.version)
    done = await store.done_before(change)
    if done is not None:
        return {"active": ns.version, "repeated": True, "audit_seq": done.get("seq")}
    pointers = await store.pointers()
    pointers.shadow(ns.version)
    shadow = await store.permission_set(ns.version)
    parent = shadow.meta.parent or (pointers.active or "")
    impact: dict[str, int] = {}
    if parent == pointers.active:
        promoted = plan(await _active_set(store, pointers.active), shadow)
        impact = {"flips": len(promoted.flips), "principals": promoted.principals()}
    result = await store.promote(ns.version, parent, replace(change, fields={**change.fields, "impact": impact}))
    # Former active sets beyond the newest --keep are deleted; their records and digests stay.
    pruned = await store.prune(ns.keep)
    return {
        "active": ns.version,
        "repeated": result["repeated"],
        "stale": result.get("stale", []),
        "audit_seq": result["seq"],
        "pruned": pruned,
    }


async def cmd_history(store: PolicyStore, _ns: argparse.Namespace) -> dict[str, Any]:
    """The active sets, oldest first: who made each active, when, why, its impact, if still stored."""
    return {"history": await store.history()}


async def cmd_rollback(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Discard a live shadow: no traffic reaches it again, its locks are released. Retried with
    backoff; a rollback that still fails goes to the dead-letter queue, never nowhere. With --to,
    the emergency path: an earlier active set is restored as a new version (see _restore)."""
    if bool(ns.to) == bool(ns.version):
        raise ConfigError("ctl rollback takes a live shadow VERSION, or --to an earlier active VERSION")
    target = ns.to or ns.version
    change = _lifecycle_change(ns, "restore" if ns.to else "rollback", target)
    try:
        if ns.to:
            return await deadletters.with_retries(lambda: _restore(store, ns.to, change), attempts=ns.retries)
        result = await deadletters.with_retries(lambda: store.discard(ns.version, change), attempts=ns.retries)
    except deadletters.TRANSIENT as exc:
        error = str(exc) or type(exc).__name__
        dead = deadletters.letter(change, target, error, ns.retries)
        where = await _queue(store, Path(ns.dlq_file), change.request_id, dead)
        raise StoreError(
            f"{change.action} of {target} (request {change.request_id}) failed after {ns.retries} attempt(s): "
            f"{error.splitlines()[0] if error else error}; queued in the dead-letter queue ({where}); "
            f"complete it with 'ctl dlq retry {change.request_id}'"
        ) from None
    return {"rolled_back": ns.version, "repeated": result["repeated"], "audit_seq": result["seq"]}


async def _restore(store: PolicyStore, former_version: str, change: Change) -> dict[str, Any]:
    """Restore an earlier active set as a new version whose parent is the active set it replaces,
    and show its plan: what the restore itself changes for whom."""
    done = await store.done_before(change)
    if done is not None:
        return {"restored": former_version, "repeated": True, "audit_seq": done.get("seq")}
    pointers = await store.pointers()
    active = await _active_set(store, pointers.active)
    try:
        document = await store.document(former_version)
    except (StoreError, DocumentError):
        raise StoreError(f"{former_version!r} is not stored (pruned, or never written); see 'ctl history'") from None
    former = parse_permission_set(load_document(document, former_version), former_version)
    head, _revision = await store.chain_head()
    version = f"{former_version}-r{head.seq + 1}"
    meta = replace(
        former.meta,
        version=version,
        parent=active.version,
        request_id=change.request_id,
        reason=str(change.fields.get("reason", "")),
        author=str(change.fields.get("who", "")),
    )
    restored = replace(former, meta=meta, changes=())
    change_plan = plan(active, restored)
    impact = {"flips": len(change_plan.flips), "principals": change_plan.principals()}
    result = await store.restore(
        restored, replace(change, fields={**change.fields, "from": former_version, "impact": impact})
    )
    return {
        "restored": former_version,
        "active": version,
        "repeated": result["repeated"],
        "audit_seq": result["seq"],
        "plan": _plan_document(change_plan, 0, PLAN_PAGE),
    }


async def _queue(store: PolicyStore, local: Path, request_id: str, dead: dict[str, Any]) -> str:
    """Queue a dead letter in etcd if it takes it, else in the local file; say where."""
    try:
        await asyncio.wait_for(store.add_dead_letter(request_id, dead), timeout=5)
    except deadletters.TRANSIENT:
        deadletters.LocalQueue(local).add(request_id, dead)
        return f"local file {local}"
    return "etcd"


async def cmd_dlq_list(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Every dead letter, in etcd and in the local file."""
    local = deadletters.LocalQueue(Path(ns.dlq_file)).load()
    try:
        remote = await store.dead_letters()
    except deadletters.TRANSIENT as exc:
        return {"local": local, "etcd": None, "etcd_error": str(exc) or type(exc).__name__}
    return {"local": local, "etcd": remote}


async def cmd_dlq_retry(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Replay dead letters (one, or all) with their own request ids: done at most once, and removed
    from the queue once done."""
    queue = deadletters.LocalQueue(Path(ns.dlq_file))
    letters = [("local", rid, dead) for rid, dead in queue.load().items()]
    letters += [("etcd", rid, dead) for rid, dead in (await store.dead_letters()).items()]
    if ns.request_id:
        letters = [entry for entry in letters if entry[1] == ns.request_id]
        if not letters:
            raise StoreError(f"no dead letter for request {ns.request_id!r}")
    done = []
    for where, rid, dead in letters:
        change = deadletters.replayed(rid, dead)
        if change.action == "restore":
            result = await _restore(store, dead["version"], change)
        else:
            result = await store.discard(dead["version"], change)
        if where == "local":
            queue.remove(rid)
        else:
            await store.remove_dead_letter(rid)
        done.append({"request_id": rid, "version": dead["version"], "repeated": result["repeated"], "from": where})
    return {"retried": done}


async def cmd_dlq_drop(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Give up on a dead letter, with a reason, audited."""
    if not ns.reason:
        raise ConfigError("ctl dlq drop needs --reason TEXT (it is audited)")
    queue = deadletters.LocalQueue(Path(ns.dlq_file))
    local, remote = queue.load(), await store.dead_letters()
    dead = local.get(ns.request_id) or remote.get(ns.request_id)
    if dead is None:
        raise StoreError(f"no dead letter for request {ns.request_id!r}")
    fields = {"who": ns.author or rollouts.who(), "reason": ns.reason, "dropped": dead}
    ops = [store.etcd.kv.txn_op_delete(store.layout.dead_letter(ns.request_id))] if ns.request_id in remote else []
    entry = await store.record(Change("dlq_drop", subject=ns.request_id, fields=fields), ops)
    queue.remove(ns.request_id)
    return {"dropped": ns.request_id, "audit_seq": entry["seq"]}


async def cmd_audit(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """The audit chain, newest last; with --verify, every break named (and the exit is 1)."""
    records = await store.audit_records()
    head, _revision = await store.chain_head()
    result: dict[str, Any] = {
        "head": {"seq": head.seq, "hash": head.hash},
        "records": [json.loads(value) for _key, value in records[-ns.last :]] if ns.last else [],
    }
    if ns.verify:
        result["problems"] = audit.verify(records, head)
        result["verified"] = not result["problems"]
    return result


async def _active_set(store: PolicyStore, version: str | None) -> PermissionSet:
    if version is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    return await store.permission_set(version)


def _plan_document(change: Plan, offset: int, limit: int) -> dict[str, Any]:
    """The plan as ctl prints it: counts per handle, then one page of the flips (and every
    undeclared one, up to a page)."""
    return {
        "active": change.active,
        "proposed": change.proposed,
        "principals": change.principals(),
        "flips": len(change.flips),
        "by_handle": change.by_handle(),
        "listed": [f.describe() for f in change.flips[offset : offset + limit]],
        "offset": offset,
        "undeclared": len(change.undeclared),
        "undeclared_listed": [f.describe() for f in change.undeclared[:limit]],
    }


async def cmd_diff(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """The plan of a live shadow against the active set, again, a page at a time."""
    pointers = await store.pointers()
    pointers.shadow(ns.version)
    active = await _active_set(store, pointers.active)
    shadow = await store.permission_set(ns.version)
    if ns.limit < 1 or ns.offset < 0:
        raise ConfigError("--limit must be at least 1 and --offset at least 0")
    return _plan_document(plan(active, shadow), ns.offset, ns.limit)


def _weights(values: list[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for value in values:
        region, sep, percent = value.partition("=")
        if not sep or not region or not percent.strip().isdigit() or not 0 <= int(percent) <= 100:
            raise ConfigError(f"--weight {value!r}: expected REGION=PERCENT with a whole percent 0..100")
        weights[region.strip()] = int(percent)
    if not weights:
        raise ConfigError("give at least one --weight REGION=PERCENT, --cohort or --cohort-roles")
    return weights


async def cmd_canary(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    if ns.plan:
        if ns.weight or ns.cohort or ns.cohort_roles:
            raise ConfigError("ctl canary takes --weight/--cohort/--cohort-roles, or --plan REGION=W1,W2,..., not both")
        return await rollouts.cmd_start(store, ns)
    if ns.then or ns.accept_unexercised:
        raise ConfigError("--then and --accept-unexercised go with --plan")
    groups = cohorts.from_flags(ns)
    weights = _weights(ns.weight) if ns.weight or not groups else {}
    await rollouts.refuse_if_planned(store, ns.version)
    await cohorts.check_roles(store, groups)
    # With a request id, a rerun of the same canary step does nothing twice.
    subject = f"{ns.version}:" + ",".join(f"{r}={w}" for r, w in sorted(weights.items()))
    subject += f";cohorts={cohorts.subject(groups)}" if groups else ""
    change = Change("canary", ns.request_id, subject=subject, fields={"who": rollouts.who(), "version": ns.version})
    done = await store.done_before(change)
    if done is not None:
        return {"version": ns.version, "repeated": True, "audit_seq": done.get("seq")}
    rollout = await store.canary(ns.version, weights, change, cohorts=groups)
    return {
        "version": ns.version,
        "weights": dict(rollout.weights),
        "cohorts": cohorts.summary(rollout.cohorts),
        "state": rollout.state,
        "repeated": False,
    }


async def cmd_status(store: PolicyStore, _ns: argparse.Namespace) -> dict[str, Any]:
    """What the pointers name, and whether each named set is there and builds the way a sidecar
    builds it: a problem is listed (and the exit is 1), never shown as if it were live."""
    pointers = await store.pointers()
    head, _head_revision = await store.chain_head()
    revision, kvs = await store.etcd.list_prefix(store.layout.catalogs)
    problems: list[str] = []
    catalogs = []
    for kv in kvs:
        try:
            catalogs.append(parse_catalog(load_document(kv.value, kv.key), kv.key))
        except DocumentError as exc:
            problems.append(f"catalog {kv.key}: {exc}")
    named = [("active", pointers.active)] if pointers.active else []
    for role, version in [*named, *(("shadow", v) for v in sorted(pointers.shadows))]:
        try:
            permissions = await store.permission_set(version)
            check_handles(permissions, catalogs, f"{role} set {version}")
        except (DocumentError, StoreError) as exc:
            problems.append(f"{role} {version}: {exc}")
    return {
        "prefix": store.layout.prefix,
        "revision": revision,
        "active": pointers.active,
        "shadows": {v: layout.rollout_document(r) for v, r in sorted(pointers.shadows.items())},
        "catalogs": {c.service: {"permissions": len(c.permissions), "routes": len(c.routes)} for c in catalogs},
        "locks": await store.locks(),
        "dead_letters": len(await store.dead_letters()),
        "audit_head": {"seq": head.seq, "hash": head.hash},
        **await rollouts.status(store, problems),
        "problems": problems,
    }


def _top(counts: Counter[str], name: str) -> list[dict[str, Any]]:
    return [{name: key, "mismatches": n} for key, n in counts.most_common(TOP_UNEXPECTED)]


async def cmd_report(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Sum every sidecar's report of a live shadow, and how much of its predicted impact was hit."""
    pointers = await store.pointers()
    pointers.shadow(ns.version)
    if pointers.active is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    _revision, kvs = await store.etcd.list_prefix(store.layout.reports(ns.version))
    reports = [json.loads(kv.value) for kv in kvs]
    mismatches: dict[str, int] = {}
    exercised: set[tuple[str, str, str | None]] = set()
    principals: Counter[str] = Counter()
    handles: Counter[str] = Counter()
    unlisted = 0
    for report in reports:
        for kind, n in report.get("mismatches", {}).items():
            mismatches[kind] = mismatches.get(kind, 0) + n
        exercised.update((p, h, s) for p, h, s in report.get("exercised", []))
        for principal, handle, n in report.get("unexpected", []):
            principals[principal] += n
            handles[handle] += n
        unlisted += report.get("unexpected_unlisted", 0)
    active, shadow = [await store.permission_set(v) for v in (pointers.active, ns.version)]
    # Coverage is of the whole impact, declared or not: a rarely used permission the change also
    # touches would otherwise go off weeks later. (Predicted: what the declared changes explain.)
    compiled_active = compile_set(active)
    whole = impact(compiled_active, compile_set(shadow))
    predicted = impact(compiled_active, compile_set(declared(active, shadow)))
    hit, coverage, unexercised = Impact(whole).covered(exercised)
    never = sorted(unexercised)
    affected: dict[str, set[str]] = {}
    for principal, handle, _scope in whole:
        if handle in never:
            affected.setdefault(handle, set()).add(principal)
    return {
        "version": ns.version,
        "sidecars": sorted(r.get("sidecar", "?") for r in reports),
        "evaluations": sum(r.get("evaluations", 0) for r in reports),
        "mismatches": dict(sorted(mismatches.items())),
        # Who and what is behind the mismatches nobody predicted, the most frequent first; the
        # unexpected mismatches not itemised (past each sidecar's bounded tally) are counted apart.
        "unexpected_principals": _top(principals, "principal"),
        "unexpected_handles": _top(handles, "handle"),
        "unexpected_unlisted": unlisted,
        "impact": len(whole),
        "predicted_impact": len(predicted),
        "exercised": len(hit),
        "coverage": coverage,
        "handles_never_exercised": never,
        # How many principals each of those handles changes for: what would go off unseen.
        "never_exercised_principals": {h: len(affected[h]) for h in never},
    }


async def cmd_registry_get(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    catalogs = [c for c in await store.catalogs() if not ns.service or c.service == ns.service]
    found = [
        {"service": c.service, "handle": p.handle, "description": p.description}
        for c in catalogs
        for p in c.permissions
        if not ns.handle or p.handle == ns.handle
    ]
    if ns.handle and not found:
        raise StoreError(f"permission {ns.handle!r} is not registered")
    return {"permissions": found}


async def cmd_registry_put(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    if ns.file:
        catalog = parse_catalog(_read(ns.file), ns.file)
        if ns.service and ns.service != catalog.service:
            raise ConfigError(f"--service {ns.service} but {ns.file} is the catalog of {catalog.service}")
        await store.check_owner(catalog.service, catalog.handles())
        stored = await store.register_catalog(catalog)
    else:
        if not ns.service or not ns.handle:
            raise ConfigError("registry put needs --file CATALOG, or --service and --handle")
        handle = check_handle(ns.handle, "--handle", "handle")
        stored = await store.register_permission(ns.service, Permission(handle, ns.description or ""))
    return {"service": stored.service, "permissions": [p.handle for p in stored.permissions]}


def _dlq_file() -> str:
    return os.environ.get("AUTHZ_DLQ_FILE") or str(deadletters.default_file())


def _add_lifecycle_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """promote, rollback and audit: the audited steps of a change."""
    for name, text, handler in (
        ("promote", "make a live shadow the active set (one transaction, audited)", cmd_promote),
        ("rollback", "discard a live shadow: weights gone, locks released (audited)", cmd_rollback),
    ):
        lifecycle = command(name, text, handler)
        if name == "promote":
            lifecycle.add_argument("--keep", type=int, default=10, help="former active sets kept in etcd")
        if name == "rollback":
            lifecycle.add_argument("--retries", type=int, default=5, help="attempts before the dead-letter queue")
            lifecycle.add_argument(
                "--dlq-file", default=_dlq_file(), help="the local dead-letter file (etcd unreachable)"
            )
        lifecycle.add_argument("version", nargs="?" if name == "rollback" else None, default="")
        if name == "rollback":
            lifecycle.add_argument("--to", default="", help="restore this earlier active set as a new version")
        lifecycle.add_argument(
            "--request-id", default="", help="the change request (running it again does nothing twice)"
        )
        lifecycle.add_argument("--reason", default="", help="why, in a sentence (audited)")
        lifecycle.add_argument("--author", default="", help="who (default: $USER)")
    command("history", "the active sets, oldest first: who, when, why, impact", cmd_history)
    audit_command = command("audit", "the audit chain: who changed what, when and why", cmd_audit)
    audit_command.add_argument(
        "--verify", action="store_true", help="check every link; name each edited or removed record"
    )
    audit_command.add_argument("--last", type=int, default=20, help="records listed, newest last (0: none)")


def _add_dlq_commands(
    commands: Any,
    command: Callable[..., argparse.ArgumentParser],
    connection: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    """dlq list|retry|drop: the rollbacks that failed after their retries."""
    dlq = commands.add_parser("dlq", help="rollbacks that failed after their retries")
    connection(dlq, True)
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    for name, text, handler in (
        ("list", "the dead letters, in etcd and in the local file", cmd_dlq_list),
        ("retry", "replay dead letters with their own request ids (done at most once)", cmd_dlq_retry),
        ("drop", "give up on a dead letter (needs --reason; audited)", cmd_dlq_drop),
    ):
        sub_command = command(name, text, handler, dlq_commands)
        sub_command.add_argument("--dlq-file", default=_dlq_file(), help="the local dead-letter file")
        if name != "list":
            sub_command.add_argument("request_id", nargs="?" if name == "retry" else None, default="")
        if name == "drop":
            sub_command.add_argument("--reason", default="", help="why (audited)")
            sub_command.add_argument("--author", default="", help="who (default: $USER)")


def _add_registry_commands(
    commands: Any,
    command: Callable[..., argparse.ArgumentParser],
    connection: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    """registry get|put: the permissions services registered."""
    registry = commands.add_parser("registry", help="the permission registry")
    connection(registry, True)
    registry_commands = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")
    get = command("get", "show registered permissions", cmd_registry_get, registry_commands)
    get.add_argument("handle", nargs="?", default="", help="one handle (default: all)")
    get.add_argument("--service", default="", help="only this service's")
    put = command("put", "register permissions (never removes one)", cmd_registry_put, registry_commands)
    put.add_argument("--file", default="", help="a whole catalog (permissions and routes)")
    put.add_argument("--service", default="", help="the owning service")
    put.add_argument("--handle", default="", help="one permission handle")
    put.add_argument("--description", default="", help="what it allows")


def add_parser(
    sub: Any, add_flag: Callable[..., None], add_etcd_flags: Callable[[argparse.ArgumentParser, bool], None]
) -> None:
    ctl = sub.add_parser("ctl", help="the control plane: change the sets in etcd")

    def connection(parser: argparse.ArgumentParser, shared: bool) -> None:
        """The flags every verb takes, on ctl itself (with their defaults) and again on each verb
        (`shared`: without defaults, so that a value given before the verb survives)."""
        add_flag(parser, "--etcd", text="comma-separated etcd endpoints", shared=shared)
        add_flag(parser, "--prefix", text="etcd key prefix", shared=shared)
        add_etcd_flags(parser, shared)
        parser.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS if shared else False, help="print JSON"
        )

    connection(ctl, False)
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def command(name: str, text: str, handler: Command, under: Any = commands) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = under.add_parser(name, help=text, description=text)
        connection(parser, True)
        parser.set_defaults(handler=handler)
        return parser

    init = command("init", "make a set the first active set (only when none exists)", cmd_init)
    init.add_argument("--file", required=True, help="the set (YAML or JSON)")
    propose = command("propose", "store a shadow set beside the active one", cmd_propose)
    propose.add_argument("--file", default="", help="the shadow set: roles, grants, weights, testers")
    propose.add_argument("--rebase", default="", metavar="VERSION", help="re-apply a stale shadow's changes")
    propose.add_argument("--request-id", default="", help="the change request this implements (default: the file's)")
    propose.add_argument("--reason", default="", help="why, in a sentence (default: the file's)")
    propose.add_argument("--author", default="", help="who proposes it (default: the file's)")
    propose.add_argument(
        "--accept-undeclared",
        action="store_true",
        help="propose it although its plan has flips its declared changes do not explain (counted as unexpected)",
    )
    _add_lifecycle_commands(command)
    canary = command("canary", "set a shadow's canary weight and cohort per region", cmd_canary)
    canary.add_argument("version")
    canary.add_argument("--weight", action="append", default=[], metavar="REGION=PERCENT", help="repeatable")
    cohorts.add_flags(canary)
    canary.add_argument("--request-id", default="", help="the change request (a rerun does nothing twice)")
    rollouts.add_plan_flags(canary)
    diff = command("diff", "a live shadow's plan: who gains or loses which handle, against the active set", cmd_diff)
    diff.add_argument("version")
    diff.add_argument("--limit", type=int, default=PLAN_PAGE, help="flips listed per page")
    diff.add_argument("--offset", type=int, default=0, help="flips skipped before the page")
    command("status", "what is active and live", cmd_status)
    rollouts.add_commands(command)
    report = command("report", "a shadow's traffic over every sidecar: evaluations, mismatches, coverage", cmd_report)
    report.add_argument("version")
    add_replay_command(command)
    add_explain_command(command)
    add_roles_commands(commands, command, connection)
    add_test_commands(commands, command, connection)
    _add_dlq_commands(commands, command, connection)
    _add_registry_commands(commands, command, connection)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    for key, value in result.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        print(f"{key}: {text}")


def run(ns: argparse.Namespace, options: EtcdOptions) -> int:
    async def go() -> dict[str, Any]:
        async with Etcd(options.validate()) as etcd:
            try:
                store = PolicyStore(etcd, ns.prefix)
                result: dict[str, Any] = await ns.handler(store, ns)
                if store.last_revision and "revision" not in result:
                    # What a write committed: an application's check at_least_revision reads it.
                    result["revision"] = store.last_revision
                return result
            except EtcdError as exc:
                raise AuthzError(f"etcd at {etcd.endpoints}: {exc}") from None
            except grpc.aio.AioRpcError as exc:  # what etcd3aio does not map (e.g. auth required)
                raise AuthzError(f"etcd at {etcd.endpoints}: {exc.code().name}: {exc.details()}") from None
            except TimeoutError:
                raise AuthzError(f"etcd at {etcd.endpoints}: no answer within {options.timeout:g} s") from None

    try:
        # A command runs once and exits; the sets it reads can hold a million grants, which the
        # cyclic collector would scan over and over while they are parsed (see paused_gc).
        with paused_gc():
            result = asyncio.run(go())
    except ValueError as exc:  # a bad --prefix
        raise AuthzError(str(exc)) from None
    except StoreError as exc:
        raise AuthzError(str(exc)) from None
    _print(result, ns.json)
    problems = result.get("problems")
    if problems:  # status found pointers at sets that are missing or do not build
        sys.stdout.flush()
        print(f"authz-sidecar: {len(problems)} problem(s): {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_parser", "run"]
