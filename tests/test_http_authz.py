"""The HTTP variant of ext_authz (--http-authz): same decisions, HTTP/1.1 answers, keep-alive."""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_sidecar.local.tokens import DemoIssuer

from .conftest import RunningSidecar, sidecar_settings


def payload(sub: str) -> str:
    raw = json.dumps({"sub": sub, "iss": "demo"}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.fixture
def http_sidecar(policy_dir: Path, tmp_path: Path, issuer: DemoIssuer) -> Iterator[RunningSidecar]:
    side = RunningSidecar(
        sidecar_settings(
            policy_dir,
            http_authz="127.0.0.1:0",
            identity=("payload_header", "jwt"),
            jwks_file=issuer.write_jwks(tmp_path / "jwks.json"),
            jwt_audiences=("things",),
        )
    )
    try:
        side.wait_ready()
        yield side
    finally:
        side.close()


def ask(
    conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_decisions_over_one_keep_alive_connection(http_sidecar: RunningSidecar, issuer: DemoIssuer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_sidecar.sidecar.http_authz_port, timeout=5)
    try:
        status, headers, _ = ask(conn, "GET", "/things/1", {"x-jwt-payload": payload("bob")})
        assert status == 200 and headers["x-authz-decided-by"] == "active" and headers["x-authz-set-version"] == "v1"
        status, headers, body = ask(conn, "PUT", "/things/1", {"x-jwt-payload": payload("bob")})
        assert status == 403 and json.loads(body)["permission"] == "things:edit"
        assert headers["x-authz-reason"] == "missing_permission"
        status, headers, _ = ask(
            conn, "PUT", "/things/1", {"x-jwt-payload": payload("bob"), "x-authz-shadow-version": "v2"}
        )
        assert status == 200 and headers["x-authz-set-version"] == "v2"
        status, headers, body = ask(conn, "GET", "/things/1", {})
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        status, _, body = ask(conn, "GET", "/things/1", {"x-jwt-payload": "!!not-base64-json!!"})
        assert status == 401 and json.loads(body)["reason"] == "invalid_token"
        status, _, _ = ask(conn, "GET", "/things/1", {"authorization": f"Bearer {issuer.token('alice')}"})
        assert status == 200
        status, _, body = ask(conn, "GET", "/admin", {"x-jwt-payload": payload("alice")})
        assert status == 403 and json.loads(body)["reason"] == "unmapped_route"
    finally:
        conn.close()


def test_garbage_is_a_400_and_the_connection_closes(http_sidecar: RunningSidecar) -> None:
    with socket.create_connection(("127.0.0.1", http_sidecar.sidecar.http_authz_port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\x00\x01\r\n\r\n")
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert sock.recv(4096) == b""  # closed
