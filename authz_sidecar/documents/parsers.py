"""Permission sets, shadows and catalogs: parsed from loaded data into the model's values, or refused.

An unknown field is a typo that would otherwise be silently ignored, and a grant of a role the set
does not define grants nothing: both are refused. Cross-document rules (every handle in some
catalog, per-region weights summing to at most 100) are checked where the documents meet, in
:mod:`authz_sidecar.model.assembly`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from authz_sidecar.documents.checks import (
    HTTP_METHODS,
    MAGIC_WORDS,
    MAX_CATALOG_PERMISSIONS,
    MAX_CATALOG_ROUTES,
    MAX_PRINCIPAL_LEN,
    REGION_RE,
    SERVICE_RE,
    SHADOW_STATES,
    check_description,
    check_handle,
    check_principal,
    check_role,
    check_scope,
    check_version,
    mapping_of,
    only_fields,
    sequence_of,
    string_of,
)
from authz_sidecar.documents.cohorts import parse_cohorts
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import (
    Catalog,
    DeclaredChange,
    GrantColumns,
    Metadata,
    Permission,
    PermissionSet,
    Rollout,
    RouteSpec,
    ShadowSet,
    looked_up,
)

_META_FIELDS = frozenset({"version", "request_id", "parent", "author", "reason", "created_at"})
_SET_FIELDS = frozenset({"roles", "grants", "changes"}) | _META_FIELDS
_CHANGE_FIELDS = frozenset({"role", "add", "remove", "principal", "grant", "revoke", "create", "delete", "scope", "to"})
# A shadow file may also carry its rollout plan (read by ctl; see documents.rolloutplans).
_ROLLOUT_FIELDS = frozenset({"weights", "testers", "state", "cohorts", "plan"})
_GRANT_FIELDS = frozenset({"principal", "roles", "scope"})


def _metadata(data: Mapping[Any, Any], document: str) -> Metadata:
    values: dict[str, str] = {}
    for name in _META_FIELDS:
        raw = data.get(name)
        if raw is None:
            continue
        if name == "version":
            values[name] = check_version(raw, document)
        elif name == "parent":
            values[name] = check_version(raw, document, "parent")
        else:
            # YAML reads an unquoted timestamp as a datetime; keep it as the text the author meant.
            values[name] = raw.isoformat() if hasattr(raw, "isoformat") else string_of(raw, document, name)
    return Metadata(**values)


def parse_permission_set(data: Any, document: str, *, extra_fields: frozenset[str] = frozenset()) -> PermissionSet:
    """Build a PermissionSet; refuse anything that is not exactly the documented shape."""
    data = mapping_of(data, document, "")
    only_fields(data, _SET_FIELDS | extra_fields, document)
    roles_raw = mapping_of(data.get("roles", {}), document, "roles")
    roles: dict[str, tuple[str, ...]] = {}
    for name, handles_raw in roles_raw.items():
        where = f"roles.{name}"
        check_role(name, document, where)
        handles = tuple(
            check_handle(h, document, f"{where}[{i}]") for i, h in enumerate(sequence_of(handles_raw, document, where))
        )
        roles[name] = tuple(dict.fromkeys(handles))
    return PermissionSet(
        roles=roles,
        grants=_grants(data.get("grants", []), roles, document),
        meta=_metadata(data, document),
        changes=_changes(data.get("changes", []), document),
    )


def _changes(raw: Any, document: str) -> tuple[DeclaredChange, ...]:
    """`changes`: what a proposal says it does, one role or one principal per entry."""
    changes = []
    for i, item in enumerate(sequence_of(raw or [], document, "changes")):
        where = f"changes[{i}]"
        entry = mapping_of(item, document, where)
        only_fields(entry, _CHANGE_FIELDS, document, where)

        def names(key: str, check: Any, entry: Mapping[Any, Any] = entry, where: str = where) -> tuple[str, ...]:
            values = sequence_of(entry.get(key, []) or [], document, f"{where}.{key}")
            return tuple(check(v, document, f"{where}.{key}[{j}]") for j, v in enumerate(values))

        role, principal = entry.get("role"), entry.get("principal")
        if role is not None and principal is not None:
            change = _scope_change(entry, document, where)
        elif (role is None) == (principal is None):
            raise DocumentError(
                "a change names a role, a principal, or both to move a scope", document=document, field=where
            )
        elif role is not None:
            if set(entry) & {"grant", "revoke", "scope", "to"}:
                raise DocumentError("a role change adds, removes, creates or deletes", document=document, field=where)
            delete = entry.get("delete", False)
            if not isinstance(delete, bool) or (delete and set(entry) & {"add", "remove", "create"}):
                raise DocumentError("'delete: true' stands alone in its change", document=document, field=where)
            change = DeclaredChange(
                role=check_role(role, document, f"{where}.role"),
                add=names("add", check_handle),
                remove=names("remove", check_handle),
                create=names("create", check_handle),
                delete=delete,
            )
        else:
            if set(entry) & {"add", "remove", "create", "delete", "scope", "to"}:
                raise DocumentError("a principal change grants or revokes roles", document=document, field=where)
            change = DeclaredChange(
                principal=check_principal(principal, document, f"{where}.principal"),
                grant=names("grant", check_role),
                revoke=names("revoke", check_role),
            )
        changes.append(change)
    return tuple(changes)


def _scope_change(entry: Mapping[Any, Any], document: str, where: str) -> DeclaredChange:
    """``{principal, role, scope, to}``: the role moves from the principal's grant in `scope`
    (absent: its unscoped grant) to a grant in `to`."""
    if set(entry) - {"principal", "role", "scope", "to"} or "to" not in entry:
        raise DocumentError(
            "a scope change names principal, role, to, and the scope it moves from (absent: unscoped)",
            document=document,
            field=where,
        )
    return DeclaredChange(
        principal=check_principal(entry["principal"], document, f"{where}.principal"),
        role=check_role(entry["role"], document, f"{where}.role"),
        scope=check_scope(entry["scope"], document, f"{where}.scope") if entry.get("scope") else "",
        to=check_scope(entry["to"], document, f"{where}.to"),
    )


def dump_permission_set(permissions: PermissionSet) -> bytes:
    """Canonical JSON for a set (what etcd stores): parse_permission_set reads it back as equal,
    the C json parser reads it fast, and the same set always gives the same bytes and digest."""
    meta = {k: v for k, v in asdict(permissions.meta).items() if v}
    grants = [
        {"principal": g.principal, "roles": list(g.roles), **({"scope": g.scope} if g.scope is not None else {})}
        for g in permissions.grants
    ]
    roles = {name: list(handles) for name, handles in permissions.roles.items()}
    body: dict[str, Any] = {**meta, "roles": roles, "grants": grants}
    if permissions.changes:
        body["changes"] = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(c).items() if v}
            for c in permissions.changes
        ]
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _grants(grants_raw: Any, roles: Mapping[str, tuple[str, ...]], document: str) -> GrantColumns:
    return GrantReader(roles, document).read(sequence_of(grants_raw, document, "grants"), 0)


class GrantReader:
    """Grants, checked with a fast path for the common, valid shape (a set may hold a million): each
    distinct role combination and scope is checked once, principals in bulk per batch, and the
    field path of a problem is worked out only when there is one. Batches of one set's grants
    (:mod:`authz_sidecar.documents.bigsets` reads them in pieces) share what was checked."""

    def __init__(self, roles: Mapping[str, tuple[str, ...]], document: str) -> None:
        self.document = document
        self.known_roles = roles.keys()
        self.role_lists: dict[tuple[str, ...], tuple[str, ...]] = {}  # checked combinations, one tuple each
        self.scopes: dict[str, str] = {}  # checked scopes, one string each
        # For take(): a grant's roles as written (the JSON between its brackets) -> the checked
        # combination; a scope as written ('' when there is none) -> the checked scope.
        self.role_texts: dict[str, tuple[str, ...]] = {}
        self.scope_texts: dict[str, str | None] = {"": None}

    def valid(self, combinations: Collection[tuple[str, ...]]) -> bool:
        """Whether every role of `combinations` is defined."""
        return all(role in self.known_roles for names in combinations for role in names)

    def read(self, rows: Sequence[Any], offset: int) -> GrantColumns:
        """The grants of `rows`, the grants of the set from index `offset` on (for field paths)."""
        document = self.document
        known_roles = self.known_roles
        role_lists = self.role_lists
        scopes = self.scopes
        principals: list[Any] = []
        combinations: list[tuple[str, ...]] = []
        in_scopes: list[str | None] = []
        add_principal = principals.append
        add_roles = combinations.append
        add_scope = in_scopes.append
        for i, raw in enumerate(rows, offset):
            if type(raw) is not dict or not raw.keys() <= _GRANT_FIELDS:
                only_fields(mapping_of(raw, document, f"grants[{i}]"), _GRANT_FIELDS, document, f"grants[{i}]")
            add_principal(raw.get("principal"))
            names = raw.get("roles")
            try:
                role_names = role_lists.get(tuple(names)) if type(names) is list else None
            except TypeError:  # an unhashable role name; the check below says what is wrong
                role_names = None
            if role_names is None:
                _check_grant_roles(names, known_roles, document, f"grants[{i}].roles")
                role_names = role_lists[tuple(names)] = tuple(names)
            add_roles(role_names)
            scope = raw.get("scope")
            if scope is not None:
                checked = scopes.get(scope) if type(scope) is str else None
                if checked is None:
                    checked = scopes[scope] = check_scope(scope, document, f"grants[{i}].scope")
                scope = checked
            add_scope(scope)
        _check_principals(principals, document, offset)
        return GrantColumns(principals, combinations, in_scopes)

    def take(
        self,
        principals: Sequence[str],
        role_texts: Sequence[str],
        scope_texts: Sequence[str],
        offset: int,
        *,
        plain: bool = False,
    ) -> GrantColumns:
        """Grants already taken apart from a set's canonical text, as three columns of strings:
        each grant's principal, its roles as written between the brackets (`"a","b"`), and its
        scope ('' for none). The texts are checked once each (most grants share a few), the
        principals in bulk (`plain`: the reader found each printable ASCII without a space at
        either end, of an allowed length); a problem raises as :meth:`read` would."""

        def roles(text: str, at: int) -> tuple[str, ...]:
            where = f"grants[{offset + at}].roles"
            try:
                names = json.loads("[" + text + "]")
            except ValueError:
                raise DocumentError("the roles are not a list of names", document=self.document, field=where) from None
            _check_grant_roles(names, self.known_roles, self.document, where)
            return self.role_lists.setdefault(tuple(names), tuple(names))

        def scope(text: str, at: int) -> str | None:
            return self.scopes.setdefault(text, check_scope(text, self.document, f"grants[{offset + at}].scope"))

        combinations = looked_up(role_texts, self.role_texts, roles)
        in_scopes = looked_up(scope_texts, self.scope_texts, scope)
        _check_principals(principals, self.document, offset, plain=plain)
        return GrantColumns(principals, combinations, in_scopes)


def _check_principals(principals: Sequence[Any], document: str, offset: int = 0, *, plain: bool = False) -> None:
    """Check every grant's principal with a few passes in C; name the first bad one if any is.

    A principal is printable, so the only whitespace it can hold is the ASCII space, and it may not
    start or end with one: joined with newlines, that is a space next to a newline or at an end.
    (`plain`: all of that is known of them already; only the magic words are left to look for.)"""
    if plain:
        valid = MAGIC_WORDS.isdisjoint(principals)
        if valid:
            return
    try:
        lines = "\n".join(principals)
    except TypeError:  # something that is not a string
        valid = False
    else:
        valid = (
            lines.count("\n") == len(principals) - 1  # no principal holds a newline of its own
            and lines.replace("\n", "").isprintable()
            and " \n" not in lines
            and "\n " not in lines
            and not lines.startswith(" ")
            and not lines.endswith(" ")
            and (not principals or (min(map(len, principals)) > 0 and max(map(len, principals)) <= MAX_PRINCIPAL_LEN))
            and MAGIC_WORDS.isdisjoint(principals)
        )
    if not valid:
        for i, principal in enumerate(principals, offset):
            check_principal(principal, document, f"grants[{i}].principal")


def _check_grant_roles(names: Any, known: Any, document: str, where: str) -> None:
    """Raise the precise error for a grant's roles (only called when they are not plainly valid)."""
    role_names = tuple(sequence_of(names if names is not None else [], document, where))
    if not role_names:
        raise DocumentError("a grant needs at least one role", document=document, field=where, value=[])
    for j, role in enumerate(role_names):
        if not isinstance(role, str) or role not in known:
            raise DocumentError(
                f"grant of unknown role {role!r} (roles defined: {', '.join(sorted(known)) or 'none'})",
                document=document,
                field=f"{where}[{j}]",
                value=role,
            )


def parse_rollout(data: Mapping[Any, Any], document: str) -> Rollout:
    weights_raw = mapping_of(data.get("weights", {}) or {}, document, "weights")
    weights: dict[str, int] = {}
    for region, weight in weights_raw.items():
        where = f"weights.{region}"
        if not isinstance(region, str) or not REGION_RE.fullmatch(region):
            raise DocumentError(f"{region!r} is not a region name", document=document, field=where, value=region)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise DocumentError(
                f"weight {weight!r} is not a whole number (a percent, 0..100)",
                document=document,
                field=where,
                value=weight,
            )
        if not 0 <= weight <= 100:
            raise DocumentError(f"weight {weight} is outside 0..100", document=document, field=where, value=weight)
        weights[region] = weight
    testers = frozenset(
        check_principal(t, document, f"testers[{i}]")
        for i, t in enumerate(sequence_of(data.get("testers", []) or [], document, "testers"))
    )
    cohorts = parse_cohorts(data.get("cohorts"), document)
    state = data.get("state", "canary" if any(weights.values()) or cohorts else "proposed")
    if state not in SHADOW_STATES:
        raise DocumentError(
            f"state {state!r} is not one of {', '.join(sorted(SHADOW_STATES))} for a live shadow",
            document=document,
            field="state",
            value=state,
        )
    return Rollout(weights=weights, testers=testers, state=state, cohorts=cohorts)


def parse_shadow(data: Any, document: str) -> ShadowSet:
    """A shadow is a permission set plus its rollout; it must name its version."""
    permissions = parse_permission_set(data, document, extra_fields=_ROLLOUT_FIELDS)
    if not permissions.meta.version:
        raise DocumentError("a shadow set needs a version", document=document, field="version", value=None)
    return ShadowSet(permissions=permissions, rollout=parse_rollout(mapping_of(data, document, ""), document))


_CATALOG_FIELDS = frozenset({"service", "permissions", "routes"})
_PERMISSION_FIELDS = frozenset({"handle", "description"})
_ROUTE_FIELDS = frozenset({"method", "path", "permission", "scope"})
_TEMPLATE_SEGMENT = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}|[^{}\s\x00-\x1f\x7f]+")


def _bounded(value: Any, limit: int, document: str, where: str) -> Sequence[Any]:
    items = sequence_of(value, document, where)
    if len(items) > limit:
        raise DocumentError(
            f"{len(items)} {where}; a service's catalog holds at most {limit}", document=document, field=where
        )
    return items


def parse_catalog(data: Any, document: str) -> Catalog:
    """A service's catalog: the handles it owns and the route each one guards."""
    data = mapping_of(data, document, "")
    only_fields(data, _CATALOG_FIELDS, document)
    service = data.get("service")
    if not isinstance(service, str) or not SERVICE_RE.fullmatch(service):
        raise DocumentError(f"{service!r} is not a service name", document=document, field="service", value=service)
    permissions: list[Permission] = []
    seen: set[str] = set()
    for i, item in enumerate(_bounded(data.get("permissions", []), MAX_CATALOG_PERMISSIONS, document, "permissions")):
        where = f"permissions[{i}]"
        raw = mapping_of(item, document, where)
        only_fields(raw, _PERMISSION_FIELDS, document, where)
        handle = check_handle(raw.get("handle"), document, f"{where}.handle")
        if handle in seen:
            raise DocumentError(
                f"duplicate handle {handle!r}", document=document, field=f"{where}.handle", value=handle
            )
        seen.add(handle)
        permissions.append(
            Permission(handle, check_description(raw.get("description", ""), document, f"{where}.description"))
        )
    routes: list[RouteSpec] = []
    for i, item in enumerate(_bounded(data.get("routes", []), MAX_CATALOG_ROUTES, document, "routes")):
        where = f"routes[{i}]"
        raw = mapping_of(item, document, where)
        only_fields(raw, _ROUTE_FIELDS, document, where)
        method = raw.get("method")
        if method not in HTTP_METHODS:
            raise DocumentError(
                f"method {method!r} is not one of {', '.join(sorted(HTTP_METHODS))}",
                document=document,
                field=f"{where}.method",
                value=method,
            )
        path = string_of(raw.get("path"), document, f"{where}.path")
        segments = path.split("/")[1:]
        if not path.startswith("/") or (path != "/" and not all(_TEMPLATE_SEGMENT.fullmatch(s) for s in segments)):
            raise DocumentError(
                f"{path!r} is not a path template ('/things/{{id}}': literal or {{name}} segments)",
                document=document,
                field=f"{where}.path",
                value=path,
            )
        permission = check_handle(raw.get("permission"), document, f"{where}.permission")
        if permission not in seen:
            raise DocumentError(
                f"route permission {permission!r} is not among this catalog's permissions",
                document=document,
                field=f"{where}.permission",
                value=permission,
            )
        scope = raw.get("scope")
        if scope is not None:
            scope = string_of(scope, document, f"{where}.scope")
            params = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", path))
            used = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", scope))
            if used - params:
                raise DocumentError(
                    f"scope template uses {sorted(used - params)[0]!r}, which the path does not capture",
                    document=document,
                    field=f"{where}.scope",
                    value=scope,
                )
        routes.append(RouteSpec(method=method, path=path, permission=permission, scope=scope))
    return Catalog(service=service, permissions=tuple(permissions), routes=tuple(routes))
