"""A throwaway JWT issuer for local meshes and tests: an RSA key, its JWKS, and signed tokens.

Envoy's jwt_authn verifies these tokens with the JWKS file written here, exactly as it would verify
a real identity provider's tokens; only the issuer is local.

As a command it serves containers (deploy/docker-compose.yml's init service, the Kubernetes pods'
init container): ``python -m authz_sidecar.local.tokens --key issuer.pem --jwks jwks.json --tokens
tokens.env`` loads the issuer's key from the PEM file (creating it the first time), so that a re-run
writes the same JWKS that a running Envoy already holds, and mints fresh tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz_sidecar.store.sources.files import write_atomically

DEMO_ISSUER = "https://issuer.authz-sidecar.local"
DEMO_AUDIENCE = "things"


class DemoIssuer:
    def __init__(self, issuer: str = DEMO_ISSUER, kid: str = "demo-1", key: rsa.RSAPrivateKey | None = None) -> None:
        self.issuer = issuer
        self.kid = kid
        self._key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write_key(self, path: Path) -> Path:
        """The private key as PEM, readable by its owner only: ``make demo`` (another process)
        mints tokens for principals the running mesh's tokens.env does not hold, and Envoy must
        verify them with the keys it was started with."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)
        return path

    @classmethod
    def from_key(cls, path: Path, issuer: str = DEMO_ISSUER, kid: str = "demo-1") -> DemoIssuer:
        """The issuer whose key :meth:`write_key` wrote."""
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: not an RSA private key")
        return cls(issuer, kid, key)

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


DEMO_PRINCIPALS = ("alice", "bob", "carol", "dave", "qa-bot")


def token_variable(principal: str) -> str:
    """The environment variable a principal's token is written under: qa-bot -> TOKEN_QA_BOT."""
    return "TOKEN_" + re.sub(r"[^A-Za-z0-9]", "_", principal).upper()


def _issuer(key: Path | None, issuer: str) -> DemoIssuer:
    """The issuer whose key is in `key`, created there the first time (kept across runs, it keeps
    the JWKS, and the tokens, valid); without `key`, a new one."""
    if key is None:
        return DemoIssuer(issuer)
    if key.exists():
        return DemoIssuer.from_key(key, issuer)
    created = DemoIssuer(issuer)
    created.write_key(key)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m authz_sidecar.local.tokens",
        description="The demo JWT issuer: write its JWKS (for Envoy's jwt_authn) and tokens for the demo principals.",
    )
    parser.add_argument("--key", type=Path, help="the issuer's RSA key (PEM), created if missing; default: a new key")
    parser.add_argument("--jwks", type=Path, help="write the JWKS here (world-readable)")
    parser.add_argument("--tokens", type=Path, help="write TOKEN_<PRINCIPAL>=... lines here; default: stdout")
    parser.add_argument("--principals", default=",".join(DEMO_PRINCIPALS), help="comma-separated")
    parser.add_argument("--ttl", type=int, default=86400, help="seconds the tokens live")
    parser.add_argument("--issuer", default=DEMO_ISSUER, help="the iss claim (Envoy's --jwt-issuer)")
    parser.add_argument("--audience", default=DEMO_AUDIENCE, help="the aud claim")
    args = parser.parse_args(argv)
    principals = [p.strip() for p in args.principals.split(",") if p.strip()]
    if args.ttl <= 0:
        parser.error("--ttl must be positive")
    try:
        issuer = _issuer(args.key, args.issuer)
    except (OSError, ValueError) as exc:
        print(f"tokens: --key {args.key}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    if args.jwks:
        write_atomically(args.jwks, json.dumps(issuer.jwks()) + "\n", mode=0o644)
    lines = "".join(
        f"{token_variable(p)}={issuer.token(p, ttl=args.ttl, audience=args.audience)}\n" for p in principals
    )
    if args.tokens:
        write_atomically(args.tokens, lines, mode=0o600)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
