"""Reading YAML and JSON documents into the model's values, and every check with its error.

The public functions are re-exported here: ``load_document`` (text to data), the ``parse_*``
functions (data to values), the ``check_*`` field checks and the bounds a service's catalog keeps.
"""

from authz_sidecar.documents.checks import (
    HANDLE_RE,
    MAGIC_WORDS,
    MAX_CATALOG_PERMISSIONS,
    MAX_CATALOG_ROUTES,
    MAX_DESCRIPTION_LEN,
    MAX_HANDLE_LEN,
    MAX_PRINCIPAL_LEN,
    SCOPE_RE,
    VERSION_RE,
    check_description,
    check_handle,
    check_principal,
    check_role,
    check_scope,
    check_version,
)
from authz_sidecar.documents.loading import load_document
from authz_sidecar.documents.parsers import (
    dump_permission_set,
    parse_catalog,
    parse_permission_set,
    parse_rollout,
    parse_shadow,
)

__all__ = [
    "HANDLE_RE",
    "MAGIC_WORDS",
    "MAX_CATALOG_PERMISSIONS",
    "MAX_CATALOG_ROUTES",
    "MAX_DESCRIPTION_LEN",
    "MAX_HANDLE_LEN",
    "MAX_PRINCIPAL_LEN",
    "SCOPE_RE",
    "VERSION_RE",
    "check_description",
    "check_handle",
    "check_principal",
    "check_role",
    "check_scope",
    "check_version",
    "dump_permission_set",
    "load_document",
    "parse_catalog",
    "parse_permission_set",
    "parse_rollout",
    "parse_shadow",
]
