"""The demo service and the demo issuer as containers run them (deploy/): the service binds the
address it is given, and the issuer's command writes a JWKS and tokens from a key kept in a file,
so that a re-run (a second `docker compose up`) writes the JWKS a running Envoy already holds."""

from __future__ import annotations

import json
import stat
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authz_sidecar.local import tokens, upstream
from authz_sidecar.local.tokens import DEMO_AUDIENCE, DEMO_ISSUER, DemoIssuer, token_variable


def test_upstream_binds_the_host_it_is_given() -> None:
    server = upstream.make_server("0.0.0.0", 0)  # noqa: S104 - what a container asks for
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "0.0.0.0"  # noqa: S104
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/things/1", timeout=5) as response:
            body = json.loads(response.read())
        assert (body["service"], body["method"], body["path"]) == ("things", "GET", "/things/1")
    finally:
        server.shutdown()
        server.server_close()


def test_upstream_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, int]] = []

    class StopError(Exception):
        pass

    def fake(host: str, port: int) -> Any:
        asked.append((host, port))
        raise StopError

    monkeypatch.setattr(upstream, "make_server", fake)
    with pytest.raises(StopError):
        upstream.main(["--port", "8081"])
    with pytest.raises(StopError):
        upstream.main(["--host", "0.0.0.0", "--port", "8081"])  # noqa: S104
    assert asked == [("127.0.0.1", 8081), ("0.0.0.0", 8081)]  # noqa: S104


def _read_tokens(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_tokens_command_keeps_its_key_and_writes_jwks_and_tokens(tmp_path: Path) -> None:
    key, jwks_file, tokens_file = tmp_path / "issuer.pem", tmp_path / "jwks.json", tmp_path / "tokens.env"
    argv = ["--key", str(key), "--jwks", str(jwks_file), "--tokens", str(tokens_file), "--ttl", "600"]
    assert tokens.main([*argv, "--principals", "alice,qa-bot"]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(jwks_file.stat().st_mode) == 0o644  # Envoy runs as another user
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    first_key, first_jwks = key.read_bytes(), jwks_file.read_text()
    minted = _read_tokens(tokens_file)
    assert set(minted) == {"TOKEN_ALICE", "TOKEN_QA_BOT"}

    keys = jwt.PyJWKSet.from_dict(json.loads(first_jwks))
    for principal in ("alice", "qa-bot"):
        token = minted[token_variable(principal)]
        kid = jwt.get_unverified_header(token)["kid"]
        claims = jwt.decode(token, keys[kid].key, algorithms=["RS256"], audience=DEMO_AUDIENCE, issuer=DEMO_ISSUER)
        assert claims["sub"] == principal
        assert 590 <= claims["exp"] - time.time() <= 600

    # A second run (the init container again): the same key, so the same JWKS; fresh tokens.
    assert tokens.main(argv) == 0
    assert key.read_bytes() == first_key
    assert jwks_file.read_text() == first_jwks
    assert set(_read_tokens(tokens_file)) == {token_variable(p) for p in tokens.DEMO_PRINCIPALS}
    assert DemoIssuer.from_key(key).jwks() == json.loads(first_jwks)


def test_tokens_command_prints_tokens_without_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert tokens.main(["--principals", "bob"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TOKEN_BOB=ey") and out.count("\n") == 1
    # The Kubernetes pods' init container: the JWKS only, nothing minted or printed.
    assert tokens.main(["--key", str(tmp_path / "k.pem"), "--jwks", str(tmp_path / "j.json"), "--principals", ""]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "j.json").is_file()


def test_tokens_command_refuses_a_key_that_is_not_rsa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "issuer.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert tokens.main(["--key", str(key), "--jwks", str(tmp_path / "jwks.json")]) == 1
    assert "not an RSA private key" in capsys.readouterr().err
    assert not (tmp_path / "jwks.json").exists()
