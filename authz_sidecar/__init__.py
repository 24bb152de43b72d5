"""authz-sidecar: an Envoy ext_authz sidecar that decides with an active permission set and
observes shadow sets beside it.

The public Python surface is re-exported here; everything else is internal and may change.
"""

from authz_sidecar.documents import load_document, parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.errors import AuthzError, ConfigError, DocumentError, IdentityError
from authz_sidecar.model.engine import CompiledSet, compile_set
from authz_sidecar.model.evaluation import Evaluation, Observation, evaluate
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import Selection, select, stable_bucket
from authz_sidecar.model.snapshot import Snapshot, build_snapshot
from authz_sidecar.model.values import Catalog, Grant, PermissionSet, Rollout, ShadowSet

__version__ = "0.1.0"

__all__ = [
    "AuthzError",
    "Catalog",
    "CompiledSet",
    "ConfigError",
    "DocumentError",
    "Evaluation",
    "Grant",
    "IdentityError",
    "Observation",
    "PermissionSet",
    "Reason",
    "Rollout",
    "Selection",
    "ShadowSet",
    "Snapshot",
    "__version__",
    "build_snapshot",
    "compile_set",
    "evaluate",
    "load_document",
    "parse_catalog",
    "parse_permission_set",
    "parse_shadow",
    "select",
    "stable_bucket",
]
