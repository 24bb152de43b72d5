"""Grants held per piece behave as the tuple of the same grants, for every reader of a set's grants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz_sidecar.model.values import Grant, GrantColumns, Grants, grant_columns, grant_rows

grant_st = st.builds(Grant, st.sampled_from(["a", "b", "c"]), st.just(("r",)), st.sampled_from([None, "s"]))
pieces_st = st.lists(st.lists(grant_st, max_size=5).map(tuple), max_size=6)


@given(pieces_st, st.integers(-40, 40), st.integers(-40, 40), st.sampled_from([None, 1, 2, -1]))
def test_grants_in_pieces_are_the_tuple_of_them(
    pieces: list[tuple[Grant, ...]], start: int, stop: int, step: int | None
) -> None:
    whole = tuple(g for piece in pieces for g in piece)
    grants = Grants(pieces)
    assert len(grants) == len(whole)
    assert list(grants) == list(whole)
    assert grants == whole and whole == grants and grants == Grants([whole])
    assert grants != (*whole, Grant("z", ("r",)))
    assert grants[start:stop:step] == whole[start:stop:step]
    for i in range(-len(whole), len(whole)):
        assert grants[i] == whole[i]
    for i in (len(whole), -len(whole) - 1):
        with pytest.raises(IndexError):
            grants[i]


def test_a_slice_of_exactly_one_piece_is_that_piece() -> None:
    """What a set read against its parent takes for each piece it shares: the parent's own tuple."""
    pieces = [(Grant("a", ("r",)),), (Grant("b", ("r",)), Grant("c", ("r",))), (Grant("d", ("r",)),)]
    grants = Grants(pieces)
    assert grants[1:3] is pieces[1]
    assert grants[0:1] is pieces[0] and grants[3:4] is pieces[2]
    assert grants[1:2] == (Grant("b", ("r",)),) and grants[1:4] == (*pieces[1], *pieces[2])


def test_columns_and_rows_cover_every_grant_in_order_a_bounded_piece_at_a_time() -> None:
    """What the engine's scans go through: a large set's own pieces, anything else cut, so that no
    step takes on a whole set read whole."""
    many = [Grant(f"p{i}", ("r", "s") if i % 2 else ("r",), None if i % 3 else "x") for i in range(25_001)]
    columns = GrantColumns.of(many)
    assert (
        columns == tuple(many) and list(columns) == many and columns[7] == many[7] and columns[5:9] == tuple(many[5:9])
    )
    for grants in (many, tuple(many), columns, Grants([columns, tuple(many[:3])])):
        pieces = list(grant_columns(grants))
        assert all(0 < len(piece) <= 10_000 for piece in pieces)
        expected = many if not isinstance(grants, Grants) else [*many, *many[:3]]
        assert [g for piece in pieces for g in piece] == expected
        assert list(grant_rows(grants)) == [tuple(g) for g in expected]
    assert list(grant_columns(())) == [] and list(grant_rows(())) == []
