"""Verify a bearer JWT against a local JWKS: signature, algorithm allow-list, exp/nbf/iss/aud.

Verified tokens are cached until they expire so that a client re-sending its token costs one dict
lookup instead of a signature check. `none` can never be allowed, and the algorithm must also match
the key's type, so a token cannot pick a weaker algorithm than the key was issued for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt

from authz_sidecar.errors import ConfigError, IdentityError

DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
_CACHE_LIMIT = 10_000
LEEWAY_SECONDS = 30


class TokenVerifier:
    __slots__ = ("_algorithms", "_audiences", "_cache", "_claim", "_issuers", "_keys")

    def __init__(
        self,
        jwks: Mapping[str, Any],
        *,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        issuers: Iterable[str] = (),
        audiences: Iterable[str] = (),
        principal_claim: str = "sub",
    ) -> None:
        self._algorithms = tuple(algorithms)
        if not self._algorithms or any(a.lower() == "none" for a in self._algorithms):
            raise ConfigError("--jwt-algorithms must list real algorithms; 'none' is never accepted")
        raw_keys = jwks.get("keys")
        if not isinstance(raw_keys, list) or not raw_keys:
            raise ConfigError("JWKS has no 'keys' list")
        self._keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}
        for raw in raw_keys:
            try:
                key = jwt.PyJWK(raw)
            except jwt.PyJWTError as exc:
                raise ConfigError(f"JWKS key {raw.get('kid', '?')!r} is not usable: {exc}") from None
            self._keys[key.key_id or ""] = (key, raw.get("alg"))
        self._issuers = tuple(issuers)
        self._audiences = tuple(audiences)
        self._claim = principal_claim
        self._cache: dict[str, tuple[str, float]] = {}

    @classmethod
    def from_file(cls, path: Path, **kwargs: Any) -> TokenVerifier:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--jwks-file {path}: {exc}") from None
        return cls(data, **kwargs)

    def principal(self, token: str) -> str:
        """Return the principal claim of a valid token, or raise IdentityError saying why not."""
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp = cached
            if time.time() < exp + LEEWAY_SECONDS:
                return principal
            del self._cache[token]
        claims = self._verify(token)
        claimed = claims.get(self._claim)
        if not isinstance(claimed, str) or not claimed:
            raise IdentityError(f"token has no string {self._claim!r} claim")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (claimed, float(claims["exp"]))
        return claimed

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise IdentityError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise IdentityError(f"token algorithm {alg!r} is not allowed")
        kid = header.get("kid") or ""
        entry = self._keys.get(kid)
        if entry is None and not kid and len(self._keys) == 1:
            entry = next(iter(self._keys.values()))
        if entry is None:
            raise IdentityError(f"no key with id {kid!r}")
        key, declared = entry
        if declared and declared != alg:
            raise IdentityError(f"token algorithm {alg!r} does not match the key's {declared!r}")
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
        except jwt.PyJWTError as exc:
            raise IdentityError(f"token rejected: {exc}") from None
        return claims
