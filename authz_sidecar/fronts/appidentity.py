"""Who an application's call is for, and whether to believe it.

An application either forwards its end user's token, verified here as Envoy-less JWTs are (the same
keys, issuers, audiences and principal claim), or names the principal itself. A bare principal is a
claim the sidecar cannot check, so it is taken only from callers the sidecar is configured to trust
(``--app-trusted-peers``, by default its Unix socket and loopback: code in the same pod or host).
Everyone else must send a token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from authz_sidecar.decision.tokens import TokenVerifier
from authz_sidecar.errors import ConfigError, IdentityError

DEFAULT_TRUSTED = ("loopback", "unix")
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class AppRefusedError(Exception):
    """The call cannot be answered as asked: a gRPC status and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class TrustedPeers:
    unix: bool
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Iterable[str], flag: str = "--app-trusted-peers") -> TrustedPeers:
        """``loopback``, ``unix``, ``none`` or CIDRs such as ``10.0.0.0/8``."""
        unix = False
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (e.strip() for e in entries):
            if entry == "unix":
                unix = True
            elif entry == "loopback":
                networks.extend(_LOOPBACK)
            elif entry and entry != "none":
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ConfigError(f"{flag}: {entry!r} is not loopback, unix, none or a CIDR") from None
        return cls(unix, tuple(networks))

    def trusts(self, peer: str) -> bool:
        """gRPC's peer string: ``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``, ``unix:/path`` or ``unix:``."""
        kind, _sep, rest = peer.partition(":")
        if kind == "unix":
            return self.unix
        if kind == "ipv4":
            host = rest.rpartition(":")[0]
        elif kind == "ipv6":
            host = rest.rpartition(":")[0].strip("[]")
        else:
            return False
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        return any(address in network for network in self.networks)


class AppIdentity:
    def __init__(self, verifier: TokenVerifier | None, trusted: TrustedPeers) -> None:
        self.verifier = verifier
        self.trusted = trusted

    def principal(self, principal: str, token: str, peer: str) -> str:
        """The principal the call is for; AppRefusedError when neither a valid token nor a trusted caller
        vouches for it."""
        if token:
            if self.verifier is None:
                raise AppRefusedError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this sidecar verifies no tokens (start it with --jwks-file or --jwks-url)",
                )
            try:
                subject = self.verifier.principal(token)
            except IdentityError as exc:
                raise AppRefusedError(grpc.StatusCode.UNAUTHENTICATED, f"token refused: {exc}") from None
            if principal and principal != subject:
                raise AppRefusedError(
                    grpc.StatusCode.INVALID_ARGUMENT, "principal and the token's subject differ: send one"
                )
            return subject
        if not principal:
            return ""  # nobody named: decided as a malformed request (a counted, traced deny)
        if not self.trusted.trusts(peer):
            raise AppRefusedError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"a bare principal is taken only from trusted callers (--app-trusted-peers), not {peer}; "
                "send the end user's token",
            )
        return principal
