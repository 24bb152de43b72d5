"""The HTTP variant of ext_authz (--http-authz): same decisions, HTTP/1.1 answers, keep-alive."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_sidecar.local.tokens import DemoIssuer

from .helpers import RunningSidecar, scrape, sidecar_settings


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


# --- bounded input ---------------------------------------------------------------------------------


def rejected(side: RunningSidecar, front: str, reason: str) -> float:

    return scrape(side).get(("authz_rejected_total", (("front", front), ("reason", reason))), 0.0)


def reply_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the sidecar sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def send_until_answered(sock: socket.socket, head: bytes, piece: bytes, pieces: int) -> bytes:
    """Send `head`, then `pieces` copies of `piece`, stopping as soon as the sidecar answers or closes."""
    sock.sendall(head)
    for _ in range(pieces):
        sock.settimeout(0.0)
        try:
            early = sock.recv(65536)
        except BlockingIOError:
            early = None
        except ConnectionResetError:
            early = b""
        if early is not None:
            return early + reply_until_closed(sock)
        sock.settimeout(10)
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
    return reply_until_closed(sock, timeout=3)


def test_a_header_over_the_limit_is_431_before_it_ends(http_sidecar: RunningSidecar) -> None:
    """Envoy's own default (60 KiB of headers) is the default here: a client that keeps sending one
    header is answered 431 and cut off long before it finishes, and the refusal is counted."""
    port = http_sidecar.sidecar.http_authz_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = b"GET /things/1 HTTP/1.1\r\nhost: x\r\nx-big: "
        reply = send_until_answered(sock, head, b"a" * 65536, pieces=128)  # 8 MiB if never stopped
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"x-authz-reason: headers_too_large" in reply
    assert rejected(http_sidecar, "http", "headers_too_large") == 1


def test_headers_just_under_the_limit_are_decided(http_sidecar: RunningSidecar) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_sidecar.sidecar.http_authz_port, timeout=5)
    try:
        filler = {f"x-fill-{i}": "v" * 1000 for i in range(55)}  # ~55 KiB of headers
        status, _, _ = ask(conn, "GET", "/things/1", {"x-jwt-payload": payload("bob"), **filler})
        assert status == 200
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("request_head", "status", "reason"),
    [
        (b"GET /things/" + b"1" * 20000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 431, "headers_too_large"),
        (b"GET /things/1 HTTP/1.1\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(200)) + b"\r\n", 431,
         "headers_too_large"),
        (b"PUT /things/1 HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n", 413, "body_too_large"),
    ],
    ids=["url", "header-count", "declared-body"],
)  # fmt: skip
def test_oversize_requests_are_refused_and_the_connection_closes(
    http_sidecar: RunningSidecar, request_head: bytes, status: int, reason: str
) -> None:
    """A URL over 16 KiB, more than 128 headers, a body declared over 1 MiB: refused with a denial
    naming the reason, without waiting for the rest, and the connection closes."""
    with socket.create_connection(("127.0.0.1", http_sidecar.sidecar.http_authz_port), timeout=10) as sock:
        sock.sendall(request_head)
        reply = reply_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert f"x-authz-reason: {reason}".encode() in reply
    assert rejected(http_sidecar, "http", reason) == 1


def test_a_chunked_body_over_the_limit_is_413(http_sidecar: RunningSidecar) -> None:
    """A body without a declared length is counted as it arrives: past 1 MiB it is refused."""
    port = http_sidecar.sidecar.http_authz_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = b"POST /things/1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        reply = send_until_answered(sock, head, b"10000\r\n" + b"a" * 0x10000 + b"\r\n", pieces=64)  # 4 MiB
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


@pytest.fixture
def strict_http_sidecar(policy_dir: Path) -> Iterator[RunningSidecar]:
    """Short timeouts, so that slow and idle clients are cut within the test's patience."""
    side = RunningSidecar(
        sidecar_settings(
            policy_dir,
            http_authz="127.0.0.1:0",
            identity=("payload_header",),
            http_authz_request_timeout=1.0,
            http_authz_idle_timeout=2.0,
        )
    )
    try:
        side.wait_ready()
        yield side
    finally:
        side.close()


def test_half_a_request_is_answered_408_after_the_request_timeout(strict_http_sidecar: RunningSidecar) -> None:
    with socket.create_connection(("127.0.0.1", strict_http_sidecar.sidecar.http_authz_port), timeout=10) as sock:
        sock.sendall(b"GET /things/1 HTTP/1.1\r\nhost: x\r\nx-half: ")
        reply = reply_until_closed(sock, timeout=15)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert rejected(strict_http_sidecar, "http", "request_timeout") == 1


def test_a_slowloris_is_cut_by_the_total_deadline_not_only_the_idle_gap(strict_http_sidecar: RunningSidecar) -> None:
    """One byte every 0.2 s never leaves the connection idle for 2 s, but the whole request must
    arrive within 1 s: the sidecar answers 408 and closes long before the 400 bytes are through."""
    port = strict_http_sidecar.sidecar.http_authz_port
    dribble = b"GET /things/1 HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 400 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent = 0
        reply = b""
        for byte in dribble:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            sock.settimeout(0.2)
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            break
        reply += reply_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert sent < len(dribble) // 2


def test_an_idle_connection_is_closed(strict_http_sidecar: RunningSidecar) -> None:
    """Idle before the first request and between requests: closed after the idle timeout."""
    port = strict_http_sidecar.sidecar.http_authz_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert reply_until_closed(sock, timeout=15) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /things/1 HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = reply_until_closed(sock, timeout=15)
    assert reply.startswith(b"HTTP/1.1 401 ") and reply.count(b"HTTP/1.1") == 1
    assert rejected(strict_http_sidecar, "http", "request_timeout") == 0


def test_a_client_that_never_reads_its_answers_stops_being_read(http_sidecar: RunningSidecar) -> None:
    """Pipelined requests whose answers are never read: the sidecar stops reading once its answers
    back up, instead of buffering them without end, so the client's writes stall."""
    one = b"GET /things/1 HTTP/1.1\r\nhost: x\r\n\r\n"
    burst = one * 2000  # ~70 KB of requests, ~300 KB of answers
    with socket.create_connection(("127.0.0.1", http_sidecar.sidecar.http_authz_port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(3)
        sent = 0
        with pytest.raises(TimeoutError):
            while sent < 1000:  # up to ~70 MB of requests
                sock.sendall(burst)
                sent += 1
    assert sent < 1000


def test_an_upgrade_request_is_answered_and_its_connection_closed(
    http_sidecar: RunningSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """The sidecar speaks nothing but HTTP/1.1: a request asking to upgrade is decided like any
    other, then the connection ends (the parser's upgrade signal is not an unhandled error)."""
    with socket.create_connection(("127.0.0.1", http_sidecar.sidecar.http_authz_port), timeout=10) as sock:
        sock.sendall(b"GET /things/1 HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        reply = reply_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    with socket.create_connection(("127.0.0.1", http_sidecar.sidecar.http_authz_port), timeout=10) as sock:
        sock.sendall(b"GET /things/1 HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
