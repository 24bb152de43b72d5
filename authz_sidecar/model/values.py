"""The permission model's values: sets, grants, shadows' rollouts, catalogs. Immutable and plain.

Built by the parsers in :mod:`authz_sidecar.documents` from YAML or JSON, and by the control plane
when it derives a set; everything else in the model reads them. No checks live here: a value is
only ever made from input that :mod:`authz_sidecar.documents` has already refused or accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple


class Grant(NamedTuple):
    """A named tuple rather than a dataclass: a set can hold a million, and building a tuple is
    several times cheaper than a frozen dataclass."""

    principal: str
    roles: tuple[str, ...]
    # None: the grant applies in every scope. A string: only in that scope.
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Metadata:
    version: str = ""
    request_id: str = ""
    parent: str = ""
    author: str = ""
    reason: str = ""
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class DeclaredChange:
    """One change a proposal says it makes, applied to the active set to predict its impact:

    - a role's handles added or removed (``role`` with ``add``/``remove``), a role created with its
      handles (``role`` with ``create``) or deleted, and with it from every grant (``delete``);
    - roles granted to or revoked from a principal, unscoped (``principal`` with ``grant``/``revoke``);
    - a principal's role moved from one scope to another (``principal``, ``role``, ``scope``: the
      scope it has now, empty for its unscoped grant, and ``to``).
    """

    role: str = ""
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    principal: str = ""
    grant: tuple[str, ...] = ()
    revoke: tuple[str, ...] = ()
    create: tuple[str, ...] = ()
    delete: bool = False
    scope: str = ""
    to: str = ""


@dataclass(frozen=True, slots=True)
class PermissionSet:
    roles: Mapping[str, tuple[str, ...]]
    grants: tuple[Grant, ...]
    meta: Metadata = field(default_factory=Metadata)
    # What a proposal declares it changes against its parent; empty: every difference is intended.
    changes: tuple[DeclaredChange, ...] = ()

    @property
    def version(self) -> str:
        return self.meta.version

    def handles(self) -> frozenset[str]:
        return frozenset(h for handles in self.roles.values() for h in handles)


@dataclass(frozen=True, slots=True)
class Cohort:
    """Who a shadow decides for in one region by name rather than by share: the principals listed,
    and every principal whose unscoped grants in the active set hold exactly one of the role
    combinations (the rows ``ctl roles combos`` lists as unscoped). Exactly, not at least: a team
    moves the holders of one combination at a time, and a principal who also holds another role
    belongs to another combination, moved on its own."""

    principals: frozenset[str] = frozenset()
    role_sets: frozenset[frozenset[str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.principals or self.role_sets)

    def roles(self) -> frozenset[str]:
        """Every role the combinations name."""
        return frozenset(role for combination in self.role_sets for role in combination)


@dataclass(frozen=True, slots=True)
class Rollout:
    """How a shadow reaches traffic: canary weight and cohort per region, and who may pick it by
    header."""

    weights: Mapping[str, int] = field(default_factory=dict)
    testers: frozenset[str] = frozenset()
    state: str = "proposed"
    # Region -> the cohort the shadow decides for there (regions without one are absent).
    cohorts: Mapping[str, Cohort] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShadowSet:
    permissions: PermissionSet
    rollout: Rollout

    @property
    def version(self) -> str:
        return self.permissions.meta.version


@dataclass(frozen=True, slots=True)
class Permission:
    handle: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: str
    path: str
    permission: str
    # A scope template such as "account:{account}", filled from the path's parameters.
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    service: str
    permissions: tuple[Permission, ...]
    routes: tuple[RouteSpec, ...] = ()

    def handles(self) -> frozenset[str]:
        return frozenset(p.handle for p in self.permissions)
