"""Policy test case files::

    service: things            # whose catalog resolves the routes (needed only for route cases)
    cases:
      - {name: owners delete, principal: alice, permission: things:delete, expect: allow}
      - {name: acme editors edit there, principal: carol, permission: things:edit, scope: "account:acme", expect: allow}
      - {name: viewers do not edit, principal: bob, route: "PUT /things/42", expect: deny}

Each case names a permission (and optionally a scope) or a route, never both; names are unique, so
that a failure in the controller's outcome points at one line.
"""

from __future__ import annotations

from typing import Any

from authz_sidecar.documents.checks import (
    HTTP_METHODS,
    SERVICE_RE,
    check_handle,
    check_principal,
    check_scope,
    mapping_of,
    only_fields,
    sequence_of,
    string_of,
)
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.cases import Case, Cases

MAX_CASES = 10_000
MAX_NAME = 200
_FILE_FIELDS = frozenset({"service", "cases"})
_CASE_FIELDS = frozenset({"name", "principal", "permission", "scope", "route", "expect"})


def _route(value: Any, document: str, where: str) -> tuple[str, str]:
    text = string_of(value, document, where)
    method, _sep, path = text.strip().partition(" ")
    path = path.strip()
    if method not in HTTP_METHODS or not path.startswith("/") or any(c.isspace() for c in path):
        raise DocumentError(
            f"{text!r} is not 'METHOD /path' (e.g. 'PUT /things/42')", document=document, field=where, value=value
        )
    return method, path


def parse_case(entry: Any, document: str, where: str) -> Case:
    data = mapping_of(entry, document, where)
    only_fields(data, _CASE_FIELDS, document, where)
    name = string_of(data.get("name"), document, f"{where}.name").strip()
    if not name or len(name) > MAX_NAME:
        raise DocumentError(
            f"a case needs a name of 1..{MAX_NAME} characters", document=document, field=f"{where}.name"
        )
    if ("permission" in data) == ("route" in data):
        raise DocumentError(f"case {name!r}: give a permission or a route, one of them", document=document, field=where)
    if "route" in data and "scope" in data:
        raise DocumentError(
            f"case {name!r}: a route's scope comes from the catalog, not the case", document=document, field=where
        )
    expect = data.get("expect")
    if expect not in ("allow", "deny"):
        raise DocumentError(
            f"case {name!r}: expect is allow or deny, not {expect!r}", document=document, field=f"{where}.expect"
        )
    return Case(
        name=name,
        principal=check_principal(data.get("principal"), document, f"{where}.principal"),
        allow=expect == "allow",
        permission=check_handle(data["permission"], document, f"{where}.permission") if "permission" in data else None,
        scope=check_scope(data["scope"], document, f"{where}.scope") if data.get("scope") else None,
        route=_route(data["route"], document, f"{where}.route") if "route" in data else None,
    )


def parse_cases(data: Any, document: str) -> Cases:
    raw = mapping_of(data, document, "")
    only_fields(raw, _FILE_FIELDS, document)
    service = raw.get("service", "") or ""
    if service and (not isinstance(service, str) or not SERVICE_RE.fullmatch(service)):
        raise DocumentError(f"{service!r} is not a service name", document=document, field="service", value=service)
    entries = sequence_of(raw.get("cases", []), document, "cases")
    if len(entries) > MAX_CASES:
        raise DocumentError(f"{len(entries)} cases; a file holds at most {MAX_CASES}", document=document, field="cases")
    cases = tuple(parse_case(entry, document, f"cases[{i}]") for i, entry in enumerate(entries))
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise DocumentError(f"case name {case.name!r} is used twice", document=document, field="cases")
        seen.add(case.name)
    return Cases(cases=cases, service=service)


def cases_document(cases: Cases) -> dict[str, Any]:
    """A cases file as stored in etcd (parse_cases reads it back)."""

    def one(case: Case) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": case.name,
            "principal": case.principal,
            "expect": "allow" if case.allow else "deny",
        }
        if case.route is not None:
            entry["route"] = f"{case.route[0]} {case.route[1]}"
        else:
            entry["permission"] = case.permission
            if case.scope:
                entry["scope"] = case.scope
        return entry

    return {"service": cases.service, "cases": [one(c) for c in cases.cases]}
