"""Bearer JWTs verified by the sidecar, as users configure them: a JWKS file that changes on disk, a
JWKS URL fetched and refreshed in the background, and the claims and attacks a verifier must refuse.

Every test goes through real gRPC Check on loopback; the JWKS URL is a real HTTP server on
127.0.0.1 that a test can make fail, hang or rotate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from cryptography.hazmat.primitives import serialization

from authz_sidecar.local.tokens import DemoIssuer

from .helpers import RunningSidecar, check, headers_of, request, sidecar_settings, status_of

WAIT = 15.0  # generous: a loaded 2-core machine


def wait_until(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def fresh(issuer: DemoIssuer, sub: str = "alice", **claims: Any) -> str:
    """A token no verifier has seen yet (so no verified-token cache can answer for it)."""
    return issuer.token(sub, jti=uuid.uuid4().hex, **claims)


def bearer(side: RunningSidecar, token: str) -> int:
    return status_of(check(side, request(headers={"authorization": f"Bearer {token}"})))


def jwt_status(side: RunningSidecar) -> dict[str, Any]:
    url = f"http://127.0.0.1:{side.sidecar.http_port}/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["jwks"]  # type: ignore[no-any-return]


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_signed_hs256(claims: dict[str, Any], secret: bytes, kid: str | None) -> str:
    """Sign HS256 by hand: PyJWT refuses a PEM as an HMAC secret, an attacker does not."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


class JwksServer:
    """A JWKS endpoint on 127.0.0.1:0 in a thread. `mode` makes it answer well or fail one way."""

    def __init__(self, *issuers: DemoIssuer) -> None:
        self.keys: list[dict[str, Any]] = [k for i in issuers for k in i.jwks()["keys"]]
        self.mode = "ok"  # ok | error | garbage | empty | huge | redirect | hang
        self.cache_control = ""
        self.hits = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits += 1
                    mode, keys, cache_control = server.mode, list(server.keys), server.cache_control
                if mode == "hang":
                    server._release.wait(30)
                    return
                if mode == "error":
                    self.send_error(500, "identity provider down")
                    return
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("location", "ftp://127.0.0.1/jwks.json")
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = {
                    "ok": json.dumps({"keys": keys}),
                    "garbage": "<html>oops",
                    "empty": '{"keys": []}',
                    "huge": json.dumps({"keys": keys, "padding": "x" * (2 << 20)}),
                }[mode]
                raw = body.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                if cache_control:
                    self.send_header("cache-control", cache_control)
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, _format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/.well-known/jwks.json"

    def serve(self, *issuers: DemoIssuer) -> None:
        with self._lock:
            self.keys = [k for i in issuers for k in i.jwks()["keys"]]

    def count(self) -> int:
        with self._lock:
            return self.hits

    def close(self) -> None:
        self._release.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


@pytest.fixture
def key_a() -> DemoIssuer:
    return DemoIssuer(kid="key-a")


@pytest.fixture
def key_b() -> DemoIssuer:
    return DemoIssuer(kid="key-b")


@pytest.fixture
def jwks_server(key_a: DemoIssuer) -> Iterator[JwksServer]:
    server = JwksServer(key_a)
    try:
        yield server
    finally:
        server.close()


def url_sidecar(policy_dir: Path, server: JwksServer, **overrides: Any) -> RunningSidecar:
    values: dict[str, Any] = {
        "jwks_url": server.url,
        "jwt_audiences": ("things",),
        "identity": ("jwt",),
        "jwks_refresh_interval": 3600.0,
        "jwks_min_refresh_interval": 0.2,
        "jwks_timeout": 1.0,
    }
    values.update(overrides)
    side = RunningSidecar(sidecar_settings(policy_dir, **values))
    side.wait_ready()
    return side


# -- claims ----------------------------------------------------------------------------------------


def test_nbf_in_the_future_is_401(running: RunningSidecar, issuer: DemoIssuer) -> None:
    """A token not valid yet (beyond the 30 s leeway) is refused."""
    resp = check(running, request(headers={"authorization": f"Bearer {fresh(issuer, nbf=int(time.time()) + 600)}"}))
    assert status_of(resp) == 401 and headers_of(resp)["x-authz-reason"] == "invalid_token"
    assert bearer(running, fresh(issuer, nbf=int(time.time()) - 10)) == 200


def test_wrong_issuer_is_401_when_issuers_are_configured(running: RunningSidecar, issuer: DemoIssuer) -> None:
    """--jwt-issuers is enforced: same key, another `iss`, refused; a token with no `iss` too."""
    assert bearer(running, fresh(issuer, iss="https://evil.example")) == 401
    now = int(time.time())
    no_iss = issuer.sign({"sub": "alice", "aud": "things", "exp": now + 600})
    assert bearer(running, no_iss) == 401
    assert bearer(running, fresh(issuer)) == 200


def test_token_without_exp_is_401(running: RunningSidecar, issuer: DemoIssuer) -> None:
    """`exp` is required: a token that never expires is never accepted."""
    claims = {"iss": issuer.issuer, "sub": "alice", "aud": "things", "iat": int(time.time())}
    token = issuer.sign(claims)
    assert bearer(running, token) == 401


def _confused_tokens(issuer: DemoIssuer) -> dict[str, str]:
    pem = issuer.public_pem()
    pkcs1 = issuer.public_pem(serialization.PublicFormat.PKCS1)
    claims = {"iss": issuer.issuer, "sub": "alice", "aud": "things", "exp": int(time.time()) + 600}
    return {
        "spki pem, kid": hand_signed_hs256(claims, pem, issuer.kid),
        "spki pem, no kid": hand_signed_hs256(claims, pem, None),
        "spki pem without newline": hand_signed_hs256(claims, pem.rstrip(b"\n"), issuer.kid),
        "pkcs1 pem": hand_signed_hs256(claims, pkcs1, issuer.kid),
    }


def test_key_confusion_hs256_signed_with_the_public_key_pem_is_401(running: RunningSidecar, issuer: DemoIssuer) -> None:
    """The classic attack: HS256 with the RSA public key's PEM as the HMAC secret, default algorithms."""
    for what, token in _confused_tokens(issuer).items():
        resp = check(running, request(headers={"authorization": f"Bearer {token}"}))
        assert status_of(resp) == 401, what
        assert headers_of(resp)["x-authz-reason"] == "invalid_token", what


def test_key_confusion_when_hs256_is_allowed_and_the_key_declares_no_alg(
    policy_dir: Path, tmp_path: Path, issuer: DemoIssuer
) -> None:
    """Even with HS256 in --jwt-algorithms and an RSA key without `alg` (many IdPs omit it), an HS256
    token is never checked against an RSA key: the algorithm must suit the key's type."""
    jwks = issuer.jwks()
    del jwks["keys"][0]["alg"]
    path = tmp_path / "noalg.json"
    path.write_text(json.dumps(jwks))
    side = RunningSidecar(
        sidecar_settings(
            policy_dir,
            jwks_file=path,
            jwt_audiences=("things",),
            identity=("jwt",),
            jwt_algorithms=("RS256", "PS256", "HS256"),
        )
    )
    try:
        side.wait_ready()
        for what, token in _confused_tokens(issuer).items():
            resp = check(side, request(headers={"authorization": f"Bearer {token}"}))
            assert status_of(resp) == 401, what
            assert headers_of(resp)["x-authz-reason"] == "invalid_token", what
        assert bearer(side, fresh(issuer)) == 200
    finally:
        side.close()


# -- JWKS file reloaded -----------------------------------------------------------------------------


def test_changed_jwks_file_is_reloaded_and_a_broken_one_keeps_the_last_good(
    policy_dir: Path, tmp_path: Path, key_a: DemoIssuer, key_b: DemoIssuer
) -> None:
    """A rotated file (written in place or renamed over) is followed without a restart; a broken or
    removed file keeps the keys last read, and says so in /status."""
    path = key_a.write_jwks(tmp_path / "jwks.json")
    side = RunningSidecar(sidecar_settings(policy_dir, jwks_file=path, jwt_audiences=("things",), identity=("jwt",)))
    try:
        side.wait_ready()
        old = fresh(key_a)
        assert bearer(side, old) == 200
        assert bearer(side, fresh(key_b)) == 401
        key_b.write_jwks(path)  # in place: same inode
        wait_until("key-b from the rewritten file", lambda: bearer(side, fresh(key_b)) == 200)
        assert bearer(side, old) == 401  # removed with its key, though it was verified (and cached) before
        path.write_text('{"keys": [')
        wait_until("the broken file reported", lambda: "jwks.json" in (jwt_status(side).get("last_error") or ""))
        assert bearer(side, fresh(key_b)) == 200
        path.unlink()
        wait_until("the missing file reported", lambda: "No such file" in (jwt_status(side).get("last_error") or ""))
        assert bearer(side, fresh(key_b)) == 200
        staged = key_a.write_jwks(tmp_path / "jwks.json.new")
        staged.rename(path)  # renamed over: a new inode, as a ConfigMap update does
        wait_until("key-a from the renamed file", lambda: bearer(side, fresh(key_a)) == 200)
        assert jwt_status(side)["last_error"] is None
    finally:
        side.close()


# -- JWKS URL ---------------------------------------------------------------------------------------


def test_jwks_url_keys_are_fetched_and_served(policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer) -> None:
    side = url_sidecar(policy_dir, jwks_server)
    try:
        wait_until("first fetch", lambda: bearer(side, fresh(key_a)) == 200)
        status = jwt_status(side)
        assert status["source"] == jwks_server.url and status["loaded"] and status["keys"] == ["key-a"]
    finally:
        side.close()


def test_jwks_url_denies_until_the_first_fetch_succeeds(
    policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer
) -> None:
    """Fail closed: while the URL has not answered with keys, every bearer token is 401 and the log
    says why; once it answers, tokens are accepted without a restart."""
    jwks_server.mode = "error"
    with structlog.testing.capture_logs() as logs:
        side = url_sidecar(policy_dir, jwks_server)
        try:
            wait_until("a failed fetch", lambda: jwt_status(side)["last_error"] is not None)
            resp = check(side, request(headers={"authorization": f"Bearer {fresh(key_a)}"}))
            assert status_of(resp) == 401 and headers_of(resp)["x-authz-reason"] == "invalid_token"
            status = jwt_status(side)
            assert not status["loaded"] and "HTTP 500" in status["last_error"]
            jwks_server.mode = "ok"
            wait_until("the retried fetch", lambda: bearer(side, fresh(key_a)) == 200)
        finally:
            side.close()
    failed = [e for e in logs if e["event"] == "jwks_fetch_failed"]
    assert failed and failed[0]["log_level"] == "error" and "HTTP 500" in failed[0]["error"]
    assert failed[0]["consequence"] == "bearer tokens are denied until the first key set is fetched"
    rejected = [e for e in logs if e["event"] == "identity_rejected"]
    assert rejected and "bearer tokens are denied until" in rejected[0]["error"]


def test_unknown_kid_is_401_and_refreshes_once_however_many_arrive(
    policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer
) -> None:
    """A flood of tokens with random kids costs the JWKS endpoint one fetch per min interval, not one
    per token."""
    stranger = DemoIssuer()

    def random_kid() -> str:
        stranger.kid = uuid.uuid4().hex
        return fresh(stranger)

    side = url_sidecar(policy_dir, jwks_server, jwks_min_refresh_interval=60.0)
    try:
        wait_until("first fetch", lambda: bearer(side, fresh(key_a)) == 200)
        assert jwks_server.count() == 1
        for _ in range(50):
            assert bearer(side, random_kid()) == 401
        wait_until("the refresh an unknown kid asks for", lambda: jwks_server.count() == 2)
        for _ in range(50):
            assert bearer(side, random_kid()) == 401
        time.sleep(0.5)  # a refresh not rate-limited would have happened by now
        assert jwks_server.count() == 2
        assert bearer(side, fresh(key_a)) == 200
    finally:
        side.close()


@pytest.mark.parametrize("server_model", ["aio", "threads"])
def test_unknown_kid_is_accepted_once_the_jwks_publishes_it(
    policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer, key_b: DemoIssuer, server_model: str
) -> None:
    """A key the IdP adds is picked up by the refresh its first token triggers, without a restart
    (asked for from the event loop's thread in one server model, from a worker thread in the other)."""
    side = url_sidecar(policy_dir, jwks_server, server_model=server_model)
    try:
        wait_until("first fetch", lambda: bearer(side, fresh(key_a)) == 200)
        assert bearer(side, fresh(key_b)) == 401
        wait_until("the refresh key-b asked for", lambda: jwks_server.count() >= 2)
        jwks_server.serve(key_a, key_b)
        wait_until("key-b accepted", lambda: bearer(side, fresh(key_b)) == 200)
        assert bearer(side, fresh(key_a)) == 200
    finally:
        side.close()


def test_key_rotation_is_followed(
    policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer, key_b: DemoIssuer
) -> None:
    """Old key removed, new key added: new tokens pass, old ones (even one verified before) are 401."""
    side = url_sidecar(policy_dir, jwks_server)
    try:
        old = fresh(key_a)
        wait_until("first fetch", lambda: bearer(side, old) == 200)
        jwks_server.serve(key_b)
        wait_until("key-b accepted", lambda: bearer(side, fresh(key_b)) == 200)
        assert bearer(side, old) == 401
        assert bearer(side, fresh(key_a)) == 401
        assert jwt_status(side)["keys"] == ["key-b"]
    finally:
        side.close()


@pytest.mark.parametrize("failure", ["error", "garbage", "empty", "huge", "redirect", "hang"])
def test_failed_refresh_keeps_the_last_good_keys(
    policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer, failure: str
) -> None:
    """HTTP 500, a body that is not JSON, an empty key set, a body over 1 MiB, a redirect away from
    HTTP, a server that never answers: each refresh fails, is reported, and the keys fetched before
    stay in use."""
    side = url_sidecar(policy_dir, jwks_server, jwks_refresh_interval=0.3, jwks_timeout=0.5)
    try:
        wait_until("first fetch", lambda: bearer(side, fresh(key_a)) == 200)
        jwks_server.mode = failure
        seen = jwks_server.count()
        wait_until("failed refreshes", lambda: jwks_server.count() >= seen + 2)
        wait_until("the failure reported", lambda: jwt_status(side)["last_error"] is not None)
        assert bearer(side, fresh(key_a)) == 200
        status = jwt_status(side)
        assert status["loaded"] and status["keys"] == ["key-a"]
    finally:
        side.close()


def test_cache_control_max_age_sets_the_refresh_interval(
    policy_dir: Path, jwks_server: JwksServer, key_a: DemoIssuer
) -> None:
    """max-age shorter than --jwks-refresh-interval is honoured (the keys are fresh no longer)."""
    jwks_server.cache_control = "public, max-age=1"
    side = url_sidecar(policy_dir, jwks_server, jwks_refresh_interval=3600.0)
    try:
        wait_until("three fetches a second apart", lambda: jwks_server.count() >= 3)
        assert bearer(side, fresh(key_a)) == 200
    finally:
        side.close()


def test_refresher_stops_with_the_sidecar(policy_dir: Path, jwks_server: JwksServer) -> None:
    """The refresher is the sidecar's task: stopping the sidecar stops the fetches."""
    side = url_sidecar(policy_dir, jwks_server, jwks_refresh_interval=0.2)
    wait_until("refreshes", lambda: jwks_server.count() >= 2)
    side.close()
    after = jwks_server.count()
    time.sleep(1.0)  # five refresh intervals
    assert jwks_server.count() <= after + 1  # a fetch already on its way may still arrive


# -- configuration ----------------------------------------------------------------------------------


def test_jwks_url_flag_and_environment(monkeypatch: pytest.MonkeyPatch, policy_dir: Path) -> None:
    from authz_sidecar import cli

    ns = cli._build_parser().parse_args(["serve", "--policy-dir", str(policy_dir), "--jwks-url", "https://idp/jwks"])
    settings = cli.settings_from(ns)
    assert settings.jwks_url == "https://idp/jwks" and "jwt" in settings.identity_sources()
    monkeypatch.setenv("AUTHZ_JWKS_URL", "http://127.0.0.1:1/jwks")
    monkeypatch.setenv("AUTHZ_JWKS_REFRESH_INTERVAL", "60")
    ns = cli._build_parser().parse_args(["serve", "--policy-dir", str(policy_dir)])
    settings = cli.settings_from(ns)
    assert settings.jwks_url == "http://127.0.0.1:1/jwks" and settings.jwks_refresh_interval == 60.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--jwks-url", "file:///etc/passwd"], "http:// or https://"),
        (["--jwks-url", "https://"], "http:// or https://"),
        (["--jwks-url", "https://user:secret@idp/jwks"], "user or password"),
        (["--jwks-url", "https://idp/jwks", "--jwks-file", "x.json"], "not both"),
        (["--jwks-url", "https://idp/jwks", "--jwks-min-refresh-interval", "0"], "--jwks-min-refresh-interval"),
        (["--identity", "jwt"], "--jwks-url"),
    ],
)
def test_jwks_url_settings_are_checked(policy_dir: Path, args: list[str], needle: str) -> None:
    from authz_sidecar import cli
    from authz_sidecar.errors import ConfigError

    ns = cli._build_parser().parse_args(["serve", "--policy-dir", str(policy_dir), *args])
    with pytest.raises(ConfigError, match=needle):
        cli.settings_from(ns)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("max-age=60", 60.0),
        ('public, max-age="30", must-revalidate', 30.0),
        ("MAX-AGE=5", 5.0),
        ("no-store", 0.0),
        ("no-cache, max-age=600", 0.0),
        ("max-age=soon", None),
        ("max-age=-1", None),
        ("private", None),
        ("", None),
    ],
)
def test_cache_control_max_age_parsing(header: str, seconds: float | None) -> None:
    """Only the simple forms count; anything else leaves the refresh interval in charge."""
    from authz_sidecar.decision.jwks import max_age

    assert max_age(header) == seconds
