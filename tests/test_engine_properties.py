"""The model's rules as properties: additive, order-free, scoped, and free of wildcards."""

from __future__ import annotations

import random
from collections.abc import Set as AbstractSet

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_sidecar.documents import parse_permission_set
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.engine import (
    CompiledSet,
    Interner,
    Predicted,
    _differing,
    changed_roles,
    compile_set,
    declared,
    declared_compiled,
    grants_of,
    impact,
    impact_of,
    predict,
    principals_holding,
    recompile,
)
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.values import DeclaredChange, Grant, PermissionSet

HANDLES = ["a:view", "a:edit", "b:view", "b:edit:locked", "c:run"]
PRINCIPALS = ["p0", "p1", "p2", "p3"]
SCOPES = [None, "account:x", "account:y"]
ROLE_NAMES = ["r0", "r1", "r2", "r3"]

roles_st = st.fixed_dictionaries(
    {name: st.lists(st.sampled_from(HANDLES), min_size=1, max_size=4, unique=True) for name in ROLE_NAMES}
)
grant_st = st.builds(
    Grant,
    principal=st.sampled_from(PRINCIPALS),
    roles=st.lists(st.sampled_from(ROLE_NAMES), min_size=1, max_size=3, unique=True).map(tuple),
    scope=st.sampled_from(SCOPES),
)


def make(roles: dict[str, list[str]], grants: list[Grant]) -> PermissionSet:
    return PermissionSet(roles={k: tuple(v) for k, v in roles.items()}, grants=tuple(grants))


def decisions(ps: PermissionSet) -> dict[tuple[str, str, str | None], bool]:
    compiled = compile_set(ps)
    return {
        (p, h, s): compiled.decide(p, h, s) is Reason.ALLOWED
        for p in [*PRINCIPALS, "stranger"]
        for h in HANDLES
        for s in SCOPES
    }


@given(roles_st, st.lists(grant_st, max_size=8), grant_st)
def test_adding_a_grant_never_removes_a_permission(
    roles: dict[str, list[str]], grants: list[Grant], extra: Grant
) -> None:
    before = decisions(make(roles, grants))
    after = decisions(make(roles, [*grants, extra]))
    assert all(after[key] for key, allowed in before.items() if allowed)


@given(roles_st, st.lists(grant_st, max_size=8), st.randoms(use_true_random=False))
def test_order_of_roles_and_grants_never_changes_a_decision(
    roles: dict[str, list[str]], grants: list[Grant], rnd: random.Random
) -> None:
    shuffled_roles = dict(rnd.sample(list(roles.items()), len(roles)))
    shuffled_roles = {k: rnd.sample(v, len(v)) for k, v in shuffled_roles.items()}
    shuffled_grants = [
        Grant(g.principal, tuple(rnd.sample(g.roles, len(g.roles))), g.scope) for g in rnd.sample(grants, len(grants))
    ]
    assert decisions(make(roles, grants)) == decisions(make(shuffled_roles, shuffled_grants))


@given(roles_st, st.lists(grant_st, max_size=8))
def test_scoped_grant_applies_only_in_its_scope(roles: dict[str, list[str]], grants: list[Grant]) -> None:
    """Allowed without a scope implies an unscoped grant, which then allows in every scope."""
    result = decisions(make(roles, grants))
    for (p, h, s), allowed in result.items():
        if s is None and allowed:
            assert all(result[(p, h, other)] for other in SCOPES)
    scoped_only = [g for g in grants if g.scope is not None]
    only = decisions(make(roles, scoped_only))
    assert not any(allowed for (_p, _h, s), allowed in only.items() if s is None)


@given(roles_st, st.lists(grant_st, max_size=6), st.lists(grant_st, max_size=6))
def test_impact_is_exactly_the_changed_decisions(roles: dict[str, list[str]], a: list[Grant], b: list[Grant]) -> None:
    """A request whose answer differs between two sets is in the predicted impact, and every
    predicted triple is an answer that differs (compiled with separate or shared interners)."""
    before, after = make(roles, a), make(roles, b)
    shared = Interner()
    predicted = impact(compile_set(before), compile_set(after))
    assert impact(compile_set(before, shared), compile_set(after, shared)) == predicted
    da, db = decisions(before), decisions(after)
    for (p, h, s), allowed in da.items():
        if allowed != db[(p, h, s)]:
            assert (p, h, None) in predicted or (p, h, s) in predicted
    compiled_before, compiled_after = compile_set(before), compile_set(after)
    for p, h, s in predicted:
        was = compiled_before.decide(p, h, s) is Reason.ALLOWED
        assert was != (compiled_after.decide(p, h, s) is Reason.ALLOWED)
    # Held per principal, it is the same set of triples, and answers what the sidecar asks of it
    # as membership in that set would.
    held: AbstractSet[tuple[str, str, str | None]] = predict(compile_set(before, shared), compile_set(after, shared))
    assert held == predicted and predicted == held and len(held) == len(predicted)
    assert set(held) == predicted and held - predicted == frozenset()
    assert hash(held) == hash(predicted)
    assert isinstance(held, Predicted)
    for p, h, s in da:
        assert held.predicts(p, h, s) == ((p, h, None) in predicted or (s is not None and (p, h, s) in predicted))
        assert ((p, h, s) in held) == ((p, h, s) in predicted)


def test_unknown_principal_and_missing_permission_are_distinct_reasons() -> None:
    compiled = compile_set(
        make({"r0": ["a:view"], "r1": ["a:edit"], "r2": ["c:run"], "r3": ["a:view"]}, [Grant("p0", ("r0",))])
    )
    assert compiled.decide("p0", "a:view", None) is Reason.ALLOWED
    assert compiled.decide("p0", "a:edit", None) is Reason.MISSING_PERMISSION
    assert compiled.decide("nobody", "a:view", None) is Reason.UNKNOWN_PRINCIPAL


segment = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
magic = st.sampled_from(["*", "all", "any", "manage", "x*", "*y"])


@settings(max_examples=200)
@given(
    st.lists(st.one_of(segment, magic), min_size=1, max_size=3).filter(
        lambda parts: any(p in {"*", "all", "any", "manage"} or "*" in p for p in parts)
    )
)
def test_no_wildcard_or_magic_word_is_ever_accepted(parts: list[str]) -> None:
    handle = ":".join(parts)
    with pytest.raises(DocumentError):
        parse_permission_set({"roles": {"r": [handle]}, "grants": []}, "s")


@given(magic)
def test_no_magic_scope_or_principal_is_accepted(word: str) -> None:
    """A grant cannot cover "every account" or "every principal" by a keyword."""
    with pytest.raises(DocumentError, match="not a scope"):
        parse_permission_set(
            {"roles": {"r": ["a:b"]}, "grants": [{"principal": "p", "roles": ["r"], "scope": f"account:{word}"}]}, "s"
        )
    if "*" not in word or word == "*":
        with pytest.raises(DocumentError, match="not a principal"):
            parse_permission_set({"roles": {"r": ["a:b"]}, "grants": [{"principal": word, "roles": ["r"]}]}, "s")


@given(roles_st, st.lists(grant_st, max_size=8))
def test_explain_gives_the_engines_answer_and_names_a_grant_for_every_allow(
    roles: dict[str, list[str]], grants: list[Grant]
) -> None:
    from authz_sidecar.model.explain import NO_GRANT, explain

    ps = make(roles, grants)
    for (principal, handle, scope), allowed in decisions(ps).items():
        why = explain(ps, principal, handle, scope)
        assert why.allowed == allowed
        if allowed:
            assert why.because and all(
                b.grant.principal == principal and b.grant.scope in (None, scope) and handle in ps.roles[b.role]
                for b in why.because
            )
        else:
            assert why.reason().startswith(NO_GRANT)


# Incremental compiles: a set compiled from its parent plus the change answers as one compiled whole.
change_st = st.builds(
    DeclaredChange,
    role=st.sampled_from(["", *ROLE_NAMES, "r9"]),
    add=st.lists(st.sampled_from(HANDLES), max_size=2).map(tuple),
    remove=st.lists(st.sampled_from(HANDLES), max_size=2).map(tuple),
    principal=st.sampled_from(["", *PRINCIPALS]),
    grant=st.lists(st.sampled_from(ROLE_NAMES), max_size=2).map(tuple),
    revoke=st.lists(st.sampled_from(ROLE_NAMES), max_size=2).map(tuple),
    scope=st.sampled_from(["", "account:x"]),
    to=st.sampled_from(["account:x", "account:y"]),
)


def _same(a: CompiledSet, b: CompiledSet) -> None:
    assert a.unscoped == b.unscoped
    assert a.scoped == b.scoped
    assert a.scoped_only == b.scoped_only


@given(roles_st, st.lists(grant_st, max_size=10), roles_st, st.lists(grant_st, max_size=10), st.booleans())
def test_recompile_from_the_parent_equals_compiling_whole(
    roles: dict[str, list[str]], grants: list[Grant], new_roles: dict[str, list[str]], new: list[Grant], edit: bool
) -> None:
    """The child keeps the parent's grants of principals outside the change (p0, p1 only change)."""
    parent = make(roles, grants)
    child_roles = new_roles if edit else roles
    kept = [g for g in grants if g.principal not in ("p0", "p1")]
    added = [g for g in new if g.principal in ("p0", "p1")]
    child = make(child_roles, [*kept, *added])
    moved = {"p0", "p1"} | principals_holding(child.grants, changed_roles(parent.roles, child.roles))
    interner = Interner()
    compiled_parent = compile_set(parent, interner)
    again = recompile(compiled_parent, child, moved, grants_of(child.grants, moved), interner)
    _same(again, compile_set(child))
    assert frozenset(impact_of(compiled_parent, again, moved)) == impact(compiled_parent, compile_set(child))


@given(roles_st, st.lists(grant_st, max_size=10), st.lists(change_st, min_size=1, max_size=4))
def test_declared_compiled_equals_compiling_declared_whole(
    roles: dict[str, list[str]], grants: list[Grant], changes: list[DeclaredChange]
) -> None:
    changes = [c for c in changes if c.role or c.principal]
    active = make(roles, grants)
    proposal = PermissionSet(roles=active.roles, grants=active.grants, changes=tuple(changes))
    compiled = compile_set(active)
    meant, moved = declared_compiled(active, compiled, proposal)
    whole = compile_set(declared(active, proposal))
    _same(meant, whole)
    assert frozenset(impact_of(compiled, meant, moved)) == impact(compiled, whole)


@settings(max_examples=30)
@given(st.integers(0, 1500), st.integers(0, 1500), st.integers(0, 1500), st.randoms(use_true_random=False))
def test_shards_compared_in_chunks_find_exactly_the_keys_that_differ(
    only_before: int, only_after: int, common: int, rnd: random.Random
) -> None:
    """Two shards sharing few keys are compared a chunk of keys at a time (so no C call walks a
    whole shard while Checks wait): the keys found are exactly those on one side only, or whose
    values are not the same object, across chunk boundaries."""
    same, other = frozenset({"a"}), frozenset({"b"})
    before = {f"b{i}": same for i in range(only_before)} | {f"c{i}": same for i in range(common)}
    after = {f"a{i}": same for i in range(only_after)}
    moved = {f"c{i}" for i in range(common) if rnd.random() < 0.3}
    after |= {f"c{i}": other if f"c{i}" in moved else same for i in range(common)}
    expected = (before.keys() ^ after.keys()) | moved
    assert _differing(before, after) == expected
    assert _differing(after, before) == expected
