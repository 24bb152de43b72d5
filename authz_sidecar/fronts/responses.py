"""Render decisions as ext_authz CheckResponses, built once and reused.

A response depends only on a few values (the set that decided, how it was selected; or the deny
reason and the missing permission), so each distinct one is built on first use and returned as the
same message afterwards. gRPC serialises it without mutating it. Headers the sidecar adds overwrite
any the client sent, so a client cannot forge ``x-authz-decided-by`` to the upstream.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from authz_sidecar._proto.envoy.config.core.v3 import base_pb2
from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar._proto.envoy.type.v3 import http_status_pb2
from authz_sidecar.caches import remember
from authz_sidecar.model.reasons import Reason

DECIDED_BY_HEADER = "x-authz-decided-by"
SET_VERSION_HEADER = "x-authz-set-version"
REASON_HEADER = "x-authz-reason"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CACHE_LIMIT = 4096

_RPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    500: code_pb2.INTERNAL,
    503: code_pb2.UNAVAILABLE,
    408: code_pb2.DEADLINE_EXCEEDED,
    413: code_pb2.RESOURCE_EXHAUSTED,
    431: code_pb2.RESOURCE_EXHAUSTED,
}
_ERROR_WORD = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 500: "internal_error", 503: "unavailable"}
_ERROR_WORD.update({408: "request_timeout", 413: "content_too_large", 431: "request_header_fields_too_large"})


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def deny_body(reason: Reason, permission: str | None) -> str:
    body: dict[str, str] = {"error": _ERROR_WORD[reason.http_status], "reason": reason.value}
    if permission:
        body["permission"] = permission
    return json.dumps(body, separators=(",", ":"))


class Rendered(NamedTuple):
    """A response as a message (for in-process callers and tests) and as wire bytes (for the server,
    which then serialises nothing per request)."""

    message: pb.CheckResponse
    wire: bytes


def _rendered(message: pb.CheckResponse) -> Rendered:
    return Rendered(message, message.SerializeToString())


class ResponseCache:
    __slots__ = ("_allow", "_deny")

    def __init__(self) -> None:
        self._allow: dict[tuple[str, str, str], Rendered] = {}
        self._deny: dict[tuple[Reason, str | None], Rendered] = {}

    def allow(self, decided_by: str, version: str, selection: str) -> Rendered:
        key = (decided_by, version, selection)
        response = self._allow.get(key)
        if response is None:
            metadata = Struct()
            metadata.update({"decided_by": decided_by, "set_version": version, "selection": selection})
            response = _rendered(
                pb.CheckResponse(
                    status=status_pb2.Status(code=code_pb2.OK),
                    ok_response=pb.OkHttpResponse(
                        headers=[_header(DECIDED_BY_HEADER, decided_by), _header(SET_VERSION_HEADER, version)]
                    ),
                    dynamic_metadata=metadata,
                )
            )
            remember(self._allow, key, response, _CACHE_LIMIT)
        return response

    def deny(self, reason: Reason, permission: str | None = None) -> Rendered:
        key = (reason, permission)
        response = self._deny.get(key)
        if response is None:
            status = reason.http_status
            headers = [_header("content-type", "application/json"), _header(REASON_HEADER, reason.value)]
            if status == 401:
                headers.append(_header("www-authenticate", 'Bearer realm="authz-sidecar"'))
            response = _rendered(
                pb.CheckResponse(
                    status=status_pb2.Status(code=_RPC_CODE[status], message=reason.value),
                    denied_response=pb.DeniedHttpResponse(
                        status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
                        headers=headers,
                        body=deny_body(reason, permission),
                    ),
                )
            )
            remember(self._deny, key, response, _CACHE_LIMIT)
        return response
