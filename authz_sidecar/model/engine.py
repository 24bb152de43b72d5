"""The decision engine: a permission set compiled once, then decided against with dict lookups.

Rules (DESIGN section 3), which this module is the only implementation of:

1. Additive only: a principal's handles are the union of its grants' roles' handles.
2. No wildcards or magic words: those are refused when documents are parsed, so a handle here
   always means exactly itself.
3. A decision is a pure function of (set, principal, handle, scope); unknown principal or missing
   handle denies with a reason.
4. A scoped grant applies only in its scope; an unscoped grant applies in every scope.

Compiling turns grants into frozensets per principal (one for unscoped grants, one per scope), so a
decision is two or three hash lookups and no allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import chain, compress, filterfalse, islice
from operator import is_not, itemgetter, not_
from typing import Any, TypeVar

from authz_sidecar.model.pacing import pause
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.values import DeclaredChange, Grant, Metadata, PermissionSet, grant_columns, looked_up

_EMPTY: frozenset[str] = frozenset()
_K = TypeVar("_K")
_PRINCIPAL = itemgetter(0)


# A compiled set's dicts are split by the principal's hash into this many shards (a power of two),
# so that no step of building, copying, comparing or dropping one touches more than ~1/1024 of a
# large set while holding the GIL: a dict of a million entries resizes, copies or frees in one C
# call of 20-60 ms, which every Check waiting for the GIL would feel. (At 64 shards, comparing the
# keys of one shard of two million-grant sets sharing nothing took 8-20 ms in one C call, the
# principals' strings scattered over the heap; at 256, 2.6 ms median, 11 ms the longest. At 1024,
# with those comparisons a chunk of keys at a time, a thread waiting for the GIL during such a
# build waited 0.53-0.57 ms at the 99th percentile, against 0.71-0.73 at 256: bench/holds.py's
# sampler, docs/performance.md.) A lookup costs one hash() more; building, memory and the time to
# take a change are the same at 256 and 1024 (bench/scale.py).
SHARDS = 1024
_MASK = SHARDS - 1

Unscoped = tuple[dict[str, frozenset[str]], ...]
Scoped = tuple[dict[tuple[str, str], frozenset[str]], ...]
Intern = Callable[[frozenset[str]], frozenset[str]]
# One piece of grants into the shards (engine._fold_piece, or _fold.fold: the same in C).
FoldPiece = Callable[
    [Sequence[str], Sequence[frozenset[str]], Sequence[str | None], Unscoped, Scoped, Intern, int], None
]


def shard(principal: str) -> int:
    """The shard a principal's entries are in (the same for its unscoped and scoped ones)."""
    return hash(principal) & _MASK


def _shards() -> tuple[dict[Any, frozenset[str]], ...]:
    return tuple({} for _ in range(SHARDS))


@dataclass(frozen=True, slots=True)
class CompiledSet:
    """One permission set, ready to decide. Immutable; shared by every request that reads it.

    It keeps no reference to the parsed document, so a snapshot of a million grants holds only the
    compiled dicts. Scoped grants are keyed by (principal, scope) rather than nested per principal:
    one tuple per scoped grant is smaller than a dict per principal, and it lets :func:`impact`
    compare two sets with C-level set operations over their items. Both are split into
    :data:`SHARDS` dicts by the principal's hash (:func:`shard`).
    """

    meta: Metadata
    unscoped: Unscoped
    scoped: Scoped
    # Principals whose every grant is scoped: they are known (a missing permission, not an unknown
    # principal) though absent from `unscoped`.
    scoped_only: frozenset[str]

    @property
    def version(self) -> str:
        return self.meta.version

    def decide(self, principal: str, handle: str, scope: str | None) -> Reason:
        """ALLOWED if an unscoped grant or a grant in `scope` carries `handle`; otherwise why not."""
        at = hash(principal) & _MASK
        held = self.unscoped[at].get(principal)
        if held is not None and handle in held:
            return Reason.ALLOWED
        if scope:
            in_scope = self.scoped[at].get((principal, scope))
            if in_scope is not None and handle in in_scope:
                return Reason.ALLOWED
        if held is None and principal not in self.scoped_only:
            return Reason.UNKNOWN_PRINCIPAL
        return Reason.MISSING_PERMISSION

    def held(self, principal: str, scope: str | None = None) -> frozenset[str]:
        """The handles `principal` holds unscoped, or (with `scope`) by its grants in that scope alone."""
        at = hash(principal) & _MASK
        if scope is None:
            return self.unscoped[at].get(principal, _EMPTY)
        return self.scoped[at].get((principal, scope), _EMPTY)

    def principals(self) -> frozenset[str]:
        return frozenset().union(*self.unscoped) | self.scoped_only

    def drain(self) -> Iterator[None]:
        """Empty the shards one per step. Only for whoever holds the last reference (no one else
        can see it emptied): a million-grant set freed at once holds the GIL for tens of ms."""
        return _drain(self.unscoped, self.scoped)

    def unscoped_items(self) -> Iterator[tuple[str, frozenset[str]]]:
        return chain.from_iterable(d.items() for d in self.unscoped)

    def scoped_items(self) -> Iterator[tuple[tuple[str, str], frozenset[str]]]:
        return chain.from_iterable(d.items() for d in self.scoped)


def _every_shard(unscoped: Unscoped, scoped: Scoped) -> tuple[dict[Any, frozenset[str]], ...]:
    """The unscoped shards, then the scoped ones."""
    return (*unscoped, *scoped)


def _drain(unscoped: Unscoped, scoped: Scoped) -> Iterator[None]:
    for part in _every_shard(unscoped, scoped):
        part.clear()
        yield


class Interner:
    """One frozenset object per distinct handle set. With many grants most principals hold one of a
    few role combinations, so sharing keeps memory per grant small; shared across the sets of a
    snapshot, it also lets :func:`impact` skip a principal whose answer did not change by identity."""

    def __init__(self) -> None:
        self._sets: dict[frozenset[str], frozenset[str]] = {}

    def __call__(self, handles: frozenset[str]) -> frozenset[str]:
        return self._sets.setdefault(handles, handles)

    def __len__(self) -> int:
        return len(self._sets)

    def keep(self, sets: Iterable[CompiledSet]) -> None:
        """Forget handle sets that none of `sets` uses, so versions that came and went do not
        accumulate."""
        used: set[frozenset[str]] = set()
        for compiled in sets:
            for part in _every_shard(compiled.unscoped, compiled.scoped):
                pause()
                used.update(part.values())  # in C: each is an interned set, its hash cached
        self._sets = {held: held for held in used}


class Predicted(AbstractSet[tuple[str, str, str | None]]):
    """A predicted impact: the set of (principal, handle, scope) answers a change alters, a scope
    of None standing for the unscoped grants.

    Held per principal (and per scoped grant) as the frozenset of handles whose answer moves, in
    :data:`SHARDS` dicts like a compiled set's, rather than as one frozenset of triples: a set
    sharing nothing with the active one alters ~3 million answers of a million-grant set, and
    that frozenset took seconds to build one tuple at a time, resized in single C calls of 50-90 ms
    as it grew, and was freed in one go of ~0.6 s, each holding the GIL while Checks waited. Here
    the handle sets are shared by every principal whose answers moved alike, and no step touches
    more than one shard. Compares equal to the frozenset of the same triples.
    """

    __slots__ = ("_len", "scoped", "unscoped")

    def __init__(self, unscoped: Unscoped, scoped: Scoped) -> None:
        self.unscoped = unscoped
        self.scoped = scoped
        self._len = 0
        for part in _every_shard(unscoped, scoped):
            pause()
            self._len += sum(map(len, part.values()))

    def predicts(self, principal: str, handle: str, scope: str | None) -> bool:
        """Whether the answer for `handle` moves for `principal` unscoped, or (given a scope)
        in `scope`: what a disagreement seen on live traffic is checked against."""
        at = hash(principal) & _MASK
        if handle in self.unscoped[at].get(principal, _EMPTY):
            return True
        return scope is not None and handle in self.scoped[at].get((principal, scope), _EMPTY)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 3:
            return False
        principal, handle, scope = item
        if not isinstance(principal, str):
            return False
        at = hash(principal) & _MASK
        if scope is None:
            return handle in self.unscoped[at].get(principal, _EMPTY)
        return handle in self.scoped[at].get((principal, scope), _EMPTY)

    def __iter__(self) -> Iterator[tuple[str, str, str | None]]:
        for part in self.unscoped:
            for principal, handles in part.items():
                for handle in handles:
                    yield principal, handle, None
        for scoped_part in self.scoped:
            for (principal, scope), handles in scoped_part.items():
                for handle in handles:
                    yield principal, handle, scope

    def __len__(self) -> int:
        return self._len

    def drain(self) -> Iterator[None]:
        """Empty the shards one per step; as :meth:`CompiledSet.drain`."""
        return _drain(self.unscoped, self.scoped)

    def __hash__(self) -> int:
        # The frozenset's, as it compares equal to one (walks every triple: nothing hashes it now).
        return hash(frozenset(self))

    @classmethod
    def _from_iterable(cls, it: Iterable[tuple[str, str, str | None]]) -> frozenset[tuple[str, str, str | None]]:  # type: ignore[override]
        """What set operations (`-`, `&`, `|`) return: a plain frozenset."""
        return frozenset(it)


def compile_set(permissions: PermissionSet, interner: Interner | None = None) -> CompiledSet:
    """Fold grants into per-principal frozensets; the order of roles and grants cannot matter."""
    intern = interner if interner is not None else Interner()
    unscoped, scoped = _fold(permissions.grants, permissions.roles, intern)
    scoped_only: set[str] = set()
    principal_of = itemgetter(0)
    for held, part in zip(unscoped, scoped, strict=True):  # a principal's entries share a shard
        pause()
        scoped_only.update(set(map(principal_of, part)).difference(held))  # C passes, no generator
    return CompiledSet(meta=permissions.meta, unscoped=unscoped, scoped=scoped, scoped_only=frozenset(scoped_only))


def _fold(grants: Iterable[Grant], roles: Mapping[str, tuple[str, ...]], intern: Interner) -> tuple[Unscoped, Scoped]:
    """Grants folded into the unscoped and scoped shards (the body of :func:`compile_set`).

    A piece's role combinations are turned into handle sets with one map in C (`looked_up`), and
    its grants go into their shards in one more C call (:func:`_fold_piece`)."""
    by_roles: dict[tuple[str, ...], frozenset[str]] = {}
    unscoped: Unscoped = _shards()
    scoped: Scoped = _shards()

    def handles_of(names: tuple[str, ...], _at: int) -> frozenset[str]:
        return intern(frozenset(h for role in names for h in roles[role]))

    for piece in grant_columns(grants):
        pause()
        handle_sets = looked_up(piece.roles, by_roles, handles_of)
        fold_piece(piece.principals, handle_sets, piece.scopes, unscoped, scoped, intern, _MASK)
    return unscoped, scoped


def _fold_piece(  # noqa: PLR0917 - the C function's signature (positional, one fast call per piece)
    principals: Sequence[str],
    handle_sets: Sequence[frozenset[str]],
    scopes: Sequence[str | None],
    unscoped: Unscoped,
    scoped: Scoped,
    intern: Intern,
    mask: int,
) -> None:
    """One piece's grants into the shards; `_fold.fold` is this loop in C (a third of a cold
    million-grant build in Python). `setdefault` returns the handles just stored unless the
    principal already held some (a second grant)."""
    for principal, handles, scope in zip(principals, handle_sets, scopes, strict=True):
        if scope is None:
            part = unscoped[hash(principal) & mask]
            held = part.setdefault(principal, handles)
            if held is not handles:
                part[principal] = intern(held | handles)
        else:
            key = (principal, scope)
            scoped_part = scoped[hash(principal) & mask]
            held = scoped_part.setdefault(key, handles)
            if held is not handles:
                scoped_part[key] = intern(held | handles)


fold_piece: FoldPiece
try:
    from authz_sidecar.model import _fold as in_c

    fold_piece = in_c.fold
except ImportError:  # installed without a C compiler: the same loop in Python
    fold_piece = _fold_piece


def changed_roles(before: Mapping[str, tuple[str, ...]], after: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
    """Roles defined differently (or only on one side): whoever holds one may answer differently."""
    return frozenset(
        r for r in before.keys() | after.keys() if frozenset(before.get(r, ())) != frozenset(after.get(r, ()))
    )


def principals_holding(grants: Sequence[Grant], roles: frozenset[str]) -> set[str]:
    """The principals with a grant that names one of `roles` (C-level passes, a piece at a time)."""
    found: set[str] = set()
    if not roles:
        return found
    names: set[tuple[str, ...]] = set()
    for piece in grant_columns(grants):
        pause()
        names.update(piece.roles)
    holding = {n for n in names if not roles.isdisjoint(n)}
    for piece in grant_columns(grants):
        pause()
        found.update(compress(piece.principals, map(holding.__contains__, piece.roles)))
    return found


def grants_of(grants: Sequence[Grant], principals: Collection[str]) -> list[Grant]:
    """Every grant of `principals`, in order (C-level passes, a piece at a time)."""
    found: list[Grant] = []
    if principals:
        wanted = principals if isinstance(principals, set | frozenset) else set(principals)
        for piece in grant_columns(grants):
            pause()
            for at in compress(range(len(piece)), map(wanted.__contains__, piece.principals)):
                found.append(piece[at])
    return found


def _keys_of(scoped: Scoped, principals: Collection[str]) -> list[tuple[str, str]]:
    """The scoped keys of `principals`: only the shards they are in are looked through."""
    found: list[tuple[str, str]] = []
    for at in sorted({hash(p) & _MASK for p in principals}):
        found.extend(_keys_in(scoped[at], principals))
    return found


def _keys_in(part: Mapping[tuple[str, str], frozenset[str]], principals: Collection[str]) -> list[tuple[str, str]]:
    """The keys of one scoped shard that belong to `principals`."""
    keys = list(part)
    return list(compress(keys, map(principals.__contains__, map(_PRINCIPAL, keys))))


def recompile(
    parent: CompiledSet,
    permissions: PermissionSet,
    principals: Collection[str],
    grants: Iterable[Grant],
    interner: Interner | None = None,
) -> CompiledSet:
    """`permissions` compiled from `parent`, the compiled set it differs from only in what
    `principals` hold: `grants` are all of their grants in `permissions` (whatever their roles'
    definitions; a role defined differently counts its holders among `principals`).

    The parent's shards are copied in C, one at a time, and only those principals' entries are
    folded again, so a change to a few principals of a million costs milliseconds; the answers are
    those of :func:`compile_set` (tests/test_engine_properties.py compares them on random sets
    and changes).
    """
    intern = interner if interner is not None else Interner()
    moved = principals if isinstance(principals, set | frozenset) else set(principals)
    unscoped_part, scoped_part = _fold(grants, permissions.roles, intern)
    unscoped = tuple(_copies(parent.unscoped))
    scoped = tuple(_copies(parent.scoped))
    for principal in moved:
        at = hash(principal) & _MASK
        if principal not in unscoped_part[at]:
            unscoped[at].pop(principal, None)
    for key in _keys_of(parent.scoped, moved):
        at = hash(key[0]) & _MASK
        if key not in scoped_part[at]:
            del scoped[at][key]
    for into, part in zip(unscoped, unscoped_part, strict=True):
        into.update(part)
    for scoped_into, scoped_new in zip(scoped, scoped_part, strict=True):
        scoped_into.update(scoped_new)
    added = {p for d in scoped_part for p, _ in d if p not in unscoped[hash(p) & _MASK]}
    scoped_only = parent.scoped_only
    gone = {p for p in moved if p in scoped_only and p not in added}
    if gone or not added <= scoped_only:
        # Copying the parent's (a tenth of a million principals in one C call, 10-16 ms) only
        # when what it holds changes.
        scoped_only = (scoped_only - gone) | added
    return CompiledSet(meta=permissions.meta, unscoped=unscoped, scoped=scoped, scoped_only=scoped_only)


def _copies(shards: Iterable[dict[_K, frozenset[str]]]) -> Iterator[dict[_K, frozenset[str]]]:
    for part in shards:
        pause()
        yield part.copy()


def impact_of(active: CompiledSet, proposed: CompiledSet, principals: Collection[str]) -> Predicted:
    """:func:`predict` when only `principals` can answer differently (what :func:`recompile` was
    told): their entries are compared and nobody else's."""
    by_shard: list[set[str]] = [set() for _ in range(SHARDS)]
    for principal in principals:
        by_shard[hash(principal) & _MASK].add(principal)
    return _changes(active, proposed, by_shard, [set() for _ in range(SHARDS)])


def _changes(
    active: CompiledSet,
    proposed: CompiledSet,
    principals: Sequence[set[str]],
    keys: Sequence[set[tuple[str, str]]],
) -> Predicted:
    """The answers that differ between the two sets for `principals` (unscoped, and in every scope
    either set gives them) and for the scoped grants `keys`, both given per shard: one shard is
    compared at a time, and what differs is kept per principal (and per scoped grant) as one
    interned frozenset of handles, shared by everyone whose answers moved alike, so the work is a
    dict lookup per principal rather than a tuple per changed answer. The callers' sets are
    extended and emptied here, a shard at a time: freed together on return, two million entries
    held the GIL 40 ms (seen in the sidecar)."""
    xors: dict[tuple[frozenset[str], frozenset[str]], frozenset[str]] = {}
    unions: dict[tuple[frozenset[str], frozenset[str]], frozenset[str]] = {}

    def differ(old: frozenset[str], new: frozenset[str]) -> frozenset[str]:
        found = xors.get((old, new))
        if found is None:
            found = xors[(old, new)] = old ^ new
        return found

    unscoped: Unscoped = _shards()
    scoped: Scoped = _shards()
    for at in range(SHARDS):
        pause()
        moved, moved_keys = principals[at], keys[at]
        before, after = active.unscoped[at], proposed.unscoped[at]
        into = unscoped[at]
        for principal in _paced(moved):
            old, new = before.get(principal, _EMPTY), after.get(principal, _EMPTY)
            if old is not new:
                handles = differ(old, new)
                if handles:
                    into[principal] = handles
        # A scoped answer is the scope's grants plus the unscoped ones: it moves when either does.
        if moved:
            moved_keys.update(_keys_in(active.scoped[at], moved))
            moved_keys.update(_keys_in(proposed.scoped[at], moved))
        scoped_before, scoped_after, scoped_into = active.scoped[at], proposed.scoped[at], scoped[at]
        for key in _paced(moved_keys):
            principal = key[0]
            old = _union(scoped_before.get(key, _EMPTY), before.get(principal, _EMPTY), unions)
            new = _union(scoped_after.get(key, _EMPTY), after.get(principal, _EMPTY), unions)
            if old is not new:
                handles = differ(old, new)
                if handles:
                    scoped_into[key] = handles
        moved.clear()
        moved_keys.clear()
    return Predicted(unscoped, scoped)


def _paced(items: Iterable[_K], step: int = 1024) -> Iterator[_K]:
    """`items`, with a :func:`pause` after every `step` of them: a shard's loop over the principals
    of two sets sharing nothing is ~30,000 turns (a few ms), too long a stretch between pauses."""
    it = iter(items)
    while batch := list(islice(it, step)):
        pause()
        yield from batch


def _union(
    scoped: frozenset[str], unscoped: frozenset[str], memo: dict[tuple[frozenset[str], frozenset[str]], frozenset[str]]
) -> frozenset[str]:
    """scoped | unscoped, one object per distinct pair (so that equal answers are found by identity)."""
    found = memo.get((scoped, unscoped))
    if found is None:
        found = memo[(scoped, unscoped)] = scoped | unscoped
    return found


def declared_compiled(
    active: PermissionSet, compiled: CompiledSet, proposal: PermissionSet, interner: Interner | None = None
) -> tuple[CompiledSet, frozenset[str]]:
    """:func:`declared` compiled, from the active set's compiled form: the principals the declared
    changes name, and the holders of the roles they edit, are folded again and nobody else.
    Returns the compiled set and those principals (whose entries :func:`impact_of` compares).

    Every declared change acts on one principal's grants or on one role, so applying the changes
    to those principals' grants alone gives their grants in :func:`declared`'s result."""
    named = {c.principal for c in proposal.changes if c.principal}
    edited = frozenset(c.role for c in proposal.changes if c.role and not c.principal)
    moved = named | principals_holding(active.grants, edited)
    own = PermissionSet(roles=active.roles, grants=tuple(grants_of(active.grants, moved)), meta=proposal.meta)
    meant = declared(own, proposal)
    moved |= principals_holding(meant.grants, changed_roles(active.roles, meant.roles))
    return recompile(compiled, meant, moved, meant.grants, interner), frozenset(moved)


def impact(active: CompiledSet, proposed: CompiledSet) -> frozenset[tuple[str, str, str | None]]:
    """(principal, handle, scope) triples whose answer differs between the two sets: :func:`predict`
    as one frozenset, for callers that take it whole (plans, the controller)."""
    return frozenset(predict(active, proposed))


def predict(active: CompiledSet, proposed: CompiledSet) -> Predicted:
    """The (principal, handle, scope) answers that differ between the two sets; a scope of None
    stands for the unscoped grants. This is the change's predicted impact: a disagreement seen on
    live traffic that is in it was expected; one that is not was not.

    Only principals whose grants differ are visited: the items of the two sets' dicts are compared
    in C, a shard at a time, which is what keeps a rebuild of a million-grant snapshot within
    seconds and each step within 1/SHARDS of it.
    """
    moved = [_differing(before, after) for before, after in zip(active.unscoped, proposed.unscoped, strict=True)]
    moved_scoped = [_differing(before, after) for before, after in zip(active.scoped, proposed.scoped, strict=True)]
    return _changes(active, proposed, moved, moved_scoped)


# Keys of a shard looked up in the other set to guess whether the two share most of them.
_SAMPLE = 16
# Keys taken at a time by one C call when comparing shards that share few (~0.1 ms).
_CHUNK = 512


def _differing(before: Mapping[_K, frozenset[str]], after: Mapping[_K, frozenset[str]]) -> set[_K]:
    """The keys of one shard whose values are not the same object in both, in a few C-level
    passes. For shards of as many keys, most of a sample of them common (a guess: a wrong one
    costs time, never an answer), their items are compared (a tuple per entry but
    only the differing ones kept: 0.47 s for two million-grant sets one grant apart); for shards
    mostly of different keys, those keys are taken as they are and only the common ones' values
    compared (comparing items there kept a tuple per entry: 13-37 ms per 64th of two sets sharing
    nothing, one C call)."""
    pause()
    sample = list(islice(before, _SAMPLE))
    if len(before) == len(after) and sum(map(after.__contains__, sample)) * 2 > len(sample):
        return {key for key, _ in before.items() ^ after.items()}
    # A chunk of keys at a time: over a whole shard of two sets sharing nothing, each set
    # operation was one C call of ~1.7 ms at 256 shards (~0.7 at 1024), a wait for any Check.
    found: set[_K] = set()
    common: list[_K] = []
    # (A pause between chunks: a whole shard's pass is a few ms.)
    keys = iter(before)
    while chunk := list(islice(keys, _CHUNK)):
        pause()
        there = list(map(after.__contains__, chunk))
        found.update(compress(chunk, map(not_, there)))
        common.extend(compress(chunk, there))
    keys = iter(after)
    while chunk := list(islice(keys, _CHUNK)):
        pause()
        found.update(filterfalse(before.__contains__, chunk))
    for at in range(0, len(common), _CHUNK):
        pause()
        chunk = common[at : at + _CHUNK]
        found.update(compress(chunk, map(is_not, map(before.__getitem__, chunk), map(after.__getitem__, chunk))))
    return found


def _moved(grants: list[Grant], change: DeclaredChange) -> list[Grant]:
    """The grants with `change.role` moved, for `change.principal`, from its grant in
    `change.scope` (empty: unscoped) to one in `change.to`."""
    source = change.scope or None
    kept: list[Grant] = []
    moved = False
    for grant in grants:
        if grant.principal == change.principal and grant.scope == source and change.role in grant.roles:
            remaining = tuple(r for r in grant.roles if r != change.role)
            if remaining:
                kept.append(Grant(grant.principal, remaining, grant.scope))
            moved = True
        else:
            kept.append(grant)
    if moved:
        kept.append(Grant(change.principal, (change.role,), change.to))
    return kept


def declared(active: PermissionSet, proposal: PermissionSet) -> PermissionSet:
    """The active set with only the changes `proposal` declares applied: what the proposer meant.

    Its impact against the active set is the predicted impact; a disagreement the real proposal
    shows beyond it is unexpected (a role edited by mistake, a grant lost in a copy). Without
    declared changes the proposal itself is what was meant.
    """
    if not proposal.changes:
        return proposal
    roles = {name: list(handles) for name, handles in active.roles.items()}
    grants = list(active.grants)
    for change in proposal.changes:
        if change.role and change.principal:
            grants = _moved(grants, change)
        elif change.role and change.delete:
            roles.pop(change.role, None)
        elif change.role:
            held = [h for h in roles.get(change.role, list(change.create)) if h not in change.remove]
            roles[change.role] = held + [h for h in (*change.create, *change.add) if h not in held]
        else:
            revoked = set(change.revoke)
            kept = []
            for grant in grants:
                if grant.principal == change.principal and grant.scope is None and revoked & set(grant.roles):
                    remaining = tuple(r for r in grant.roles if r not in revoked)
                    if remaining:
                        kept.append(Grant(grant.principal, remaining, None))
                else:
                    kept.append(grant)
            grants = kept
            if change.grant:
                grants.append(Grant(change.principal, change.grant, None))
    # A deleted (or never defined) role leaves the grants that held it; a grant left with no role goes.
    known = set(roles)
    grants = [
        g if set(g.roles) <= known else Grant(g.principal, tuple(r for r in g.roles if r in known), g.scope)
        for g in grants
    ]
    grants = [g for g in grants if g.roles]
    return PermissionSet(roles={k: tuple(v) for k, v in roles.items()}, grants=tuple(grants), meta=proposal.meta)
