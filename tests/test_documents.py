"""Documents are refused with an error that names the field and the value, or parsed exactly."""

from __future__ import annotations

from typing import Any

import pytest

from authz_sidecar.documents import load_document, parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.snapshot import build_snapshot

from .helpers import ACTIVE, CATALOG, shadow


def test_issue_example_set_parses() -> None:
    """The permission set from the issue parses, with scope and metadata kept."""
    doc = load_document(
        """
version: v7
request_id: CR-9
roles:
  viewer: [things:view]
  editor: [things:view, things:edit]
grants:
  - {principal: alice, roles: [editor]}
  - {principal: bob, roles: [viewer], scope: "account:acme"}
""",
        "set.yaml",
    )
    ps = parse_permission_set(doc, "set.yaml")
    assert ps.version == "v7"
    assert ps.meta.request_id == "CR-9"
    assert ps.grants[1].scope == "account:acme"
    assert ps.roles["editor"] == ("things:view", "things:edit")


def test_json_is_accepted() -> None:
    """JSON documents parse the same as YAML ones."""
    doc = load_document(
        '{"version": "v1", "roles": {"r": ["a:b"]}, "grants": [{"principal": "p", "roles": ["r"]}]}', "x"
    )
    assert parse_permission_set(doc, "x").grants[0].principal == "p"


@pytest.mark.parametrize(
    ("handle", "needle"),
    [
        ("things:*", "wildcards"),
        ("*", "wildcards"),
        ("things:manage", "magic"),
        ("all:view", "magic"),
        ("things:edit:any", "magic"),
        ("Things:View", "not a handle"),
        ("things", "not a handle"),
        ("things:view:a:b", "not a handle"),
        ("things::view", "not a handle"),
        (42, "must be a string"),
    ],
)
def test_bad_handles_are_refused_naming_field_and_value(handle: Any, needle: str) -> None:
    """Malformed handles, wildcards and magic words are refused with the field path and the value."""
    with pytest.raises(DocumentError) as err:
        parse_permission_set({"roles": {"r": ["things:view", handle]}, "grants": []}, "set.yaml")
    assert needle in str(err.value)
    assert err.value.field == "roles.r[1]"
    assert err.value.value == handle
    assert "set.yaml" in str(err.value)


def test_duplicate_keys_are_refused() -> None:
    """A duplicated key would silently drop one value; it is an error instead, naming the key's
    path once and where both occurrences are."""
    with pytest.raises(DocumentError) as err:
        load_document("roles:\n  viewer: [a:b]\n  viewer: [a:c]\n", "dup.yaml")
    assert str(err.value) == "dup.yaml: roles.viewer: duplicate key at line 3, column 3 (first at line 2, column 3)"
    assert (err.value.field, err.value.value) == ("roles.viewer", "viewer")
    # Inside a list and at the top: the path is the one every other refusal uses.
    with pytest.raises(DocumentError, match=r"^d\.yaml: grants\[1\]\.roles: duplicate key at line 5"):
        load_document(
            "grants:\n  - {principal: a, roles: [r]}\n  - principal: b\n    roles: [r]\n    roles: [s]\n", "d.yaml"
        )
    with pytest.raises(DocumentError, match=r"^d\.yaml: version: duplicate key at line 2, column 1"):
        load_document("version: v1\nversion: v2\n", "d.yaml")


def test_unknown_field_is_refused() -> None:
    """A misspelt field is an error, not ignored."""
    with pytest.raises(DocumentError, match="unknown field 'grant'") as err:
        parse_permission_set({"roles": {}, "grant": []}, "typo.yaml")
    assert err.value.field == "grant"


def test_grant_of_unknown_role_is_refused() -> None:
    with pytest.raises(DocumentError, match="unknown role 'admin'") as err:
        parse_permission_set({"roles": {"viewer": ["a:b"]}, "grants": [{"principal": "x", "roles": ["admin"]}]}, "s")
    assert err.value.field == "grants[0].roles[0]"


@pytest.mark.parametrize("scope", ["account:*", "account", "account:all", "", "a b:c"])
def test_bad_scopes_are_refused(scope: str) -> None:
    with pytest.raises(DocumentError, match="not a scope"):
        parse_permission_set(
            {"roles": {"r": ["a:b"]}, "grants": [{"principal": "x", "roles": ["r"], "scope": scope}]}, "s"
        )


@pytest.mark.parametrize(
    ("weight", "needle"),
    [
        (-1, r"weight -1 is outside 0\.\.100"),
        (101, r"weight 101 is outside 0\.\.100"),
        # Not "outside 0..100": 12.5 is inside; it is not a whole number.
        (12.5, r"weight 12\.5 is not a whole number"),
        (True, "weight True is not a whole number"),
        ("10", "weight '10' is not a whole number"),
    ],
)
def test_weights_outside_0_100_or_not_whole_are_refused(weight: Any, needle: str) -> None:
    with pytest.raises(DocumentError, match=needle) as err:
        parse_shadow(shadow("v2", weights={"us-east": weight}), "v2.yaml")
    assert err.value.field == "weights.us-east"


def test_weights_over_100_per_region_are_refused() -> None:
    """Two shadows whose weights in one region sum over 100 cannot be served together."""
    catalog = parse_catalog(CATALOG, "catalog")
    a = parse_shadow(shadow("v2", weights={"us-east": 60}), "v2")
    b = parse_shadow(shadow("v3", weights={"us-east": 50, "eu-west": 50}), "v3")
    with pytest.raises(DocumentError, match="sum to 110"):
        build_snapshot(parse_permission_set(ACTIVE, "active"), [a, b], [catalog])


def test_handles_absent_from_catalog_are_refused_and_listed() -> None:
    """Typos are caught before they ship: every unknown handle is listed."""
    doc = {"version": "v1", "roles": {"r": ["things:veiw", "things:edit", "things:delet"]}, "grants": []}
    with pytest.raises(DocumentError) as err:
        build_snapshot(parse_permission_set(doc, "active"), [], [parse_catalog(CATALOG, "catalog")])
    assert "things:delet, things:veiw" in str(err.value)


def test_shadow_needs_version_and_valid_state() -> None:
    doc = shadow("v2")
    del doc["version"]
    with pytest.raises(DocumentError, match="needs a version"):
        parse_shadow(doc, "s")
    with pytest.raises(DocumentError, match="state 'promoted'"):
        parse_shadow({**shadow("v2"), "state": "promoted"}, "s")


def test_catalog_rules() -> None:
    """Routes must use the catalog's own handles, a real method and a well-formed template."""
    ok = parse_catalog(CATALOG, "c")
    assert len(ok.routes) == 4
    bad_method = {**CATALOG, "routes": [{"method": "ANY", "path": "/x", "permission": "things:view"}]}
    with pytest.raises(DocumentError, match="method 'ANY'"):
        parse_catalog(bad_method, "c")
    foreign = {**CATALOG, "routes": [{"method": "GET", "path": "/x", "permission": "other:view"}]}
    with pytest.raises(DocumentError, match="not among this catalog's permissions"):
        parse_catalog(foreign, "c")
    bad_path = {**CATALOG, "routes": [{"method": "GET", "path": "x/{id", "permission": "things:view"}]}
    with pytest.raises(DocumentError, match="not a path template"):
        parse_catalog(bad_path, "c")
    bad_scope = {
        **CATALOG,
        "routes": [{"method": "GET", "path": "/a/{id}", "permission": "things:view", "scope": "account:{acct}"}],
    }
    with pytest.raises(DocumentError, match="'acct'"):
        parse_catalog(bad_scope, "c")


def test_non_utf8_document_is_refused() -> None:
    with pytest.raises(DocumentError, match="not UTF-8"):
        load_document(b"roles: {r: [\xff]}", "bin.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "roles: [unclosed",
            "bad.yaml: line 1, column 17: not valid YAML: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence)",
        ),
        (
            "roles:\n\tviewer: [a:b]\n",
            "bad.yaml: line 2, column 1: not valid YAML: found character '\\t' that cannot"
            " start any token (while scanning for the next token)",
        ),
        ("a: 1\n b: 2\n", "bad.yaml: line 2, column 3: not valid YAML: mapping values are not allowed here"),
        (
            "roles: {[a]: 1}\n",
            "bad.yaml: line 1, column 9: not valid YAML: found unhashable key (while constructing a mapping)",
        ),
        (
            "version: \x01\n",
            "bad.yaml: line 1, column 10: not valid YAML: character #x0001: special characters are not allowed",
        ),
        ("a: " + "[" * 5000 + "]" * 5000, "bad.yaml: not valid YAML: nested too deeply"),
    ],
)
def test_invalid_yaml_is_refused_in_one_line_saying_where(text: str, message: str) -> None:
    """PyYAML's own message spans several lines and names '<unicode string>'; ours is the file, the
    line and column, and what is wrong."""
    with pytest.raises(DocumentError) as err:
        load_document(text, "bad.yaml")
    assert str(err.value) == message


def test_json_duplicate_keys_are_refused() -> None:
    """JSON takes the fast parser, and still refuses duplicated keys."""
    with pytest.raises(DocumentError, match="duplicate key 'roles'"):
        load_document('{"roles": {}, "roles": {}}', "dup.json")
    with pytest.raises(DocumentError, match=r"^cut\.json: line 2, column 3: not valid JSON: Expecting value$"):
        load_document('{"roles":\n  ', "cut.json")


def test_grant_errors_name_their_field() -> None:
    """The fast path for valid grants still reports the exact field of an invalid one."""
    doc: dict[str, Any] = {
        "roles": {"r": ["a:b"]},
        "grants": [{"principal": "ok", "roles": ["r"]}, {"principal": " x", "roles": ["r"]}],
    }
    with pytest.raises(DocumentError) as err:
        parse_permission_set(doc, "s")
    assert err.value.field == "grants[1].principal"
    doc["grants"][1] = {"principal": "x", "roles": "r"}
    with pytest.raises(DocumentError) as err:
        parse_permission_set(doc, "s")
    assert err.value.field == "grants[1].roles"
    doc["grants"][1] = {"principal": "x", "roles": []}
    with pytest.raises(DocumentError, match="at least one role"):
        parse_permission_set(doc, "s")
    doc["grants"][1] = {"principal": "x", "roles": ["r"], "extra": 1}
    with pytest.raises(DocumentError, match="unknown field 'extra'") as err:
        parse_permission_set(doc, "s")
    assert err.value.field == "grants[1].extra"


@pytest.mark.parametrize(
    "principal",
    ["", " x", "x ", "a\nb", "a\tb", "x" * 513, "*", "all", 7, None, ["x"], "a\u00a0"],
)
def test_every_bad_principal_is_refused_by_the_bulk_check(principal: object) -> None:
    """Principals are checked in bulk after the loop; each kind of bad one is still found and named."""
    doc = {
        "roles": {"r": ["a:b"]},
        "grants": [
            {"principal": "ok", "roles": ["r"]},
            {"principal": principal, "roles": ["r"]},
            {"principal": "z", "roles": ["r"]},
        ],
    }
    with pytest.raises(DocumentError) as err:
        parse_permission_set(doc, "s")
    assert err.value.field == "grants[1].principal"


def test_good_principals_with_inner_spaces_and_unicode_pass() -> None:
    doc = {
        "roles": {"r": ["a:b"]},
        "grants": [{"principal": p, "roles": ["r"]} for p in ("a b", "é", "x" * 512, "svc:a/b")],
    }
    assert [g.principal for g in parse_permission_set(doc, "s").grants] == ["a b", "é", "x" * 512, "svc:a/b"]
