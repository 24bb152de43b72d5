"""Signed events (SignEvent, VerifyEvent) over real gRPC, with a real etcd where one is needed: each
refusal with its own reason (a tampered field, an unknown key, an expiry, a replay, a permission
revoked between signing and verifying), key rotation, a sidecar without a private key verifying,
consumes that fail closed, and private keys that never leave the process."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from authz_sidecar import cli
from authz_sidecar.decision.eventkeys import load_signing_keys
from authz_sidecar.errors import ConfigError
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import wait_for_http
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.layout import Layout
from authz_sidecar.v1 import authz_pb2, authz_pb2_grpc

from .helpers import (
    RunningSidecar,
    ctl,
    ctl_json,
    etcd_sidecar,
    moved,
    scrape,
    seed,
    sidecar_settings,
    status,
    unique_prefix,
    wait_for,
    write_json,
    write_policy,
)

MODELS = ["aio", "threads"]


# --- keys and the documented encoding, as a consumer in another language would write them -------


def new_key(path: Path | None = None) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pem(key))
        path.chmod(0o600)
    return key


def pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def kid_of(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def documented_bytes(envelope: authz_pb2.Envelope) -> bytes:
    """docs/app-api.md#signed-events, written again from the page (not from the sidecar's code):
    each field as an 8-byte big-endian length and its bytes, after the domain tag."""

    def item(data: bytes) -> bytes:
        return len(data).to_bytes(8, "big") + data

    def number(value: int) -> bytes:
        return item(value.to_bytes(8, "big", signed=True))

    e = envelope
    return b"".join(
        [
            item(b"authz-sidecar.v1.Envelope"),
            item(e.payload),
            item(e.principal.encode()),
            item(e.permission.encode()),
            item(e.scope.encode()),
            item(e.key_id.encode()),
            number(e.issued_at),
            number(e.expires_at),
            item(e.event_id.encode()),
            number(e.revision),
        ]
    )


def forged(key: Ed25519PrivateKey, like: authz_pb2.Envelope, **fields: Any) -> authz_pb2.Envelope:
    """`like` with `fields` changed, signed by `key` under its own key id."""
    envelope = authz_pb2.Envelope()
    envelope.CopyFrom(like)
    for name, value in fields.items():
        setattr(envelope, name, value)
    envelope.key_id = fields.get("key_id", kid_of(key))
    envelope.signature = key.sign(documented_bytes(envelope))
    return envelope


# --- calls --------------------------------------------------------------------------------------------


def stub(side: RunningSidecar) -> authz_pb2_grpc.AuthzStub:
    return authz_pb2_grpc.AuthzStub(side.channel)


def sign(
    side: RunningSidecar, principal: str, permission: str, scope: str = "", payload: bytes = b"{}", ttl: int = 0
) -> authz_pb2.Envelope:
    request = authz_pb2.SignEventRequest(
        principal=principal, permission=permission, scope=scope, payload=payload, ttl_seconds=ttl
    )
    return stub(side).SignEvent(request, timeout=10).envelope  # type: ignore[no-any-return]


def verify(side: RunningSidecar, envelope: authz_pb2.Envelope, consume: bool = False) -> authz_pb2.VerifyEventResponse:
    request = authz_pb2.VerifyEventRequest(envelope=envelope, consume=consume)
    return stub(side).VerifyEvent(request, timeout=20)  # type: ignore[no-any-return]


def answer(response: authz_pb2.VerifyEventResponse) -> tuple[bool, bool, str]:
    return response.valid, response.allowed, response.reason


def revoked(side: RunningSidecar, envelope: authz_pb2.Envelope) -> bool:
    return verify(side, envelope).reason == "missing_permission"


def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    error: Any = err.value
    return error.code(), error.details()


def published(side: RunningSidecar) -> list[str]:
    return status(side)["events"]["verifying"] or []


def wait_published(side: RunningSidecar, *keys: Ed25519PrivateKey) -> None:
    """Until `side` has read exactly these public keys from etcd (through its watch): a sidecar
    signs only with a key it has seen published."""
    kids = sorted(kid_of(k) for k in keys)
    wait_for(lambda: sorted(published(side)) == kids, what=f"keys {kids} published and read")


# --- one sidecar, files --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_an_envelope_verifies_and_every_refusal_has_its_own_reason(tmp_path: Path, model: str) -> None:
    key = new_key(tmp_path / "keys" / "2026-11.pem")
    policy = write_policy(tmp_path / "policy")
    side = RunningSidecar(
        sidecar_settings(policy, server_model=model, event_key=(tmp_path / "keys",), event_clock_skew=0)
    )
    try:
        side.wait_ready()
        before = scrape(side)
        short = sign(side, "alice", "things:edit", payload=b"short-lived", ttl=1)
        envelope = sign(side, "alice", "things:edit", payload=b'{"thing": 1}')
        snapshot = side.sidecar.store.snapshot
        assert snapshot is not None
        assert envelope.key_id == kid_of(key) and re.fullmatch("[0-9a-f]{32}", envelope.event_id)
        assert envelope.event_id != short.event_id
        assert abs(envelope.issued_at - time.time()) < 5 and envelope.expires_at - envelope.issued_at == 3600
        assert (envelope.principal, envelope.permission, envelope.revision) == (
            "alice",
            "things:edit",
            snapshot.revision,
        )
        # A consumer in another language verifies with the public key and the documented encoding.
        key.public_key().verify(envelope.signature, documented_bytes(envelope))
        assert answer(verify(side, envelope)) == (True, True, "allowed")
        assert verify(side, envelope).version == "v1"

        # Any field changed: bad_signature.
        changes: dict[str, Any] = {
            "payload": b'{"thing": 2}',
            "principal": "bob",
            "permission": "things:view",
            "scope": "account:acme",
            "issued_at": envelope.issued_at - 1,
            "expires_at": envelope.expires_at + 3600,
            "event_id": "0" * 32,
            "revision": envelope.revision + 1,
            "signature": bytes(64),
        }
        for name, value in changes.items():
            tampered = authz_pb2.Envelope()
            tampered.CopyFrom(envelope)
            setattr(tampered, name, value)
            assert answer(verify(side, tampered)) == (False, False, "bad_signature"), name
        # A key this sidecar does not hold: unknown_key; its own key id over another key's signature: bad_signature.
        other = new_key()
        assert answer(verify(side, forged(other, envelope))) == (False, False, "unknown_key")
        assert answer(verify(side, forged(other, envelope, key_id=kid_of(key)))) == (False, False, "bad_signature")
        # Signed right, but past its expiry.
        stale = forged(key, envelope, issued_at=int(time.time()) - 120, expires_at=int(time.time()) - 60)
        assert answer(verify(side, stale)) == (False, False, "expired")

        # SignEvent refuses a principal without the permission, and says why.
        for principal, permission, scope, code, reason in [
            ("bob", "things:edit", "", grpc.StatusCode.PERMISSION_DENIED, "missing_permission"),
            ("nobody", "things:view", "", grpc.StatusCode.PERMISSION_DENIED, "unknown_principal"),
            ("carol", "things:edit", "account:other", grpc.StatusCode.PERMISSION_DENIED, "missing_permission"),
            ("alice", "not a handle", "", grpc.StatusCode.INVALID_ARGUMENT, "malformed_request"),
        ]:
            got = refused(functools.partial(sign, side, principal, permission, scope))
            assert got[0] == code and got[1].startswith(reason), got
        assert sign(side, "carol", "things:edit", "account:acme").scope == "account:acme"
        assert refused(lambda: sign(side, "alice", "things:edit", ttl=86401))[0] == grpc.StatusCode.INVALID_ARGUMENT
        token = authz_pb2.SignEventRequest(token="a.b.c", permission="things:view")
        assert refused(lambda: stub(side).SignEvent(token, timeout=5))[0] == grpc.StatusCode.UNAUTHENTICATED

        # Consumed once; the second consume is a replay.
        assert answer(verify(side, envelope, consume=True)) == (True, True, "allowed")
        assert answer(verify(side, envelope, consume=True)) == (False, False, "replayed")
        assert status(side)["events"]["consumed"].startswith("memory")

        # The short-lived one expires on its own (no clock skew allowed here).
        wait_for(lambda: time.time() > short.expires_at + 1, timeout=5, what="the short envelope's expiry")
        assert answer(verify(side, short)) == (False, False, "expired")

        after = scrape(side)
        assert moved(before, after, "authz_events_signed_total") == 3
        for reason, n in [("allowed", 3), ("bad_signature", 10), ("unknown_key", 1), ("expired", 2), ("replayed", 1)]:
            assert moved(before, after, "authz_events_verified_total", reason=reason) == n, reason
    finally:
        side.close()


def test_a_sidecar_without_a_key_refuses_to_sign_with_a_clear_message(tmp_path: Path) -> None:
    side = RunningSidecar(sidecar_settings(write_policy(tmp_path / "policy")))
    try:
        side.wait_ready()
        code, message = refused(lambda: sign(side, "alice", "things:edit"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "--event-key" in message
        assert status(side)["events"]["signing_key_id"] is None
    finally:
        side.close()


# --- several sidecars, one etcd -----------------------------------------------------------------------


def revoke_alice_edit(endpoints: str, prefix: str, tmp: Path) -> str:
    """alice becomes a viewer, through ctl (propose and promote); returns the new version."""
    change = {
        "request_id": "CR-revoke",
        "reason": "alice stops editing",
        "changes": [{"principal": "alice", "grant": ["viewer"], "revoke": ["editor"]}],
    }
    version = str(ctl_json(endpoints, prefix, "propose", "--file", write_json(tmp / "change.json", change))["proposed"])
    assert ctl(endpoints, prefix, "promote", version, "--request-id", "PR-revoke", "--reason", "revoked") == 0
    return version


def etcd_keys(endpoints: str, prefix: str) -> dict[str, tuple[bytes, int]]:
    """Every key under the prefix: its value and lease."""

    async def read() -> dict[str, tuple[bytes, int]]:
        async with Etcd(EtcdOptions(endpoints=tuple(endpoints.split(",")))) as client:
            response = await client.call(client.kv.get, prefix + "/", prefix + "0")
            return {kv.key.decode(): (kv.value, kv.lease) for kv in response.kvs}

    return asyncio.run(read())


def lease_ttl(endpoints: str, lease: int) -> int:
    async def read() -> int:
        async with Etcd(EtcdOptions(endpoints=tuple(endpoints.split(",")))) as client:
            return int((await client.call(client.lease.time_to_live, lease)).TTL)

    return asyncio.run(read())


def raw_delete(endpoints: str, key: str) -> None:
    async def delete() -> None:
        async with Etcd(EtcdOptions(endpoints=tuple(endpoints.split(",")))) as client:
            await client.call(client.kv.delete, key)

    asyncio.run(delete())


@pytest.mark.parametrize("model", MODELS)
def test_any_sidecar_verifies_an_event_is_consumed_once_and_a_revoked_permission_is_honoured(
    etcd: EtcdCluster, tmp_path: Path, model: str
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    key = new_key(tmp_path / "key.pem")
    signer = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "a", event_key=(tmp_path / "key.pem",), server_model=model)
    try:
        verifier = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "b", server_model=model)
        try:
            signer.wait_ready()
            verifier.wait_ready()
            for side in (signer, verifier):
                wait_published(side, key)
            code, _ = refused(lambda: sign(verifier, "alice", "things:edit"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            envelope = sign(signer, "alice", "things:edit", payload=b"job-1")
            assert answer(verify(verifier, envelope)) == (True, True, "allowed")

            # Two consumers on two sidecars at once: exactly one acts on each event.
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                for n in range(8):
                    event = sign(signer, "alice", "things:edit", payload=f"job-{n}".encode())
                    both = [pool.submit(verify, side, event, True) for side in (signer, verifier)]
                    assert sorted(answer(f.result()) for f in both) == [
                        (False, False, "replayed"),
                        (True, True, "allowed"),
                    ]
                    assert answer(verify(verifier if n % 2 else signer, event, consume=True))[2] == "replayed"
            consumed = {k: v for k, v in etcd_keys(etcd.endpoints, prefix).items() if "/consumed/" in k}
            assert len(consumed) == 8
            lease = next(iter(consumed.values()))[1]
            assert lease and 3600 < lease_ttl(etcd.endpoints, lease) <= 3607  # the envelope's life, + skew

            # Signed while alice could edit, verified after the permission was revoked: valid, not allowed,
            # and not consumed (it may be acted on if the permission comes back before it expires).
            pending = sign(signer, "alice", "things:edit", payload=b"job-late")
            version = revoke_alice_edit(etcd.endpoints, prefix, tmp_path)
            # Both sides, each on its own watch: the signer is asked to sign below.
            for side in (verifier, signer):
                wait_for(partial(revoked, side, pending), what="the revocation")
            late = verify(verifier, pending, consume=True)
            assert answer(late) == (True, False, "missing_permission") and late.version == version
            assert late.revision >= pending.revision
            assert Layout(prefix).consumed_event(pending.event_id) not in etcd_keys(etcd.endpoints, prefix)
            code, message = refused(lambda: sign(signer, "alice", "things:edit"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and message.startswith("missing_permission")
        finally:
            verifier.close()
    finally:
        signer.close()


def test_a_rotated_key_signs_while_the_old_one_verifies_until_it_is_withdrawn(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    keys = tmp_path / "keys"
    old = new_key(keys / "2026-11.pem")
    first = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "a", event_key=(keys,))
    try:
        first.wait_ready()
        wait_published(first, old)
        before = sign(first, "alice", "things:edit", payload=b"before")
    finally:
        first.close()
    new = new_key(keys / "2026-12.pem")
    rotated = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "a2", event_key=(keys,))
    verifier = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "b")
    try:
        rotated.wait_ready()
        verifier.wait_ready()
        for side in (rotated, verifier):
            wait_published(side, old, new)
        assert status(rotated)["events"]["signing_key_id"] == kid_of(new)
        after = sign(rotated, "alice", "things:edit", payload=b"after")
        assert (before.key_id, after.key_id) == (kid_of(old), kid_of(new))
        for envelope in (before, after):
            assert answer(verify(verifier, envelope)) == (True, True, "allowed")
        # Withdrawn from etcd: every sidecar refuses the old key's envelopes, the signer's own included.
        raw_delete(etcd.endpoints, Layout(prefix).event_key(kid_of(old)))
        wait_for(lambda: verify(verifier, before).reason == "unknown_key", what="the withdrawal")
        wait_for(lambda: verify(rotated, before).reason == "unknown_key", what="the withdrawal at the signer")
        assert answer(verify(verifier, after)) == (True, True, "allowed")
    finally:
        verifier.close()
        rotated.close()


def test_a_consume_while_etcd_is_unreachable_is_refused_never_accepted(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    prefix = unique_prefix()
    key = new_key(tmp_path / "key.pem")
    try:
        seed(cluster.endpoints, prefix, tmp_path)
        side = etcd_sidecar(cluster.endpoints, prefix, tmp_path / "a", event_key=(tmp_path / "key.pem",))
        try:
            side.wait_ready()
            wait_published(side, key)
            envelope = sign(side, "alice", "things:edit")
            cluster.stop()
            # The keys and the set are held: a verify without consume still answers.
            assert answer(verify(side, envelope)) == (True, True, "allowed")
            code, message = refused(lambda: verify(side, envelope, consume=True))
            assert code == grpc.StatusCode.UNAVAILABLE and "consume" in message
            cluster.restart(cluster.members[0])
            first: list[authz_pb2.VerifyEventResponse] = []

            def consumed_once() -> bool:
                try:
                    first.append(verify(side, envelope, consume=True))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # still reconnecting
                return bool(first)

            wait_for(consumed_once, timeout=20, what="a consume once etcd is back")
            assert answer(first[0]) == (True, True, "allowed")
            assert answer(verify(side, envelope, consume=True)) == (False, False, "replayed")
        finally:
            side.close()
    finally:
        cluster.stop()


# --- private keys stay private ------------------------------------------------------------------------


def secret_forms(key: Ed25519PrivateKey) -> list[bytes]:
    """Every way the private key's bytes could be written down: raw, hex, base64, the PEM body."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    body = pem(key).splitlines()[1]
    forms = [raw, der, body, raw.hex().encode(), raw.hex().upper().encode()]
    forms += [base64.b64encode(raw).rstrip(b"="), base64.urlsafe_b64encode(raw).rstrip(b"=")]
    return forms


def test_private_keys_never_reach_logs_etcd_status_or_help(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A real `authz-sidecar serve`, its keys in AUTHZ_EVENT_KEY (PEM text, two keys) at debug level:
    its whole log, every key it wrote to etcd, /status and `serve --help` hold no private byte."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    older, newer = new_key(), new_key()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHZ_", "OTEL_"))}
    environment["AUTHZ_EVENT_KEY"] = (pem(older) + pem(newer)).decode()
    log_file = tmp_path / "sidecar.log"
    argv = [sys.executable, "-m", "authz_sidecar", "serve", "--etcd", etcd.endpoints, "--prefix", prefix]
    argv += ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--cache-file", "off", "--log-level", "debug"]
    with log_file.open("wb") as sink:
        proc = subprocess.Popen(argv, env=environment, stdout=sink, stderr=sink)
    try:
        started: dict[str, Any] = {}

        def started_line() -> bool:
            for line in log_file.read_text().splitlines():
                if '"sidecar_started"' in line:
                    started.update(json.loads(line))
                    return True
            return proc.poll() is not None

        wait_for(started_line, timeout=20, what="the sidecar to start")
        assert started, log_file.read_text()
        http = f"http://127.0.0.1:{started['http_port']}"

        def status_text() -> str:
            with urllib.request.urlopen(f"{http}/status", timeout=5) as r:
                return str(r.read().decode())

        wait_for(lambda: kid_of(newer) in (json.loads(status_text())["events"]["verifying"] or []), what="publication")
        # The keys are published apart from the first snapshot: signing decides with it.
        wait_for_http(f"{http}/readyz")
        with grpc.insecure_channel(f"127.0.0.1:{started['grpc_port']}") as channel:
            app = authz_pb2_grpc.AuthzStub(channel)
            request = authz_pb2.SignEventRequest(principal="alice", permission="things:edit", payload=b"p")
            envelope = app.SignEvent(request, timeout=10).envelope
            assert envelope.key_id == kid_of(newer)
            checked = app.VerifyEvent(authz_pb2.VerifyEventRequest(envelope=envelope, consume=True), timeout=10)
            assert checked.allowed
        shown = status_text().encode()
        assert kid_of(older) in shown.decode() and "AUTHZ_EVENT_KEY" in shown.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    logs = log_file.read_bytes()
    assert b"event_signed" in logs and b"event_key_published" in logs
    stored = b"".join(k.encode() + v for k, (v, _lease) in etcd_keys(etcd.endpoints, prefix).items())
    assert b"/eventkeys/" in stored
    code = subprocess.run(
        [sys.executable, "-m", "authz_sidecar", "serve", "--help"], env=environment, capture_output=True, check=False
    )
    assert code.returncode == 0 and b"--event-key" in code.stdout
    for key in (older, newer):
        for form in secret_forms(key):
            for where, text in (("logs", logs), ("etcd", stored), ("status", shown), ("help", code.stdout)):
                assert form not in text, f"private key bytes in {where}"


# --- loading keys ----------------------------------------------------------------------------------------


def test_keys_load_oldest_first_and_bad_key_files_are_refused_without_their_contents(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    b, a, c = new_key(directory / "2026-12.pem"), new_key(directory / "2026-11.pem"), new_key(tmp_path / "c.pem")
    (directory / "notes.txt").write_text("not a key")
    loaded = load_signing_keys([directory, tmp_path / "c.pem"])
    assert [k.kid for k in loaded] == [kid_of(a), kid_of(b), kid_of(c)]
    assert "PrivateKey" not in repr(loaded) and "private=" not in repr(loaded)
    # PEM text from the environment comes after the files; a key given twice counts where it was last.
    assert [k.kid for k in load_signing_keys([tmp_path / "c.pem"], pem(a).decode() + pem(c).decode())] == [
        kid_of(a),
        kid_of(c),
    ]
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    encrypted = a.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    broken = pem(a).replace(pem(a).splitlines()[1], b"A" * 64)
    cases = {
        "rsa.pem": (
            rsa.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "not an Ed25519 key",
        ),
        "encrypted.pem": (encrypted, "encrypted keys are not supported"),
        "broken.pem": (broken, "not a PEM PKCS#8 private key"),
        "empty.pem": (b"", "no PEM block"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ConfigError) as err:
            load_signing_keys([path])
        assert needle in str(err.value) and str(path) in str(err.value)
        assert content.decode()[40:80] not in str(err.value) or not content
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ConfigError, match=r"without \*\.pem files"):
        load_signing_keys([tmp_path / "empty-dir"])
    with pytest.raises(ConfigError, match="no such file"):
        load_signing_keys([tmp_path / "missing.pem"])
    with pytest.raises(ConfigError, match="AUTHZ_EVENT_KEY: not a PEM"):
        load_signing_keys([], broken.decode())


def test_a_key_readable_by_others_is_used_and_warned_about(tmp_path: Path) -> None:
    key = new_key(tmp_path / "open.pem")
    (tmp_path / "open.pem").chmod(0o644)
    with structlog.testing.capture_logs() as logs:
        assert [k.kid for k in load_signing_keys([tmp_path / "open.pem"])] == [kid_of(key)]
    assert [e["event"] for e in logs] == ["event_key_readable_by_others"]


def test_the_environment_gives_paths_or_pem_text_and_the_flag_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = str(write_policy(tmp_path / "policy"))
    base = ["serve", "--policy-dir", policy]
    key = new_key(tmp_path / "k.pem")
    monkeypatch.setenv("AUTHZ_EVENT_KEY", pem(key).decode())
    from_pem = cli.settings_from(cli._build_parser().parse_args(base))
    assert from_pem.event_key == () and from_pem.event_key_pem == pem(key).decode()
    assert pem(key).decode() not in repr(from_pem)
    flag = cli.settings_from(cli._build_parser().parse_args([*base, "--event-key", f"{tmp_path / 'k.pem'},{tmp_path}"]))
    assert flag.event_key == (tmp_path / "k.pem", tmp_path) and flag.event_key_pem == ""
    monkeypatch.setenv("AUTHZ_EVENT_KEY", str(tmp_path / "k.pem"))
    assert cli.settings_from(cli._build_parser().parse_args(base)).event_key == (tmp_path / "k.pem",)
    assert cli.main([*base, "--event-ttl", "100", "--event-max-ttl", "10"]) == 2
