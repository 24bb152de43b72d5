"""The reader of canonical grant text in C (_granttext.c) accepts exactly what the pattern it
stands in for accepts, takes it apart into the same strings, and vouches for a principal only when
the principal checks would pass it (but for the magic words, which the caller still looks for)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_sidecar.documents import MAGIC_WORDS, MAX_PRINCIPAL_LEN, bigsets
from authz_sidecar.documents.checks import is_principal

try:
    from authz_sidecar.documents._granttext import split
except ImportError:  # pragma: no cover - the failure below says what is missing
    split = None  # type: ignore[assignment]


def test_the_reader_is_built_and_used() -> None:
    """make venv builds it; a fresh clone's tests fail here, not later, where it was not."""
    assert split is not None, "authz_sidecar/documents/_granttext.c is not built (pip install -e . with a C compiler)"
    assert bigsets.split_in_c is split


# Characters that matter to the grammar or the checks, and a few that do not.
_CHARS = st.sampled_from(['"', "\\", "\x00", "\x1f", "\x7f", " ", ",", "{", "}", "[", "]", ":", "é", "a", "b", "1"])
_NAME = st.text(_CHARS, max_size=6)
_GRANT = st.tuples(
    _NAME.filter(lambda s: s != "") | _NAME,
    st.lists(_NAME, min_size=0, max_size=3),
    st.none() | _NAME,
)


def _text(grants: list[tuple[str, list[str], str | None]]) -> str:
    """Grants written as canonical JSON would write them, with no escaping at all: a string holding
    a quote or a control character makes text that is not canonical, as damage would."""
    written = []
    for principal, roles, scope in grants:
        names = ",".join(f'"{r}"' for r in roles)
        tail = f',"scope":"{scope}"' if scope is not None else ""
        written.append(f'{{"principal":"{principal}","roles":[{names}]{tail}}}')
    return ",".join(written)


def _agree(text: str) -> None:
    assert split is not None
    taken = split(text, MAX_PRINCIPAL_LEN)
    by_pattern = bigsets._by_pattern(text)
    if taken is None:
        assert by_pattern is None or any(ord(c) > 0xFF for c in text), text
        return
    assert by_pattern is not None, text
    principals, roles, scopes, plain = taken
    assert (principals, roles, scopes) == tuple(map(list, by_pattern[:3]))
    if plain:
        assert all(is_principal(p) or p in MAGIC_WORDS for p in principals)


@settings(max_examples=400, deadline=None)
@given(grants=st.lists(_GRANT, min_size=1, max_size=5))
def test_the_reader_and_the_pattern_agree(grants: list[tuple[str, list[str], str | None]]) -> None:
    _agree(_text(grants))


@settings(max_examples=400, deadline=None)
@given(
    grants=st.lists(_GRANT, min_size=1, max_size=4),
    at=st.integers(min_value=0),
    insert=st.sampled_from(["", ",", "}", "]", '"', "x", '},{"principal":"p","roles":["r"]}', "ā"]),
    drop=st.integers(min_value=0, max_value=2),
)
def test_damaged_text_is_refused_by_both_or_taken_apart_alike(
    grants: list[tuple[str, list[str], str | None]], at: int, insert: str, drop: int
) -> None:
    text = _text(grants)
    cut = at % (len(text) + 1)
    _agree(text[:cut] + insert + text[cut + drop :])


@pytest.mark.parametrize(
    ("principal", "plain"),
    [
        ("alice", True),
        ("a b", True),
        (" alice", False),  # a space at either end: the checks name it
        ("alice ", False),
        ("al\x7fice", False),  # DEL is not printable
        ("", False),
        ("x" * MAX_PRINCIPAL_LEN, True),
        ("x" * (MAX_PRINCIPAL_LEN + 1), False),
        ("josé", False),  # not ASCII: the checks decide
    ],
)
def test_only_a_principal_the_checks_would_pass_is_vouched_for(principal: str, plain: bool) -> None:
    assert split is not None
    taken = split(_text([("ok", ["r"], None), (principal, ["r"], "account:a")]), MAX_PRINCIPAL_LEN)
    assert taken is not None
    assert taken[0] == ["ok", principal] and taken[1] == ['"r"', '"r"'] and taken[2] == ["", "account:a"]
    assert taken[3] is plain


@pytest.mark.parametrize(
    "text",
    [
        "",
        '{"principal":"p","roles":["r"],"scope":""}',  # an empty scope is not "no scope"
        '{"principal":"p","roles":[]}',
        '{"principal":"p","roles":["r"]},',
        '{"principal":"p","roles":["r"]}{"principal":"q","roles":["r"]}',
        '{"principal":"p","roles":["r"] }',
        '{"roles":["r"],"principal":"p"}',
        '{"principal":"p\\u0031","roles":["r"]}',
        '{"principal":"pā","roles":["r"]}',  # two bytes a character: left to the pattern
    ],
)
def test_text_the_reader_does_not_vouch_for_is_left_to_the_pattern(text: str) -> None:
    assert split is not None
    assert split(text, MAX_PRINCIPAL_LEN) is None


def test_what_is_not_a_string_is_refused() -> None:
    assert split is not None
    with pytest.raises(TypeError):
        split(b'{"principal":"p","roles":["r"]}', MAX_PRINCIPAL_LEN)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        split("{}")  # type: ignore[call-arg]
