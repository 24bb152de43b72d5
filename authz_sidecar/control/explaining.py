"""``ctl explain PRINCIPAL PERMISSION``: why a set allows or denies, what every live set would
answer, and which set decides this principal's requests in each region.

The region answer follows the selection rule (:mod:`authz_sidecar.model.selection`) for a request
without the tester header, with the principal as the stickiness key (the default): the first live
shadow, in version order, whose cohort in the region holds the principal (named, or by the unscoped
role combination the principal holds in the active set); else the live shadows with a weight in
the region, in version order, the first whose bucket for this principal falls under its weight.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from authz_sidecar.documents import check_handle, check_principal, check_scope, load_document, parse_permission_set
from authz_sidecar.errors import ConfigError, DocumentError
from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.explain import explain
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import BUCKETS, stable_bucket
from authz_sidecar.model.snapshot import version_key
from authz_sidecar.model.values import Cohort, PermissionSet
from authz_sidecar.store.policy import PolicyStore, StoreError


def _in_cohort(cohort: Cohort | None, principal: str, combination: frozenset[str]) -> bool:
    return cohort is not None and (principal in cohort.principals or combination in cohort.role_sets)


async def _set(store: PolicyStore, version: str) -> PermissionSet:
    try:
        return parse_permission_set(load_document(await store.document(version), version), version)
    except (StoreError, DocumentError) as exc:
        raise StoreError(f"set {version!r}: {exc}") from None


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
    live = {pointers.active: await _set(store, pointers.active)}
    for version in sorted(pointers.shadows, key=version_key):
        live[version] = await _set(store, version)
    chosen = live.get(ns.set) if ns.set else live[pointers.active]
    if chosen is None:
        chosen = await _set(store, ns.set)  # any stored version, live or not
    answers = {
        version: "allow" if compile_set(permissions).decide(principal, handle, scope) is Reason.ALLOWED else "deny"
        for version, permissions in live.items()
    }
    regions = sorted(
        {region for rollout in pointers.shadows.values() for region in [*rollout.weights, *rollout.cohorts]}
    )
    # The roles of the principal's unscoped grants in the active set: its combination, if any.
    combination = frozenset(
        role for g in live[pointers.active].grants if g.principal == principal and g.scope is None for role in g.roles
    )
    fresh = [
        (version, pointers.shadows[version])
        for version in sorted(pointers.shadows, key=version_key)
        if pointers.shadows[version].state != "stale" and live[version].meta.parent in ("", pointers.active)
    ]
    decided: dict[str, str] = {}
    how: dict[str, str] = {}
    for region in regions:
        cohort = next((v for v, r in fresh if _in_cohort(r.cohorts.get(region), principal, combination)), None)
        canary = next(
            (v for v, r in fresh if stable_bucket(principal, v) < r.weights.get(region, 0) * BUCKETS // 100), None
        )
        decided[region] = cohort or canary or pointers.active
        how[region] = "cohort" if cohort else "canary" if canary else "default"
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
