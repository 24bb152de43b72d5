"""A throwaway JWT issuer for local meshes and tests: an RSA key, its JWKS, and signed tokens.

Envoy's jwt_authn verifies these tokens with the JWKS file written here, exactly as it would verify
a real identity provider's tokens; only the issuer is local.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEMO_ISSUER = "https://issuer.authz-sidecar.local"
DEMO_AUDIENCE = "things"


class DemoIssuer:
    def __init__(self, issuer: str = DEMO_ISSUER, kid: str = "demo-1") -> None:
        self.issuer = issuer
        self.kid = kid
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self.kid, "alg": "RS256", "use": "sig"})
        return {"keys": [jwk]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def public_pem(self, fmt: serialization.PublicFormat = serialization.PublicFormat.SubjectPublicKeyInfo) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.PEM, fmt)

    def sign(self, payload: dict[str, Any]) -> str:
        """Any payload, exactly as given (no claims added), signed with this issuer's key and kid."""
        return jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": self.kid})

    def token(self, sub: str, *, ttl: int = 3600, audience: str = DEMO_AUDIENCE, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "sub": sub, "aud": audience, "iat": now, "exp": now + ttl, **claims}
        return jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": self.kid})
