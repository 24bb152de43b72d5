"""The permission model's values: sets, grants, shadows' rollouts, catalogs. Immutable and plain.

Built by the parsers in :mod:`authz_sidecar.documents` from YAML or JSON, and by the control plane
when it derives a set; everything else in the model reads them. No checks live here: a value is
only ever made from input that :mod:`authz_sidecar.documents` has already refused or accepted.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import NamedTuple, overload


class Grant(NamedTuple):
    """A named tuple rather than a dataclass: a set can hold a million, and building a tuple is
    several times cheaper than a frozen dataclass."""

    principal: str
    roles: tuple[str, ...]
    # None: the grant applies in every scope. A string: only in that scope.
    scope: str | None = None


class Grants(Sequence[Grant]):
    """A large set's grants as the pieces they were read in (a tuple each), in order.

    One tuple of a million grants is built from a list of as many in one C call (12-61 ms) and
    that list freed in another (15-18 ms), each holding the GIL while Checks wait; pieces of a few
    hundred are built as they are read. Equal to the tuple of the same grants.
    """

    __slots__ = ("_ends", "pieces")

    def __init__(self, pieces: Iterable[tuple[Grant, ...]]) -> None:
        # A list only so that the holder of the last reference can let the pieces go one at a
        # time (drain()); nothing else changes it.
        self.pieces = [p for p in pieces if p]
        self._ends = list(accumulate(map(len, self.pieces)))

    def drain(self) -> Iterator[None]:
        """Let the pieces go, last first, one per step. Only for whoever holds the last reference
        (no one else can see it emptied): freeing a million grants at once holds the GIL 25-40 ms."""
        while self.pieces:
            self.pieces.pop()
            self._ends.pop()
            yield

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __iter__(self) -> Iterator[Grant]:
        return chain.from_iterable(self.pieces)

    @overload
    def __getitem__(self, index: int) -> Grant: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Grant, ...]: ...

    def __getitem__(self, index: int | slice) -> Grant | tuple[Grant, ...]:
        size = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(size)
            if step != 1:
                return tuple(self)[index]
            at = bisect_right(self._ends, start)
            if at < len(self.pieces) and self._ends[at] - len(self.pieces[at]) == start and self._ends[at] == stop:
                # Exactly one piece (a child set reusing its parent's): that tuple, not a copy.
                return self.pieces[at]
            found: list[Grant] = []
            while start < stop and at < len(self.pieces):
                piece = self.pieces[at]
                first = self._ends[at] - len(piece)
                found.extend(piece[start - first : stop - first])
                start = self._ends[at]
                at += 1
            return tuple(found)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("grant index out of range")
        at = bisect_right(self._ends, index)
        return self.pieces[at][index - (self._ends[at] - len(self.pieces[at]))]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grants | tuple):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Grants({len(self)} in {len(self.pieces)} pieces)"


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
    # A tuple, or for a large set read in pieces its Grants.
    grants: Sequence[Grant]
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
