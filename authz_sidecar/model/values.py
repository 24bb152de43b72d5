"""The permission model's values: sets, grants, shadows' rollouts, catalogs. Immutable and plain.

Built by the parsers in :mod:`authz_sidecar.documents` from YAML or JSON, and by the control plane
when it derives a set; everything else in the model reads them. No checks live here: a value is
only ever made from input that :mod:`authz_sidecar.documents` has already refused or accepted.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, islice
from typing import NamedTuple, TypeVar, overload


class Grant(NamedTuple):
    """A named tuple rather than a dataclass: a set can hold a million, and building a tuple is
    several times cheaper than a frozen dataclass."""

    principal: str
    roles: tuple[str, ...]
    # None: the grant applies in every scope. A string: only in that scope.
    scope: str | None = None


# A Grant from a (principal, roles, scope) tuple, skipping the named tuple's Python-level __new__.
_new_grant = partial(tuple.__new__, Grant)

_K = TypeVar("_K")
_V = TypeVar("_V")

# Grants per piece when a sequence that is not already in pieces is looked at a piece at a time.
_STEP = 10_000


class _LikeTuple(Sequence[Grant]):
    """Equal to the tuple of the same grants, and hashed as it."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _LikeTuple | tuple):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))


class GrantColumns(_LikeTuple):
    """A piece of a set's grants held as three columns, which is what the reader makes and the
    engine folds.

    A Grant tuple per grant costs 64 bytes and ~0.2 us to make: for a million grants, a third of
    what a grant holds and ~0.2 s of a cold build, only for the fold to take it apart again. Here
    a Grant is made when someone reads one (an explanation, a diff, a test).
    """

    __slots__ = ("principals", "roles", "scopes")

    def __init__(
        self, principals: Sequence[str], roles: Sequence[tuple[str, ...]], scopes: Sequence[str | None]
    ) -> None:
        if not len(principals) == len(roles) == len(scopes):
            raise ValueError("a grant's columns differ in length")
        self.principals = tuple(principals)
        self.roles = tuple(roles)
        self.scopes = tuple(scopes)

    @classmethod
    def of(cls, grants: Iterable[Grant]) -> GrantColumns:
        rows = tuple(grants)
        if not rows:
            return cls((), (), ())
        principals, roles, scopes = zip(*rows, strict=True)
        return cls(principals, roles, scopes)

    def between(self, start: int, stop: int) -> GrantColumns:
        """The grants from `start` to `stop`, as columns."""
        return GrantColumns(self.principals[start:stop], self.roles[start:stop], self.scopes[start:stop])

    def __len__(self) -> int:
        return len(self.principals)

    def __iter__(self) -> Iterator[Grant]:
        return map(_new_grant, zip(self.principals, self.roles, self.scopes, strict=True))

    @overload
    def __getitem__(self, index: int) -> Grant: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Grant, ...]: ...

    def __getitem__(self, index: int | slice) -> Grant | tuple[Grant, ...]:
        if isinstance(index, slice):
            rows = zip(self.principals[index], self.roles[index], self.scopes[index], strict=True)
            return tuple(map(_new_grant, rows))
        return _new_grant((self.principals[index], self.roles[index], self.scopes[index]))

    def __repr__(self) -> str:
        return f"GrantColumns({len(self)} grants)"


class Grants(_LikeTuple):
    """A large set's grants as the pieces they were read in, in order.

    One tuple of a million grants is built from a list of as many in one C call (12-61 ms) and
    that list freed in another (15-18 ms), each holding the GIL while Checks wait; pieces of a few
    hundred are built as they are read (as :class:`GrantColumns`, or tuples).
    """

    __slots__ = ("_ends", "pieces")

    def __init__(self, pieces: Iterable[Sequence[Grant]]) -> None:
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
    def __getitem__(self, index: slice) -> Sequence[Grant]: ...

    def __getitem__(self, index: int | slice) -> Grant | Sequence[Grant]:
        size = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(size)
            if step != 1:
                return tuple(self)[index]
            at = bisect_right(self._ends, start)
            if at < len(self.pieces) and self._ends[at] - len(self.pieces[at]) == start and self._ends[at] == stop:
                # Exactly one piece (a child set reusing its parent's): that piece, not a copy.
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

    def __repr__(self) -> str:
        return f"Grants({len(self)} in {len(self.pieces)} pieces)"


def looked_up(keys: Sequence[_K], known: dict[_K, _V], learn: Callable[[_K, int], _V]) -> list[_V]:
    """`known[key]` for each of `keys`, a column of a piece (one C pass when all are known), learning
    those that are not with `learn(key, index of its first occurrence)`, in the order they first
    occur: most of a large set's grants share a few role lists and scopes."""
    try:
        return list(map(known.__getitem__, keys))
    except KeyError:
        for key in [k for k in dict.fromkeys(keys) if k not in known]:
            known[key] = learn(key, keys.index(key))
        return list(map(known.__getitem__, keys))


def grant_rows(grants: Iterable[Grant]) -> Iterator[tuple[str, tuple[str, ...], str | None]]:
    """Each grant as a plain (principal, roles, scope) tuple, for a loop that takes it apart at
    once: a large set's columns are zipped, not made into a Grant each."""
    return chain.from_iterable(
        zip(piece.principals, piece.roles, piece.scopes, strict=True) for piece in grant_columns(grants)
    )


def grant_columns(grants: Iterable[Grant]) -> Iterator[GrantColumns]:
    """`grants` a piece at a time, as columns: a large set's own pieces, anything else (a set read
    whole, a list) in pieces of at most 10,000, so that whoever scans a set a piece at a
    time never takes on a million grants in one step."""
    for part in grants.pieces if isinstance(grants, Grants) else (grants,):
        if isinstance(part, GrantColumns):
            for at in range(0, len(part), _STEP):
                yield part if len(part) <= _STEP else part.between(at, at + _STEP)
        else:
            rows = iter(part)
            while piece := GrantColumns.of(islice(rows, _STEP)):
                yield piece


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
