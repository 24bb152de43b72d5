"""Sets read in pieces (documents/bigsets.py) give what reading them whole gives, or the same refusal."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_sidecar.documents import bigsets, load_document, parse_permission_set
from authz_sidecar.documents.parsers import dump_permission_set
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import DeclaredChange, Grant, GrantColumns, PermissionSet

HANDLES = ["a:view", "a:edit", "b:view", "c:run"]
ROLES = ["r0", "r1", "r2"]
PRINCIPALS = ["p0", "p1", "p2", "p3", "p4", "o'neil", "é", "a}]b", 'q"x', "back\\slash"]
SCOPES = [None, "account:x", "account:y"]


@pytest.fixture(autouse=True, params=["reader in C", "pattern alone"])
def small_pieces(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Pieces of a few grants, so that small documents are cut into many; each test twice, with
    canonical text taken apart by the reader in C and, as where it is not built, by the pattern."""
    monkeypatch.setattr(bigsets, "PIECE", 40)
    if request.param == "pattern alone":
        monkeypatch.setattr(bigsets, "split_in_c", None)
    yield


def whole(document: bytes) -> PermissionSet | str:
    try:
        return parse_permission_set(load_document(document, "doc"), "doc")
    except DocumentError as exc:
        return str(exc)


def pieces(document: bytes, parent: bigsets.BigSet | None = None) -> PermissionSet | str:
    try:
        return bigsets.read_set(document, "doc", parent).permissions
    except DocumentError as exc:
        return str(exc)


grant_st = st.builds(
    Grant,
    principal=st.sampled_from(PRINCIPALS),
    roles=st.lists(st.sampled_from(ROLES), min_size=1, max_size=2).map(tuple),
    scope=st.sampled_from(SCOPES),
)
roles_st = st.fixed_dictionaries(
    {r: st.lists(st.sampled_from(HANDLES), min_size=1, max_size=3).map(tuple) for r in ROLES}
)


def document(roles: Mapping[str, tuple[str, ...]], grants: list[Grant], changes: bool = False) -> bytes:
    declared = (DeclaredChange(principal="p0", grant=("r1",)),) if changes else ()
    return dump_permission_set(PermissionSet(roles=roles, grants=tuple(grants), changes=declared))


@settings(max_examples=200)
@given(roles_st, st.lists(grant_st, max_size=30), st.booleans())
def test_a_canonical_document_reads_the_same_in_pieces(
    roles: dict[str, tuple[str, ...]], grants: list[Grant], changes: bool
) -> None:
    text = document(roles, grants, changes)
    read = bigsets.read_set(text, "doc")
    assert read.permissions == whole(text)
    assert len(grants) < 3 or len(read.pieces) > 1  # it was cut, not read whole


@settings(max_examples=300)
@given(
    roles_st,
    st.lists(grant_st, min_size=1, max_size=20),
    st.integers(min_value=0),
    st.sampled_from(
        [
            b'"principal":"dup",',
            b'"roles":["r0"],',
            b"  ",
            b"\\",
            b"\xff",
            b'"',
            b"}",
            b"{",
            b",",
            b"]",
            b'"scope":null,',
            b'"scope":"account:z",',
            b'"grants":[],',
            b'"other":1,',
            b"\x00",
            # Aimed at the canonical text's fast path (bigsets._piece).
            b'"scope":"",',
            b'"roles":[],',
            b"\x01",
            b"\x7f",
            b"}{",
            b"},",
        ]
    ),
)
def test_any_damage_is_refused_or_read_exactly_as_whole(
    roles: dict[str, tuple[str, ...]], grants: list[Grant], at: int, insert: bytes
) -> None:
    text = document(roles, grants)
    cut = at % (len(text) + 1)
    damaged = text[:cut] + insert + text[cut:]
    assert pieces(damaged) == whole(damaged)


def test_canonical_text_is_taken_apart_without_parsing_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is the one taken for what ctl writes; its grants are held as columns."""
    grants = [Grant(f"p{i}", ("r0", "r1"), None if i % 3 else f"account:{i}") for i in range(30)]
    text = document({"r0": ("a:view",), "r1": ("b:view",)}, grants)
    expected = whole(text)

    def refuse(_text: str) -> list[Any]:
        raise AssertionError("parsed as JSON")

    monkeypatch.setattr(bigsets, "_rows", refuse)
    read = bigsets.read_set(text, "doc")
    assert len(read.pieces) > 1 and read.permissions == expected
    assert all(isinstance(piece, GrantColumns) for piece in read.permissions.grants.pieces)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("find", "replace"),
    [
        (b"},{", b"}{"),  # two grants with no comma between them
        (b"},{", b"},,{"),
        (b'"roles":["r0"]}', b'"roles":["r0"],"scope":""}'),  # an empty scope is not "no scope"
        (b'"roles":["r0"]}', b'"roles":["r0"],"scope":null}'),
        (b'"roles":["r0"]}', b'"roles":[]}'),
        (b'"roles":["r0"]}', b'"roles":["r0","nope"]}'),
        (b'{"principal":"p1"', b'{"principal":"p\\u0031"'),  # an escape: read as JSON
        (b'{"principal":"p1"', b'{"principal":"p\x011"'),  # a raw control character
        (b'{"principal":"p1"', b'{"principal":" p1"'),
        (b'{"principal":"p1","roles":["r0"]}', b'{"roles":["r0"],"principal":"p1"}'),  # another order
    ],
)
def test_text_the_fast_path_cannot_vouch_for_is_read_as_json(find: bytes, replace: bytes) -> None:
    text = document({"r0": ("a:view",)}, [Grant(f"p{i}", ("r0",)) for i in range(6)])
    damaged = text.replace(find, replace, 1)
    assert damaged != text
    assert pieces(damaged) == whole(damaged)


def test_a_missing_comma_is_not_made_up_for_by_a_character_elsewhere() -> None:
    """The lengths alone would add up here: one comma too few, one stray character too many."""
    text = document({"r0": ("a:view",)}, [Grant(f"p{i}", ("r0",)) for i in range(6)])
    damaged = text.replace(b'},{"principal":"p2"', b'}{"principal":"p2"', 1)
    damaged = damaged.replace(b'},{"principal":"p3"', b'},x{"principal":"p3"', 1)
    assert isinstance(whole(damaged), str)
    assert pieces(damaged) == whole(damaged)


def test_a_duplicate_key_in_a_grant_is_refused_as_whole() -> None:
    text = document({"r0": ("a:view",)}, [Grant("p0", ("r0",))] * 10)
    damaged = text.replace(b'{"principal":"p0"', b'{"principal":"p9","principal":"p0"', 1)
    assert pieces(damaged) == whole(damaged) == "doc: duplicate key 'principal'"
    damaged = text.replace(b'"roles":["r0"]}', b'"roles":["r0"],"roles":["r0"]}', 1)
    assert pieces(damaged) == whole(damaged) == "doc: duplicate key 'roles'"


@pytest.mark.parametrize(
    ("find", "replace"),
    [
        # A duplicate spelled with an escape, or with whitespace before its colon: the count of
        # keys written cannot see it, so the piece is parsed strictly.
        (b'{"principal":"p1"', b'{"princip\\u0061l":"p9","principal":"p1"'),
        (b'{"principal":"p1"', b'{"principal" :"p9","principal":"p1"'),
        (b'"roles":["r0"]}', b'"roles" : ["r0"],"roles":["r0"]}'),
        # A duplicate balanced by an unknown key in another grant: refused for one or the other.
        (b'{"principal":"p1"', b'{"principal":"p9","principal":"p1"'),
        (b'{"principal":"p2","roles":["r0"]', b'{"principal":"p2","roles":["r0"],"x":1'),
        # Duplicates inside a value, and grants that are not objects.
        (b'"roles":["r0"]}', b'"roles":[{"a":1,"a":2}]}'),
        (b'{"principal":"p1","roles":["r0"]}', b"1"),
        (b'{"principal":"p1","roles":["r0"]}', b"[]"),
        (b'{"principal":"p1","roles":["r0"]}', b"null"),
    ],
)
def test_keys_the_count_cannot_see_are_read_strictly(find: bytes, replace: bytes) -> None:
    text = document({"r0": ("a:view",)}, [Grant(f"p{i}", ("r0",)) for i in range(4)])
    damaged = text.replace(find, replace, 1)
    assert damaged != text
    assert pieces(damaged) == whole(damaged)
    assert isinstance(whole(damaged), str)


def test_a_duplicate_balanced_by_an_unknown_key_is_refused_as_whole() -> None:
    text = document({"r0": ("a:view",)}, [Grant(f"p{i}", ("r0",)) for i in range(4)])
    damaged = text.replace(b'{"principal":"p1"', b'{"principal":"p9","principal":"p1"', 1)
    damaged = damaged.replace(b'{"principal":"p2","roles":["r0"]', b'{"principal":"p2","roles":["r0"],"x":1', 1)
    assert pieces(damaged) == whole(damaged) == "doc: duplicate key 'principal'"


@pytest.mark.parametrize("tail", [b",}", b", }", b",\n}"])
def test_a_comma_after_the_grants_with_nothing_after_it_is_refused_as_whole(tail: bytes) -> None:
    # Found by the test above: the members after the grants were read as "{" + what follows the
    # comma, an empty object, so the pieces took a document that is not JSON.
    text = document({"r0": ("a:view",)}, [Grant("p0", ("r0",))] * 3)
    damaged = text[:-1] + tail
    assert isinstance(whole(damaged), str)
    assert pieces(damaged) == whole(damaged)


def test_a_document_in_another_form_is_read_whole() -> None:
    data: dict[str, Any] = {"grants": [{"roles": ["r0"], "principal": "p0"}], "roles": {"r0": ["a:view"]}}
    text = json.dumps(data, indent=2).encode()
    read = bigsets.read_set(text, "doc")
    assert read.pieces == ()
    assert read.permissions == whole(text)


edit_st = st.lists(
    st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(min_value=0), grant_st), max_size=4
)


@settings(max_examples=300)
@given(roles_st, st.lists(grant_st, max_size=40), edit_st, st.one_of(st.none(), roles_st), st.booleans())
def test_a_child_read_against_its_parent_is_the_child_and_names_who_changed(
    roles: dict[str, tuple[str, ...]],
    grants: list[Grant],
    edits: list[tuple[str, int, Grant]],
    new_roles: dict[str, tuple[str, ...]] | None,
    drop_role: bool,
) -> None:
    parent = bigsets.read_set(document(roles, grants), "doc")
    changed = list(grants)
    for kind, at, grant in edits:
        where = at % (len(changed) + 1)
        if kind == "insert":
            changed.insert(where, grant)
        elif changed and where < len(changed):
            if kind == "delete":
                del changed[where]
            else:
                changed[where] = grant
    child_roles = dict(new_roles or roles)
    if drop_role:
        child_roles.pop("r2")
    text = document(child_roles, changed)
    read = pieces(text, parent)
    assert read == whole(text)
    if isinstance(read, PermissionSet):
        child = bigsets.read_set(text, "doc", parent)
        if child.changed is None:  # it shares less than half its grants with the parent
            return
        differs = {g.principal for g in set(grants) ^ set(changed)}
        assert differs <= child.changed
        before = {p: Counter(g for g in grants if g.principal == p) for p in PRINCIPALS}
        after = {p: Counter(g for g in changed if g.principal == p) for p in PRINCIPALS}
        assert {p for p in PRINCIPALS if before[p] != after[p]} == child.changed


def test_a_small_change_to_a_large_set_reuses_the_parents_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bigsets, "PIECE", 1024)
    grants = [Grant(f"user-{i}", ("r0",) if i % 2 else ("r1",), None) for i in range(5000)]
    roles = {"r0": ("a:view",), "r1": ("a:edit",)}
    parent = bigsets.read_set(document(roles, grants), "doc")
    grants[2500] = Grant("user-2500", ("r0", "r1"), None)
    del grants[4000]
    grants.insert(100, Grant("newbie", ("r0",), "account:x"))
    child = bigsets.read_set(document(roles, grants), "doc", parent)
    assert child.changed == frozenset({"user-2500", "user-4000", "newbie"})
    reused = sum(1 for p in child.pieces if any(p.digest == q.digest for q in parent.pieces))
    assert reused >= len(parent.pieces) - 4
    other = [Grant(f"other-{i}", ("r0",), None) for i in range(5000)]
    assert bigsets.read_set(document(roles, other), "doc", parent).changed is None


def test_reading_makes_no_grant_per_grant(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large set's grants stay in columns through the read, cold or against a parent, whether
    the child shares most of it or nothing: a Grant made per grant read would be a million fresh
    tuples to free (one C call of ~70 ms, holding the GIL, for a set sharing nothing)."""
    monkeypatch.setattr(bigsets, "PIECE", 1024)
    roles = {"r0": ("a:view",), "r1": ("a:edit",)}
    grants = [Grant(f"user-{i}", ("r0",) if i % 2 else ("r1",), None if i % 5 else "account:x") for i in range(3000)]
    other = [Grant(f"other-{i}", ("r0",), None) for i in range(3000)]
    changed = [*grants[:1000], Grant("newbie", ("r1",), None), *grants[1001:]]
    expected = {name: whole(document(roles, g)) for name, g in (("other", other), ("changed", changed))}

    def made(*_args: object) -> None:
        raise AssertionError("a Grant was made")

    monkeypatch.setattr(GrantColumns, "__iter__", made)
    monkeypatch.setattr(GrantColumns, "__getitem__", made)
    parent = bigsets.read_set(document(roles, grants), "doc")
    disjoint = bigsets.read_set(document(roles, other), "doc", parent)
    child = bigsets.read_set(document(roles, changed), "doc", parent)
    assert disjoint.changed is None and child.changed == frozenset({"user-1000", "newbie"})
    monkeypatch.undo()
    assert disjoint.permissions == expected["other"] and child.permissions == expected["changed"]


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 4095, 32 * 1024 + 5])
def test_a_piece_is_hashed_in_slices_hashlib_keeps_the_gil_for(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Given 2048 bytes or more, hashlib lets the GIL go for the hash and takes it back at once,
    which starved a thread waiting for the GIL beside a cold build (docs/performance.md, "Eighth
    round"): a piece's digest is the SHA-256 of all its bytes, fed in smaller slices."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    fed: list[int] = []
    real = hashlib.sha256

    class Recording:
        def __init__(self) -> None:
            self._hash = real()

        def update(self, chunk: bytes | memoryview) -> None:
            fed.append(len(chunk))
            self._hash.update(chunk)

        def digest(self) -> bytes:
            return self._hash.digest()

    monkeypatch.setattr(hashlib, "sha256", Recording)
    assert bigsets._digest(memoryview(data)) == real(data).digest()[:16]
    assert sum(fed) == size and all(n < 2048 for n in fed)
