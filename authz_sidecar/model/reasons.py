"""Reason codes: one enum feeds the log field, the metric label, the response header and the body.

Every deny carries exactly one reason, so an operator can count, grep and alert on the same string
everywhere. The HTTP status each reason maps to is part of the code, not decided at the edge.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    ALLOWED = "allowed"
    # The request carried no identity any configured source accepts (401).
    NO_IDENTITY = "no_identity"
    # A credential was presented but failed verification; never falls back to a weaker source (401).
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - a reason code, not a secret
    # The principal has no grant at all in the deciding set (403).
    UNKNOWN_PRINCIPAL = "unknown_principal"
    # The principal is known but none of its grants carries the handle for this scope (403).
    MISSING_PERMISSION = "missing_permission"
    # Neither the route's context_extensions nor the catalog's route table names a handle (403).
    UNMAPPED_ROUTE = "unmapped_route"
    # The request lacks the attributes a decision needs, or they are unusable (400).
    MALFORMED_REQUEST = "malformed_request"
    # FilterManifest only: one block of a manifest is unusable (no id, no account, an account that
    # makes no scope, a field over its bound); that block is refused, the others are judged (400).
    MALFORMED_BLOCK = "malformed_block"
    # No valid snapshot has been loaded yet, or it is older than --max-staleness (503).
    NO_SNAPSHOT = "no_snapshot"
    # An unexpected fault inside the sidecar; the request is denied, never allowed (500).
    INTERNAL_ERROR = "internal_error"
    # HTTP front only, refused before any decision: the URL or headers over their bounds (431), the
    # body over its bound (413), the request not complete within --http-authz-request-timeout (408).
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TIMEOUT = "request_timeout"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS: dict[Reason, int] = {
    Reason.ALLOWED: 200,
    Reason.NO_IDENTITY: 401,
    Reason.INVALID_TOKEN: 401,
    Reason.UNKNOWN_PRINCIPAL: 403,
    Reason.MISSING_PERMISSION: 403,
    Reason.UNMAPPED_ROUTE: 403,
    Reason.MALFORMED_REQUEST: 400,
    Reason.MALFORMED_BLOCK: 400,
    Reason.NO_SNAPSHOT: 503,
    Reason.INTERNAL_ERROR: 500,
    Reason.HEADERS_TOO_LARGE: 431,
    Reason.BODY_TOO_LARGE: 413,
    Reason.REQUEST_TIMEOUT: 408,
}
