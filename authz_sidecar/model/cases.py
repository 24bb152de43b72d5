"""Policy test cases: written expectations of a set (``alice may edit things``, ``bob may not``), run
against any set offline, and against the running sidecars through Envoy.

Metrics say how a change behaves on the traffic that happened to come; cases say how it must behave
on the questions someone thought to ask, the rare ones included. A case names a permission (and a
scope), or a route (``PUT /things/42``) that the service's catalog maps to one. A failing case is
explained: the grants and roles that produced the answer (:mod:`authz_sidecar.model.explain`).

Pure: the sets are compiled once by the caller; only failures walk the document to explain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from authz_sidecar.model.engine import CompiledSet
from authz_sidecar.model.explain import Explanation, explain
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.routes import PathError, RouteTable
from authz_sidecar.model.values import Catalog, PermissionSet, RouteSpec


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    principal: str
    allow: bool  # what is expected
    permission: str | None = None
    scope: str | None = None
    route: tuple[str, str] | None = None  # (method, path), resolved through the catalog

    def asks(self) -> str:
        if self.route is not None:
            return f"{self.route[0]} {self.route[1]}"
        return f"{self.permission}" + (f" in {self.scope}" if self.scope else "")


@dataclass(frozen=True, slots=True)
class Cases:
    """A file of cases, with the service whose catalog resolves its routes ('' if it names none)."""

    cases: tuple[Case, ...]
    service: str = ""


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    version: str
    # What the case asks once its route is resolved (None: the route maps to nothing).
    permission: str | None
    scope: str | None
    allowed: bool
    why: str
    # The case could not be asked at all (a route case without a catalog): it fails.
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.allowed == self.case.allow

    def document(self) -> dict[str, Any]:
        return {
            "case": self.case.name,
            "principal": self.case.principal,
            "asks": self.case.asks(),
            "permission": self.permission,
            "scope": self.scope,
            "expect": "allow" if self.case.allow else "deny",
            "got": "allow" if self.allowed else "deny",
            "passed": self.passed,
            **({} if self.passed else {"why": self.error or self.why}),
        }


def resolve(case: Case, routes: RouteTable | None) -> tuple[str | None, str | None, str]:
    """The permission and scope a case asks for; or None and why the sidecar would deny the request
    before asking any set (a route the catalog does not map, an unsafe path)."""
    if case.route is None:
        return case.permission, case.scope, ""
    method, path = case.route
    if routes is None:
        raise ValueError(f"route {case.asks()}: no catalog to resolve it with (name the service)")
    try:
        match = routes.resolve(method, path)
    except PathError:
        return None, None, f"route {case.asks()}: an unsafe path, denied before any set is asked"
    if match is None:
        return None, None, f"route {case.asks()}: the catalog maps it to no permission, so it is denied"
    return match.permission, match.scope, ""


def run_cases(
    cases: Iterable[Case], permissions: PermissionSet, compiled: CompiledSet, routes: RouteTable | None
) -> list[CaseResult]:
    """Every case against one set; a failure says why the set answered as it did."""
    results = []
    for case in cases:
        try:
            permission, scope, unmapped = resolve(case, routes)
        except ValueError as exc:
            results.append(CaseResult(case, permissions.version, None, None, False, "", error=str(exc)))
            continue
        if permission is None:
            results.append(CaseResult(case, permissions.version, None, None, False, unmapped))
            continue
        allowed = compiled.decide(case.principal, permission, scope) is Reason.ALLOWED
        why = ""
        if allowed != case.allow:
            why = _why(explain(permissions, case.principal, permission, scope))
        results.append(CaseResult(case, permissions.version, permission, scope, allowed, why))
    return results


def run_suites(
    suites: Iterable[Cases], permissions: PermissionSet, compiled: CompiledSet, catalogs: Iterable[Catalog]
) -> list[CaseResult]:
    """Every suite's cases against one set, each resolved through its own service's routes."""
    tables = {c.service: RouteTable(c.routes) for c in catalogs}
    results: list[CaseResult] = []
    for suite in suites:
        results += run_cases(suite.cases, permissions, compiled, tables.get(suite.service))
    return results


def _why(explanation: Explanation) -> str:
    return f"{'allowed' if explanation.allowed else 'denied'} by {explanation.version}: {explanation.reason()}"


def failing(results: Iterable[CaseResult]) -> list[CaseResult]:
    return [r for r in results if not r.passed]


_PLACEHOLDER = "case"


def route_for(case: Case, specs: Iterable[RouteSpec], table: RouteTable) -> tuple[str, str] | None:
    """A request that asks what `case` asks, for sending it through Envoy: its own route, or a route
    of the catalog guarded by its permission, the scope's value filled into the path (other
    parameters get a placeholder). Checked by resolving it back; None when no route fits."""
    if case.route is not None:
        return case.route
    for spec in specs:
        if spec.permission != case.permission or (spec.scope is None) != (case.scope is None):
            continue
        values: dict[str, str] = {}
        if spec.scope is not None and case.scope is not None:
            found = _fill(spec.scope, case.scope)
            if found is None:
                continue
            values = found
        path = "/".join(
            values.get(part[1:-1], _PLACEHOLDER) if part.startswith("{") and part.endswith("}") else part
            for part in spec.path.split("/")
        )
        try:
            match = table.resolve(spec.method, path)
        except PathError:
            continue
        if match is not None and (match.permission, match.scope) == (case.permission, case.scope):
            return spec.method, path
    return None


def _fill(template: str, scope: str) -> dict[str, str] | None:
    """The parameters that make `template` (``account:{account}``) read `scope`, if any do."""
    pattern = re.escape(template)
    names = re.findall(r"\\\{([A-Za-z_][A-Za-z0-9_]*)\\\}", pattern)
    for name in names:
        pattern = pattern.replace(f"\\{{{name}\\}}", f"(?P<{name}>[^/]+)", 1)
    match = re.fullmatch(pattern, scope)
    return match.groupdict() if match else None
