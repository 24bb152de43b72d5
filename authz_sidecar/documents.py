"""Permission sets, shadows and catalogs: parsed from YAML or JSON into frozen values, or refused.

Parsing is strict because these documents decide who may do what: an unknown field is a typo that
would otherwise be silently ignored, a duplicate key hides one of its values, and a handle that is
not in a catalog is a permission nobody can ever exercise. Every refusal is a DocumentError that
names the document, the field path and the offending value.

Cross-document rules (every handle in some catalog, per-region weights summing to at most 100)
are checked where the documents meet, in :mod:`authz_sidecar.snapshot`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, NamedTuple

import yaml

from authz_sidecar.errors import DocumentError

# Names are matched whole (re.fullmatch): "$" would also match before a final newline, and these
# values reach response headers, logs and metric labels.
HANDLE_RE = re.compile(r"[a-z][a-z0-9_-]*:[a-z][a-z0-9_-]*(?::[a-z][a-z0-9_-]*)?")
# Words that would make a handle or scope mean "everything": the model has none (DESIGN section 3).
MAGIC_WORDS = frozenset({"*", "all", "any", "manage", "everything", "admin-all"})
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A scope's value is free text but never whitespace, a control character or a wildcard.
SCOPE_RE = re.compile(r"[a-z][a-z0-9_-]*:[^\s*\x00-\x1f\x7f]{1,256}")
REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ROLE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SERVICE_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SHADOW_STATES = frozenset({"proposed", "canary"})
MAX_PRINCIPAL_LEN = 512
# Bounds on what a service registers (catalogs, the Registry, ctl registry put); see docs/policy-files.md.
MAX_HANDLE_LEN = 128
MAX_DESCRIPTION_LEN = 512
MAX_CATALOG_PERMISSIONS = 1000
MAX_CATALOG_ROUTES = 1000


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate mapping keys instead of keeping the last one."""

    document = ""
    root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self.root = node  # where a duplicate key's path is looked up from
        return super().construct_document(node)


def _node_path(root: yaml.Node | None, target: yaml.Node) -> str:
    """The field path of `target` under `root` ('roles', 'grants[2]'), in the form every other
    refusal uses; searched only when there is an error to report. Aliases can make the tree a
    graph, so each node is visited once."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((value, f"{path}.{name}" if path else str(name)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node.value))
    return ""


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key (a list): the mapping's own constructor refuses it
            break
        if first is not None:
            parent = _node_path(loader.root, node)
            raise DocumentError(
                f"duplicate key at {_at(key_node.start_mark)} (first at {_at(first.start_mark)})",
                document=loader.document,
                field=f"{parent}.{key}" if parent else str(key),
                value=key,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise DocumentError(f"duplicate key {key!r}", value=key)
            seen.add(key)
    return result


def _yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """A YAML parser's error as one line: where, then what (PyYAML's own spans several lines)."""
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        at = exc.position
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        return f"line {line}, column {column}: not valid YAML: character #x{exc.character:04x}: {exc.reason}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        what = " ".join(str(exc.problem).split())
        context = ""
        if exc.context:
            started = exc.context_mark
            where = f" at {_at(started)}" if started is not None and started.line != exc.problem_mark.line else ""
            context = f" ({' '.join(exc.context.split())}{where})"
        return f"{_at(exc.problem_mark)}: not valid YAML: {what}{context}"
    return f"not valid YAML: {' '.join(str(exc).split())}"


def load_document(text: str | bytes, document: str) -> Any:
    """Parse JSON or YAML text with duplicate keys refused.

    Text that starts with '{' is parsed as JSON by the C json module: large generated documents
    (a million grants) are written as JSON, and PyYAML would take minutes over them.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError(f"not UTF-8 ({exc.reason} at byte {exc.start})", document=document) from None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except DocumentError as exc:  # a duplicate key; the C parser tells neither where nor the path
            raise DocumentError(f"duplicate key {exc.value!r}", document=document, value=exc.value) from None
        except json.JSONDecodeError as exc:
            message = f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
            raise DocumentError(message, document=document) from None
        except RecursionError:
            raise DocumentError("not valid JSON: nested too deeply", document=document) from None
    try:
        loader = _StrictLoader(text)  # refuses control characters already
        loader.document = document
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise DocumentError(_yaml_error(exc, text), document=document) from None
    except RecursionError:
        raise DocumentError("not valid YAML: nested too deeply", document=document) from None


# --- values -------------------------------------------------------------------------------------


class Grant(NamedTuple):
    """A named tuple rather than a dataclass: a set can hold a million, and building a tuple is
    several times cheaper than a frozen dataclass."""

    principal: str
    roles: tuple[str, ...]
    # None: the grant applies in every scope. A string: only in that scope.
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Metadata:
    version: str = ""
    request_id: str = ""
    parent: str = ""
    author: str = ""
    reason: str = ""
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class DeclaredChange:
    """One change a proposal says it makes, applied to the active set to predict its impact: a
    role's handles added or removed, or roles granted to or revoked from a principal (unscoped)."""

    role: str = ""
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    principal: str = ""
    grant: tuple[str, ...] = ()
    revoke: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PermissionSet:
    roles: Mapping[str, tuple[str, ...]]
    grants: tuple[Grant, ...]
    meta: Metadata = field(default_factory=Metadata)
    # What a proposal declares it changes against its parent; empty: every difference is intended.
    changes: tuple[DeclaredChange, ...] = ()

    @property
    def version(self) -> str:
        return self.meta.version

    def handles(self) -> frozenset[str]:
        return frozenset(h for handles in self.roles.values() for h in handles)


@dataclass(frozen=True, slots=True)
class Rollout:
    """How a shadow reaches traffic: canary weight per region and who may pick it by header."""

    weights: Mapping[str, int] = field(default_factory=dict)
    testers: frozenset[str] = frozenset()
    state: str = "proposed"


@dataclass(frozen=True, slots=True)
class ShadowSet:
    permissions: PermissionSet
    rollout: Rollout

    @property
    def version(self) -> str:
        return self.permissions.meta.version


@dataclass(frozen=True, slots=True)
class Permission:
    handle: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: str
    path: str
    permission: str
    # A scope template such as "account:{account}", filled from the path's parameters.
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    service: str
    permissions: tuple[Permission, ...]
    routes: tuple[RouteSpec, ...] = ()

    def handles(self) -> frozenset[str]:
        return frozenset(p.handle for p in self.permissions)


# --- field checks --------------------------------------------------------------------------------


def check_handle(value: Any, document: str, where: str) -> str:
    """Return the handle, or refuse a malformed one, a wildcard or a magic word."""
    if not isinstance(value, str):
        raise DocumentError(
            f"a permission handle must be a string, got {value!r}", document=document, field=where, value=value
        )
    if len(value) > MAX_HANDLE_LEN:
        raise DocumentError(
            f"a handle has at most {MAX_HANDLE_LEN} characters, this one {len(value)}",
            document=document,
            field=where,
            value=value,
        )
    parts = value.split(":")
    magic = [p for p in parts if p in MAGIC_WORDS or "*" in p]
    if magic:
        raise DocumentError(
            f"{value!r} uses {magic[0]!r}: wildcards and magic words are not allowed; list each handle",
            document=document,
            field=where,
            value=value,
        )
    if not HANDLE_RE.fullmatch(value):
        raise DocumentError(
            f"{value!r} is not a handle (resource:action or resource:action:attribute, lower-case)",
            document=document,
            field=where,
            value=value,
        )
    return value


def check_scope(value: Any, document: str, where: str) -> str:
    if not isinstance(value, str) or not SCOPE_RE.fullmatch(value) or value.split(":", 1)[1] in MAGIC_WORDS:
        raise DocumentError(
            f"{value!r} is not a scope (kind:value such as 'account:acme', no wildcards)",
            document=document,
            field=where,
            value=value,
        )
    return value


def _is_principal(value: Any) -> bool:
    return (
        type(value) is str
        and 0 < len(value) <= MAX_PRINCIPAL_LEN
        and value.isprintable()
        and not value[0].isspace()
        and not value[-1].isspace()
        and value not in MAGIC_WORDS
    )


def check_principal(value: Any, document: str, where: str) -> str:
    if not _is_principal(value):
        raise DocumentError(f"{value!r} is not a principal", document=document, field=where, value=value)
    return value  # type: ignore[no-any-return]


def check_description(value: Any, document: str, where: str) -> str:
    text = _string(value, document, where)
    if len(text) > MAX_DESCRIPTION_LEN:
        raise DocumentError(
            f"a description has at most {MAX_DESCRIPTION_LEN} characters, this one {len(text)}",
            document=document,
            field=where,
            value=text,
        )
    return text


def check_role(value: Any, document: str, where: str) -> str:
    if not isinstance(value, str) or not ROLE_RE.fullmatch(value):
        raise DocumentError(f"{value!r} is not a role name", document=document, field=where, value=value)
    return value


def check_version(value: Any, document: str, where: str = "version") -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DocumentError(f"{value!r} is not a version", document=document, field=where, value=value)
    text = str(value)
    if not VERSION_RE.fullmatch(text):
        raise DocumentError(
            f"{text!r} is not a version (letters, digits, '.', '_', '-'; at most 64)",
            document=document,
            field=where,
            value=value,
        )
    return text


def _mapping(value: Any, document: str, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise DocumentError(
            f"expected a mapping, got {type(value).__name__}", document=document, field=where, value=value
        )
    return value


def _sequence(value: Any, document: str, where: str) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise DocumentError(f"expected a list, got {type(value).__name__}", document=document, field=where, value=value)
    return value


def _string(value: Any, document: str, where: str) -> str:
    if not isinstance(value, str):
        raise DocumentError(f"expected a string, got {value!r}", document=document, field=where, value=value)
    return value


def _only(data: Mapping[Any, Any], allowed: frozenset[str], document: str, where: str = "") -> None:
    if data.keys() <= allowed:
        return
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise DocumentError(
            f"unknown field {unknown[0]!r} (expected one of: {', '.join(sorted(allowed))})",
            document=document,
            field=f"{prefix}{unknown[0]}",
            value=unknown[0],
        )


# --- documents -----------------------------------------------------------------------------------

_META_FIELDS = frozenset({"version", "request_id", "parent", "author", "reason", "created_at"})
_SET_FIELDS = frozenset({"roles", "grants", "changes"}) | _META_FIELDS
_CHANGE_FIELDS = frozenset({"role", "add", "remove", "principal", "grant", "revoke"})
_ROLLOUT_FIELDS = frozenset({"weights", "testers", "state"})
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
            values[name] = raw.isoformat() if hasattr(raw, "isoformat") else _string(raw, document, name)
    return Metadata(**values)


def parse_permission_set(data: Any, document: str, *, extra_fields: frozenset[str] = frozenset()) -> PermissionSet:
    """Build a PermissionSet; refuse anything that is not exactly the documented shape."""
    data = _mapping(data, document, "")
    _only(data, _SET_FIELDS | extra_fields, document)
    roles_raw = _mapping(data.get("roles", {}), document, "roles")
    roles: dict[str, tuple[str, ...]] = {}
    for name, handles_raw in roles_raw.items():
        where = f"roles.{name}"
        check_role(name, document, where)
        handles = tuple(
            check_handle(h, document, f"{where}[{i}]") for i, h in enumerate(_sequence(handles_raw, document, where))
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
    for i, item in enumerate(_sequence(raw or [], document, "changes")):
        where = f"changes[{i}]"
        entry = _mapping(item, document, where)
        _only(entry, _CHANGE_FIELDS, document, where)

        def names(key: str, check: Any, entry: Mapping[Any, Any] = entry, where: str = where) -> tuple[str, ...]:
            values = _sequence(entry.get(key, []) or [], document, f"{where}.{key}")
            return tuple(check(v, document, f"{where}.{key}[{j}]") for j, v in enumerate(values))

        role, principal = entry.get("role"), entry.get("principal")
        if (role is None) == (principal is None):
            raise DocumentError("a change names exactly one of role or principal", document=document, field=where)
        if role is not None:
            if set(entry) & {"grant", "revoke"}:
                raise DocumentError("a role change adds or removes handles", document=document, field=where)
            change = DeclaredChange(
                role=check_role(role, document, f"{where}.role"),
                add=names("add", check_handle),
                remove=names("remove", check_handle),
            )
        else:
            if set(entry) & {"add", "remove"}:
                raise DocumentError("a principal change grants or revokes roles", document=document, field=where)
            change = DeclaredChange(
                principal=check_principal(principal, document, f"{where}.principal"),
                grant=names("grant", check_role),
                revoke=names("revoke", check_role),
            )
        changes.append(change)
    return tuple(changes)


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


def _grants(grants_raw: Any, roles: Mapping[str, tuple[str, ...]], document: str) -> tuple[Grant, ...]:
    """Grants, checked with a fast path for the common, valid shape (a set may hold a million): each
    distinct role combination and scope is checked once, principals in bulk after the loop, and the
    field path of a problem is worked out only when there is one."""
    rows = _sequence(grants_raw, document, "grants")
    known_roles = roles.keys()
    role_lists: dict[tuple[str, ...], tuple[str, ...]] = {}  # checked combinations, one tuple each
    scopes: dict[str, str] = {}  # checked scopes, one string each
    principals: list[Any] = []
    grants: list[Grant] = []
    add_principal = principals.append
    add = grants.append
    new_grant = partial(tuple.__new__, Grant)  # skips the named tuple's Python-level __new__
    for i, raw in enumerate(rows):
        if type(raw) is not dict or not raw.keys() <= _GRANT_FIELDS:
            _only(_mapping(raw, document, f"grants[{i}]"), _GRANT_FIELDS, document, f"grants[{i}]")
        principal = raw.get("principal")
        add_principal(principal)
        names = raw.get("roles")
        try:
            role_names = role_lists.get(tuple(names)) if type(names) is list else None
        except TypeError:  # an unhashable role name; the check below says what is wrong
            role_names = None
        if role_names is None:
            _check_grant_roles(names, known_roles, document, f"grants[{i}].roles")
            role_names = role_lists[tuple(names)] = tuple(names)
        scope = raw.get("scope")
        if scope is not None:
            checked = scopes.get(scope) if type(scope) is str else None
            if checked is None:
                checked = scopes[scope] = check_scope(scope, document, f"grants[{i}].scope")
            scope = checked
        add(new_grant((principal, role_names, scope)))
    _check_principals(principals, document)
    return tuple(grants)


def _check_principals(principals: list[Any], document: str) -> None:
    """Check every grant's principal with a few passes in C; name the first bad one if any is.

    A principal is printable, so the only whitespace it can hold is the ASCII space, and it may not
    start or end with one: joined with newlines, that is a space next to a newline or at an end."""
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
        for i, principal in enumerate(principals):
            check_principal(principal, document, f"grants[{i}].principal")


def _check_grant_roles(names: Any, known: Any, document: str, where: str) -> None:
    """Raise the precise error for a grant's roles (only called when they are not plainly valid)."""
    role_names = tuple(_sequence(names if names is not None else [], document, where))
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
    weights_raw = _mapping(data.get("weights", {}) or {}, document, "weights")
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
        for i, t in enumerate(_sequence(data.get("testers", []) or [], document, "testers"))
    )
    state = data.get("state", "canary" if any(weights.values()) else "proposed")
    if state not in SHADOW_STATES:
        raise DocumentError(
            f"state {state!r} is not one of {', '.join(sorted(SHADOW_STATES))} for a live shadow",
            document=document,
            field="state",
            value=state,
        )
    return Rollout(weights=weights, testers=testers, state=state)


def parse_shadow(data: Any, document: str) -> ShadowSet:
    """A shadow is a permission set plus its rollout; it must name its version."""
    permissions = parse_permission_set(data, document, extra_fields=_ROLLOUT_FIELDS)
    if not permissions.meta.version:
        raise DocumentError("a shadow set needs a version", document=document, field="version", value=None)
    return ShadowSet(permissions=permissions, rollout=parse_rollout(_mapping(data, document, ""), document))


_CATALOG_FIELDS = frozenset({"service", "permissions", "routes"})
_PERMISSION_FIELDS = frozenset({"handle", "description"})
_ROUTE_FIELDS = frozenset({"method", "path", "permission", "scope"})
_TEMPLATE_SEGMENT = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}|[^{}\s\x00-\x1f\x7f]+")


def _bounded(value: Any, limit: int, document: str, where: str) -> Sequence[Any]:
    items = _sequence(value, document, where)
    if len(items) > limit:
        raise DocumentError(
            f"{len(items)} {where}; a service's catalog holds at most {limit}", document=document, field=where
        )
    return items


def parse_catalog(data: Any, document: str) -> Catalog:
    """A service's catalog: the handles it owns and the route each one guards."""
    data = _mapping(data, document, "")
    _only(data, _CATALOG_FIELDS, document)
    service = data.get("service")
    if not isinstance(service, str) or not SERVICE_RE.fullmatch(service):
        raise DocumentError(f"{service!r} is not a service name", document=document, field="service", value=service)
    permissions: list[Permission] = []
    seen: set[str] = set()
    for i, item in enumerate(_bounded(data.get("permissions", []), MAX_CATALOG_PERMISSIONS, document, "permissions")):
        where = f"permissions[{i}]"
        raw = _mapping(item, document, where)
        _only(raw, _PERMISSION_FIELDS, document, where)
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
        raw = _mapping(item, document, where)
        _only(raw, _ROUTE_FIELDS, document, where)
        method = raw.get("method")
        if method not in HTTP_METHODS:
            raise DocumentError(
                f"method {method!r} is not one of {', '.join(sorted(HTTP_METHODS))}",
                document=document,
                field=f"{where}.method",
                value=method,
            )
        path = _string(raw.get("path"), document, f"{where}.path")
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
            scope = _string(scope, document, f"{where}.scope")
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
