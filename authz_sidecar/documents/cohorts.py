"""Cohorts: the principals a shadow decides for in a region by name or by role combination, parsed
from a rollout (``cohorts: {eu-west: {principals: [...], role_sets: [[viewer, editor]]}}``) or from
a rollout plan's step, and written back.

Checked here: the region name (as for weights), each principal (as for grants), each role name, and
the sizes, bounded so that the shadows pointer (one etcd value, every live shadow's rollout) stays
far below etcd's request limit and a snapshot rebuild stays quick. Whether the roles exist is a
question for the active set, answered where the documents meet (:mod:`authz_sidecar.model.assembly`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz_sidecar.documents.checks import REGION_RE, check_principal, check_role, mapping_of, only_fields, sequence_of
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import Cohort

# Per region: principals named, role combinations, and roles in one combination.
MAX_COHORT_PRINCIPALS = 10_000
MAX_COHORT_ROLE_SETS = 100
MAX_ROLES_PER_SET = 64
_COHORT_FIELDS = frozenset({"principals", "role_sets"})


def _bounded(value: Any, limit: int, what: str, document: str, where: str) -> list[Any]:
    items = list(sequence_of(value, document, where))
    if len(items) > limit:
        raise DocumentError(
            f"{len(items)} {what}; a cohort names at most {limit:,} per region",
            document=document,
            field=where,
            value=len(items),
        )
    return items


def parse_cohort(data: Any, document: str, where: str) -> Cohort:
    """One region's cohort. Both fields may be absent; an empty cohort decides for nobody."""
    raw = mapping_of(data if data is not None else {}, document, where)
    only_fields(raw, _COHORT_FIELDS, document, where)
    principals = frozenset(
        check_principal(p, document, f"{where}.principals[{i}]")
        for i, p in enumerate(
            _bounded(raw.get("principals") or [], MAX_COHORT_PRINCIPALS, "principals", document, f"{where}.principals")
        )
    )
    role_sets: set[frozenset[str]] = set()
    for i, combination in enumerate(
        _bounded(raw.get("role_sets") or [], MAX_COHORT_ROLE_SETS, "role combinations", document, f"{where}.role_sets")
    ):
        at = f"{where}.role_sets[{i}]"
        roles = _bounded(combination, MAX_ROLES_PER_SET, "roles in one combination", document, at)
        if not roles:
            raise DocumentError(
                "a role combination names at least one role (a principal without roles is in no cohort)",
                document=document,
                field=at,
                value=[],
            )
        role_sets.add(frozenset(check_role(r, document, f"{at}[{j}]") for j, r in enumerate(roles)))
    return Cohort(principals=principals, role_sets=frozenset(role_sets))


def check_region(region: Any, document: str, where: str) -> str:
    if not isinstance(region, str) or not REGION_RE.fullmatch(region):
        raise DocumentError(f"{region!r} is not a region name", document=document, field=where, value=region)
    return region


def parse_cohorts(data: Any, document: str) -> dict[str, Cohort]:
    """``cohorts:`` of a rollout, region -> cohort; a region whose cohort is empty is left out."""
    cohorts: dict[str, Cohort] = {}
    for region, raw in mapping_of(data or {}, document, "cohorts").items():
        where = f"cohorts.{region}"
        check_region(region, document, where)
        cohort = parse_cohort(raw, document, where)
        if cohort:
            cohorts[region] = cohort
    return cohorts


def cohort_document(cohort: Cohort) -> dict[str, Any]:
    """Sorted, so that the same cohort always gives the same bytes (the pointer is compared)."""
    return {
        "principals": sorted(cohort.principals),
        "role_sets": sorted(sorted(combination) for combination in cohort.role_sets),
    }


def cohorts_document(cohorts: Mapping[str, Cohort]) -> dict[str, Any]:
    return {region: cohort_document(cohort) for region, cohort in sorted(cohorts.items()) if cohort}
