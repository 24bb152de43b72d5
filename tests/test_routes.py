"""Paths are normalised before matching, so two spellings of one resource get one answer."""

from __future__ import annotations

import pytest

from authz_sidecar.model.routes import PathError, RouteTable, normalise_path
from authz_sidecar.model.values import RouteSpec


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/things/1", "/things/1"),
        ("/things/1/", "/things/1"),
        ("//things///1", "/things/1"),
        ("/things/./1", "/things/1"),
        ("/things/x/../1", "/things/1"),
        ("/../../things/1", "/things/1"),
        ("/things/%31", "/things/1"),
        ("/things/1?x=/admin", "/things/1"),
        ("/", "/"),
        ("/%7Euser", "/~user"),
    ],
)
def test_normalise(raw: str, expected: str) -> None:
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("raw", ["/things%2F1", "/things%5c1", "things/1", "/a\\b", "/%00", "/%ff", "/" + "a" * 9000])
def test_unsafe_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathError):
        normalise_path(raw)


def test_route_table_prefers_literal_segments_and_fills_scope() -> None:
    table = RouteTable(
        [
            RouteSpec("GET", "/things/{id}", "things:view"),
            RouteSpec("GET", "/things/new", "things:create"),
            RouteSpec("GET", "/accounts/{account}/things/{id}", "things:view", "account:{account}"),
            RouteSpec("GET", "/", "home:view"),
        ]
    )
    assert table.match("GET", "/things/new").permission == "things:create"  # type: ignore[union-attr]
    assert table.match("GET", "/things/7").permission == "things:view"  # type: ignore[union-attr]
    assert table.match("PUT", "/things/7") is None
    assert table.match("GET", "/things") is None
    assert table.match("GET", "/things/7/extra") is None
    match = table.match("GET", "/accounts/acme/things/3")
    assert match is not None and match.scope == "account:acme"
    assert table.match("GET", "/").permission == "home:view"  # type: ignore[union-attr]
