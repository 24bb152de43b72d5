"""Every check a document's field goes through, each refusal a DocumentError naming the document,
the field path and the offending value.

Names are matched whole and never hold a control character: versions, handles, roles, scopes and
principals reach response headers, logs and metric labels. The bounds on what a service registers
live here too, so catalogs, the Registry and ``ctl registry put`` share them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

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
# stale: its parent is no longer active (another change was promoted); it is never enforced again.
SHADOW_STATES = frozenset({"proposed", "canary", "stale"})
MAX_PRINCIPAL_LEN = 512
# Bounds on what a service registers (catalogs, the Registry, ctl registry put); see docs/policy-files.md.
MAX_HANDLE_LEN = 128
MAX_DESCRIPTION_LEN = 512
MAX_CATALOG_PERMISSIONS = 1000
MAX_CATALOG_ROUTES = 1000


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


def is_principal(value: Any) -> bool:
    return (
        type(value) is str
        and 0 < len(value) <= MAX_PRINCIPAL_LEN
        and value.isprintable()
        and not value[0].isspace()
        and not value[-1].isspace()
        and value not in MAGIC_WORDS
    )


def check_principal(value: Any, document: str, where: str) -> str:
    if not is_principal(value):
        raise DocumentError(f"{value!r} is not a principal", document=document, field=where, value=value)
    return value  # type: ignore[no-any-return]


def check_description(value: Any, document: str, where: str) -> str:
    text = string_of(value, document, where)
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


def mapping_of(value: Any, document: str, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise DocumentError(
            f"expected a mapping, got {type(value).__name__}", document=document, field=where, value=value
        )
    return value


def sequence_of(value: Any, document: str, where: str) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise DocumentError(f"expected a list, got {type(value).__name__}", document=document, field=where, value=value)
    return value


def string_of(value: Any, document: str, where: str) -> str:
    if not isinstance(value, str):
        raise DocumentError(f"expected a string, got {value!r}", document=document, field=where, value=value)
    return value


def only_fields(data: Mapping[Any, Any], allowed: frozenset[str], document: str, where: str = "") -> None:
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
