"""``ctl explain PRINCIPAL PERMISSION``: why a set allows or denies, what every live set would
answer, and which set decides this principal's requests in each region.

The region answer is the selection rule itself (:mod:`authz_sidecar.model.selection`), run on the
snapshot a sidecar of that region would build from the live documents, for a request without the
tester header and with the principal as the stickiness key (the default): a cohort holding the
principal, else a canary bucket under its weight, else the active set.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from authz_sidecar.documents import check_handle, check_principal, check_scope
from authz_sidecar.errors import ConfigError, DocumentError
from authz_sidecar.model.explain import explain
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import select
from authz_sidecar.model.snapshot import CompileCache, build_snapshot, version_key
from authz_sidecar.model.values import ShadowSet
from authz_sidecar.store.policy import PolicyStore, StoreError


async def cmd_explain(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    try:
        principal = check_principal(ns.principal, "ctl explain", "PRINCIPAL")
        handle = check_handle(ns.permission, "ctl explain", "PERMISSION")
        scope = check_scope(ns.scope, "ctl explain", "--scope") if ns.scope else None
    except DocumentError as exc:
        raise ConfigError(str(exc)) from None
    pointers = await store.pointers()
    if pointers.active is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    live = {pointers.active: await store.permission_set(pointers.active)}
    for version in sorted(pointers.shadows, key=version_key):
        live[version] = await store.permission_set(version)
    chosen = live.get(ns.set) if ns.set else live[pointers.active]
    if chosen is None:
        chosen = await store.permission_set(ns.set)  # any stored version, live or not
    # Which set decides where: the selection rule itself, on the snapshot a sidecar of each region
    # would build from these documents (cohorts resolved, stale shadows left unenforced).
    catalogs = await store.catalogs()
    cache = CompileCache()
    shadows = [ShadowSet(live[v], rollout) for v, rollout in pointers.shadows.items()]
    answers = {
        version: "allow" if cache.compiled(permissions).decide(principal, handle, scope) is Reason.ALLOWED else "deny"
        for version, permissions in live.items()
    }
    regions = sorted(
        {region for rollout in pointers.shadows.values() for region in [*rollout.weights, *rollout.cohorts]}
    )
    decided: dict[str, str] = {}
    how: dict[str, str] = {}
    for region in regions:
        snapshot = build_snapshot(live[pointers.active], shadows, catalogs, region=region, cache=cache)
        enforced, selection = select(snapshot, principal, None, principal)
        decided[region], how[region] = enforced.meta.version, selection.value
    return {
        **explain(chosen, principal, handle, scope).document(),
        "live_answers": answers,
        "decided_by_region": {**decided, "(any other region)": pointers.active},
        "selection_by_region": {**how, "(any other region)": "default"},
    }


def add_explain_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    verb = command(
        "explain", "why a principal is allowed or denied, by every live set, and who decides where", cmd_explain
    )
    verb.add_argument("principal")
    verb.add_argument("permission", help="the handle, e.g. things:edit")
    verb.add_argument("--scope", default="", help="the scope asked in, e.g. account:acme")
    verb.add_argument("--set", default="", metavar="VERSION", help="explain this stored set (default: the active one)")
