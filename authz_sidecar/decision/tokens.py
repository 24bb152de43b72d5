"""Verify a bearer JWT against a JWKS: signature, algorithm allow-list, exp/nbf/iss/aud.

The keys are a :class:`KeySet`, replaced whole when the JWKS is reloaded or refetched (by
:mod:`authz_sidecar.decision.jwks`, off the request path); a request reads it with one attribute load. Verified
tokens are cached with the key set they were verified against, so a client re-sending its token costs
one dict lookup instead of a signature check, and a rotation that removes a key drops the tokens it
signed with it: a thread still verifying against the old set can only fill the old set's cache.

`none` can never be allowed, and the token's algorithm must suit the key's type (an RSA key verifies
RS*/PS* only, never HS256 with the public key as the secret), whatever the key's `alg` says or omits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt

from authz_sidecar.caches import remember
from authz_sidecar.errors import ConfigError, IdentityError

DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
_CACHE_LIMIT = 10_000
LEEWAY_SECONDS = 30
# Which algorithms each JWK key type may verify (RFC 7518 section 3.1, RFC 8037).
_ALGORITHMS_BY_KEY_TYPE = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES256K", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
    "oct": frozenset({"HS256", "HS384", "HS512"}),
}


def _quoted(value: object, limit: int = 64) -> str:
    """A value a client chose, short enough for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class KeySet:
    """One JWKS's usable signing keys, immutable once built, with the tokens verified against them."""

    __slots__ = ("cache", "keys", "skipped")

    def __init__(self, keys: Mapping[str, tuple[jwt.PyJWK, str | None]], skipped: tuple[str, ...] = ()) -> None:
        self.keys = dict(keys)
        self.skipped = skipped
        # token -> (principal, exp); filled only by requests verified against these keys.
        self.cache: dict[str, tuple[str, float]] = {}

    @classmethod
    def parse(cls, data: object, origin: str) -> KeySet:
        """Keep the keys that can verify signatures; skip (and name) the others, such as encryption keys
        or key types this PyJWT cannot load. A set with no usable key is refused: it would deny every
        token, and keeping the last good set is better."""
        raw_keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(raw_keys, list):
            raise ConfigError(f"{origin}: not a JWKS (no 'keys' list)")
        keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}
        skipped: list[str] = []
        for raw in raw_keys:
            kid = raw.get("kid", "") if isinstance(raw, dict) else ""
            name = _quoted(kid) if kid else "(no kid)"
            if not isinstance(raw, dict) or not isinstance(kid, str):
                skipped.append(f"{name}: not a JWK object with a string kid")
                continue
            if raw.get("use", "sig") != "sig":
                skipped.append(f"{name}: use is {_quoted(raw.get('use'))}, not sig")
                continue
            try:
                key = jwt.PyJWK(raw)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
                skipped.append(f"{name}: {exc}")
                continue
            if key.key_type not in _ALGORITHMS_BY_KEY_TYPE:
                skipped.append(f"{name}: key type {_quoted(key.key_type)} is not a signing key type")
                continue
            declared = raw.get("alg")
            keys[kid] = (key, declared if isinstance(declared, str) else None)
        if not keys:
            reasons = "; ".join(skipped) if skipped else "the 'keys' list is empty"
            raise ConfigError(f"{origin}: no usable signing key ({reasons})")
        return cls(keys, tuple(skipped))

    @classmethod
    def from_file(cls, path: Path, flag: str = "--jwks-file") -> KeySet:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{flag} {path}: {exc}") from None
        return cls.parse(data, f"{flag} {path}")

    def kids(self) -> list[str]:
        return sorted(self.keys)


class TokenVerifier:
    """Verifies tokens against the installed key set. Without one (a JWKS URL not fetched yet), every
    token is refused: the sidecar never accepts a token it could not check."""

    __slots__ = ("_algorithms", "_audiences", "_claim", "_issuers", "_keyset", "_waiting_for", "on_unknown_kid")

    def __init__(
        self,
        jwks: Mapping[str, Any] | KeySet | None = None,
        *,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        issuers: Iterable[str] = (),
        audiences: Iterable[str] = (),
        principal_claim: str = "sub",
        waiting_for: str = "the JWKS",
    ) -> None:
        self._algorithms = tuple(algorithms)
        if not self._algorithms or any(a.lower() == "none" for a in self._algorithms):
            raise ConfigError("--jwt-algorithms must list real algorithms; 'none' is never accepted")
        self._keyset: KeySet | None = None
        if isinstance(jwks, KeySet):
            self._keyset = jwks
        elif jwks is not None:
            self._keyset = KeySet.parse(dict(jwks), "JWKS")
        self._issuers = tuple(issuers)
        self._audiences = tuple(audiences)
        self._claim = principal_claim
        self._waiting_for = waiting_for
        # Called (on the request's thread, so it must not block) when a token names a key this set
        # lacks: a JWKS refresher uses it to ask for an early, rate-limited refresh.
        self.on_unknown_kid: Callable[[], None] | None = None

    @property
    def keyset(self) -> KeySet | None:
        return self._keyset

    def install(self, keyset: KeySet) -> None:
        """Replace the keys (one reference swap); tokens verified against the old ones are forgotten."""
        self._keyset = keyset

    def principal(self, token: str) -> str:
        """Return the principal claim of a valid token, or raise IdentityError saying why not."""
        keyset = self._keyset
        if keyset is None:
            raise IdentityError(f"no signing keys yet from {self._waiting_for}; bearer tokens are denied until then")
        cached = keyset.cache.get(token)
        if cached is not None:
            principal, exp = cached
            if time.time() < exp + LEEWAY_SECONDS:
                return principal
            keyset.cache.pop(token, None)
        claims = self._verify(keyset, token)
        claimed = claims.get(self._claim)
        if not isinstance(claimed, str) or not claimed:
            raise IdentityError(f"token has no string {self._claim!r} claim")
        remember(keyset.cache, token, (claimed, float(claims["exp"])), _CACHE_LIMIT)
        return claimed

    def _verify(self, keyset: KeySet, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise IdentityError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise IdentityError(f"token algorithm {_quoted(alg)} is not allowed")
        kid = header.get("kid") or ""
        if not isinstance(kid, str):
            raise IdentityError("token kid is not a string")
        entry = keyset.keys.get(kid)
        if entry is None and not kid and len(keyset.keys) == 1:
            entry = next(iter(keyset.keys.values()))
        if entry is None:
            if kid and self.on_unknown_kid is not None:
                self.on_unknown_kid()
            raise IdentityError(f"no key with id {_quoted(kid)}")
        key, declared = entry
        if declared and declared != alg:
            raise IdentityError(f"token algorithm {alg!r} does not match the key's {declared!r}")
        if alg not in _ALGORITHMS_BY_KEY_TYPE.get(key.key_type or "", ()):
            raise IdentityError(f"token algorithm {alg!r} cannot be used with a {key.key_type} key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(self._audiences) or None,
                issuer=list(self._issuers) or None,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp"], "verify_aud": bool(self._audiences)},
            )
        # A key PyJWT cannot use for this algorithm is a TypeError, not a PyJWTError: still a 401.
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise IdentityError(f"token rejected: {exc}") from None
        return claims
