"""``ctl canary VERSION --cohort REGION=alice,bob --cohort-roles REGION=viewer+editor``: a shadow's
cohorts from flags, and the check a sidecar would make of them, made before anything is written.

The flags that name a region give its whole cohort: ``--cohort`` its principals (comma-separated;
repeated, they add up) and each ``--cohort-roles`` one role combination (roles joined by ``+``,
exactly the unscoped roles a principal holds in the active set). A region named only with empty
values (``--cohort eu-west=``) has its cohort cleared; regions not named keep theirs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from authz_sidecar.documents.cohorts import check_region, cohort_document, parse_cohort
from authz_sidecar.errors import ConfigError, DocumentError
from authz_sidecar.model.cohorts import describe_missing, missing_roles
from authz_sidecar.model.rolloutplan import RolloutPlan
from authz_sidecar.model.values import Cohort
from authz_sidecar.store.policy import PolicyStore, StoreError


def _split(flag: str, value: str, separator: str) -> tuple[str, list[str]]:
    region, sep, rest = value.partition("=")
    if not sep:
        shape = "REGION=PRINCIPAL,PRINCIPAL..." if flag == "--cohort" else "REGION=ROLE+ROLE..."
        raise ConfigError(f"{flag} {value!r}: expected {shape} (an empty list clears the region's cohort)")
    items = [item.strip() for item in rest.split(separator)] if rest.strip() else []
    if any(not item for item in items):
        raise ConfigError(f"{flag} {value!r}: an empty name between {separator!r}s")
    return region.strip(), items


def from_flags(ns: argparse.Namespace) -> dict[str, Cohort]:
    """Region -> its new cohort (empty: cleared), checked as a rollout document is; a usage error
    (exit 2) names the flag."""
    raw: dict[str, dict[str, list[Any]]] = {}
    for value in ns.cohort:
        region, principals = _split("--cohort", value, ",")
        raw.setdefault(region, {"principals": [], "role_sets": []})["principals"].extend(principals)
    for value in ns.cohort_roles:
        region, roles = _split("--cohort-roles", value, "+")
        entry = raw.setdefault(region, {"principals": [], "role_sets": []})
        if roles:
            entry["role_sets"].append(roles)
    cohorts: dict[str, Cohort] = {}
    for region, entry in raw.items():
        try:
            check_region(region, "ctl canary", f"--cohort {region}")
            cohorts[region] = parse_cohort(entry, "ctl canary", f"--cohort {region}")
        except DocumentError as exc:
            raise ConfigError(str(exc)) from None
    return cohorts


def subject(cohorts: Mapping[str, Cohort]) -> str:
    """What the cohorts of one `ctl canary` stand for in its request id's subject: short, and
    different whenever a principal or a combination differs."""
    document = {region: cohort_document(cohort) for region, cohort in sorted(cohorts.items())}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


async def check_roles(store: PolicyStore, cohorts: Mapping[str, Cohort]) -> None:
    """Refuse combinations naming a role the active set lacks, as a sidecar would refuse the shadow."""
    if not any(cohort.role_sets for cohort in cohorts.values()):
        return
    version = (await store.pointers()).active
    if version is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    active = await store.permission_set(version)
    missing = missing_roles(cohorts, active.roles)
    if missing:
        raise StoreError(describe_missing(missing, active.roles, version))


def of_plan(plan: RolloutPlan | None) -> dict[str, Cohort]:
    """Every role combination a plan's cohort steps name, per region: what check_roles checks."""
    combined: dict[str, frozenset[frozenset[str]]] = {}
    for step in plan.steps if plan is not None else ():
        if step.cohort is not None:
            combined[step.region] = combined.get(step.region, frozenset()) | step.cohort.role_sets
    return {region: Cohort(role_sets=role_sets) for region, role_sets in combined.items()}


def summary(cohorts: Mapping[str, Cohort]) -> dict[str, Any]:
    """What ctl prints of the cohorts (the principals counted; ctl status lists them)."""
    return {
        region: {"principals": len(c.principals), "role_sets": cohort_document(c)["role_sets"]}
        for region, c in sorted(cohorts.items())
    }


def add_flags(canary: argparse.ArgumentParser) -> None:
    canary.add_argument(
        "--cohort",
        action="append",
        default=[],
        metavar="REGION=PRINCIPAL,...",
        help="the principals of the region's cohort (repeatable; REGION= clears the cohort)",
    )
    canary.add_argument(
        "--cohort-roles",
        action="append",
        default=[],
        metavar="REGION=ROLE+ROLE",
        help="a role combination of the region's cohort: exactly these unscoped roles in the active set (repeatable)",
    )
