"""Who is asking: the principal of a request, from the sources configured, in their order.

Sources (DESIGN section 4), each a function over plain request values:

- ``jwt_authn``: the payload Envoy's jwt_authn filter verified and put in dynamic metadata
  (namespace ``envoy.filters.http.jwt_authn``, under the key named by ``payload_in_metadata``;
  when no key is configured, whichever payload is there).
- ``jwt``: a bearer token in the Authorization header, verified here against a JWKS file or URL
  (kept current in the background by :mod:`authz_sidecar.decision.jwks`).
- ``mtls``: the peer's certificate identity as Envoy reports it (``source.principal``, SPIFFE).
- ``payload_header``: the verified payload Envoy's jwt_authn forwards (``forward_payload_header``,
  base64url JSON), for the HTTP ext_authz front, which receives no dynamic metadata. Trust it only
  when Envoy's jwt_authn requires a valid token on every route (so the header is always Envoy's).
- ``header``: a plain header, trusted as-is. Only for local development, only when named.

Rule: the first source that finds a credential decides. A credential that is present but invalid
denies (401) rather than falling through to a later, possibly weaker source.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct

from authz_sidecar.caches import remember
from authz_sidecar.decision.tokens import TokenVerifier
from authz_sidecar.documents import MAX_PRINCIPAL_LEN
from authz_sidecar.errors import ConfigError, IdentityError

JWT_AUTHN_NAMESPACE = "envoy.filters.http.jwt_authn"
SOURCES = ("jwt_authn", "jwt", "mtls", "payload_header", "header")
DEFAULT_PAYLOAD_HEADER = "x-jwt-payload"
_CACHE_LIMIT = 10_000


class RequestIdentityInputs(NamedTuple):
    """What identity sources read. Mappings are the request's own objects, never copies. A named
    tuple: one is made per Check, and a frozen dataclass's __init__ costs several times as much."""

    headers: Mapping[str, str]
    # Envoy's metadata_context.filter_metadata: filter name -> google.protobuf.Struct.
    filter_metadata: Mapping[str, Any]
    peer_principal: str


Source = Callable[[RequestIdentityInputs], str | None]


def _checked(principal: str, source: str) -> str:
    if len(principal) > MAX_PRINCIPAL_LEN or not principal.isprintable():
        raise IdentityError(f"{source}: principal is too long or not printable")
    return principal


def jwt_authn_source(payload_key: str, claim: str, namespace: str = JWT_AUTHN_NAMESPACE) -> Source:
    """The namespace's value is a google.protobuf.Struct, or its serialised bytes (what the gRPC
    front's request view holds): bytes are read once and what they name is kept, since Envoy puts the
    same bytes there for every request made with one token."""
    named: dict[bytes, str | None] = {}

    def from_struct(meta: Any) -> str | None:
        fields = meta.fields
        if payload_key:
            payload = fields.get(payload_key)
        else:
            payload = next((v for v in fields.values() if v.HasField("struct_value")), None)
        if payload is None or not payload.HasField("struct_value"):
            return None
        value = payload.struct_value.fields.get(claim)
        if value is None or not value.HasField("string_value") or not value.string_value:
            raise IdentityError(f"jwt_authn payload has no string {claim!r} claim")
        return _checked(value.string_value, "jwt_authn")

    def read(inputs: RequestIdentityInputs) -> str | None:
        meta = inputs.filter_metadata.get(namespace)
        if meta is None:
            return None
        if not isinstance(meta, bytes):
            return from_struct(meta)
        if meta in named:
            return named[meta]
        try:
            struct = Struct.FromString(meta)
        except DecodeError:
            raise IdentityError("jwt_authn metadata is not a google.protobuf.Struct") from None
        # An invalid payload raises before it is kept: it is read again each time, and denied each time.
        return remember(named, meta, from_struct(struct), _CACHE_LIMIT)

    return read


def bearer_source(verifier: TokenVerifier, header: str = "authorization") -> Source:
    def read(inputs: RequestIdentityInputs) -> str | None:
        value = inputs.headers.get(header)
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return _checked(verifier.principal(token.strip()), "jwt")

    return read


def payload_header_source(name: str, claim: str) -> Source:
    """Decode a base64url JSON payload header; decoded values are cached, since clients repeat them."""
    cache: dict[str, str] = {}

    def read(inputs: RequestIdentityInputs) -> str | None:
        value = inputs.headers.get(name)
        if not value:
            return None
        principal = cache.get(value)
        if principal is None:
            try:
                payload = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
            except (ValueError, TypeError):
                raise IdentityError(f"{name} is not base64url JSON") from None
            claimed = payload.get(claim) if isinstance(payload, dict) else None
            if not isinstance(claimed, str) or not claimed:
                raise IdentityError(f"{name} has no string {claim!r} claim")
            principal = _checked(claimed, "payload_header")
            remember(cache, value, principal, _CACHE_LIMIT)
        return principal

    return read


def mtls_source(inputs: RequestIdentityInputs) -> str | None:
    return _checked(inputs.peer_principal, "mtls") if inputs.peer_principal else None


def header_source(name: str) -> Source:
    def read(inputs: RequestIdentityInputs) -> str | None:
        value = inputs.headers.get(name)
        return _checked(value, "header") if value else None

    return read


class Identifier:
    """Runs the configured sources in order; returns the principal, or None when no source found one."""

    __slots__ = ("_sources", "names")

    def __init__(self, sources: Sequence[tuple[str, Source]]) -> None:
        if not sources:
            raise ConfigError("no identity source configured")
        self.names = tuple(name for name, _ in sources)
        self._sources = tuple(source for _, source in sources)

    def identify(self, inputs: RequestIdentityInputs) -> str | None:
        """Raise IdentityError when a credential is present but invalid."""
        for source in self._sources:
            principal = source(inputs)
            if principal is not None:
                return principal
        return None


def check_sources(names: Sequence[str], *, has_keys: bool, dev_header: str | None) -> None:
    """Refuse an unknown source, or one whose prerequisite the settings lack: the one statement of
    what each source needs, used when settings are validated and when the identifier is built."""
    for name in names:
        if name not in SOURCES:
            raise ConfigError(f"--identity: unknown source {name!r} (expected one of: {', '.join(SOURCES)})")
        if name == "jwt" and not has_keys:
            raise ConfigError("--identity jwt needs --jwks-file FILE or --jwks-url URL")
        if name == "header" and not dev_header:
            raise ConfigError("--identity header needs --dev-principal-header NAME (development only)")


def build_identifier(
    names: Sequence[str],
    *,
    jwt_authn_payload_key: str = "",
    principal_claim: str = "sub",
    verifier: TokenVerifier | None = None,
    dev_header: str | None = None,
    payload_header: str = DEFAULT_PAYLOAD_HEADER,
) -> Identifier:
    """Assemble the sources named in `names`, refusing ones whose settings are missing."""
    check_sources(names, has_keys=verifier is not None, dev_header=dev_header)
    sources: list[tuple[str, Source]] = []
    for name in names:
        if name == "jwt_authn":
            sources.append((name, jwt_authn_source(jwt_authn_payload_key, principal_claim)))
        elif name == "jwt" and verifier is not None:
            sources.append((name, bearer_source(verifier)))
        elif name == "mtls":
            sources.append((name, mtls_source))
        elif name == "payload_header":
            sources.append((name, payload_header_source(payload_header.lower(), principal_claim)))
        elif name == "header" and dev_header:
            sources.append((name, header_source(dev_header.lower())))
    return Identifier(sources)
