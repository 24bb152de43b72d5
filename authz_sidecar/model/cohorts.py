"""Who is in a shadow's cohort: resolved once, when a snapshot is built, never per request.

A cohort (:class:`~authz_sidecar.model.values.Cohort`) names principals and role combinations. A
principal is in it when named, or when the roles of its unscoped grants in the ACTIVE set are
exactly one of the combinations (scoped grants do not count: a combination says who a principal is
everywhere, and the unscoped row of ``ctl roles combos`` is the one a team picks from). The active
set's, not the shadow's: the cohort is who moves onto the change, chosen by what they hold today.

Pure: no I/O. Linear in the active set's grants, and only for the cohorts that name combinations.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from authz_sidecar.model.pacing import pause
from authz_sidecar.model.values import Cohort, PermissionSet, grant_columns


def unscoped_combinations(permissions: PermissionSet) -> dict[frozenset[str], list[str]]:
    """The principals holding each unscoped role combination, one frozenset per distinct one."""
    canon: dict[tuple[str, ...], frozenset[str]] = {}
    held: dict[str, frozenset[str]] = {}
    for piece in grant_columns(permissions.grants):
        pause()
        for principal, roles, scope in zip(piece.principals, piece.roles, piece.scopes, strict=True):
            if scope is not None:
                continue
            combination = canon.get(roles)
            if combination is None:
                combination = canon[roles] = frozenset(roles)
            before = held.get(principal)
            held[principal] = combination if before is None else before | combination
    holders: dict[frozenset[str], list[str]] = {}
    for principal, combination in held.items():
        holders.setdefault(combination, []).append(principal)
    return holders


def members(cohort: Cohort, holders: Mapping[frozenset[str], Iterable[str]]) -> frozenset[str]:
    """The principals in `cohort`, given who holds which unscoped combination in the active set."""
    found = set(cohort.principals)
    for combination in cohort.role_sets:
        found.update(holders.get(combination, ()))
    return frozenset(found)


def missing_roles(cohorts: Mapping[str, Cohort], roles: Collection[str]) -> list[tuple[str, str]]:
    """(region, role) for every role a cohort's combinations name that is not in `roles` (the
    active set's), sorted: such a combination matches nobody, and a typo that silently moves nobody
    would look like a step that went well."""
    return sorted((region, role) for region, cohort in cohorts.items() for role in cohort.roles() if role not in roles)


def describe_missing(missing: list[tuple[str, str]], roles: Collection[str], version: str) -> str:
    """The refusal's text for `missing` (non-empty), naming the first and counting the rest."""
    region, role = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return (
        f"role {role!r} of the {region} cohort{more} is not a role of the active set {version} "
        f"(its roles: {', '.join(sorted(roles)) or 'none'}); a cohort's role combinations are the active set's"
    )
