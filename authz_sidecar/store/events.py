"""Signed events in etcd: public keys published for every sidecar, and consumed events recorded once.

- ``<prefix>/eventkeys/<kid>``: ``{"kid", "alg": "Ed25519", "public_key": base64 of the raw 32
  bytes, "published_at", "published_by"}``, created once (a create-only transaction) by the sidecar
  that holds the private key, never on a lease: an envelope must stay verifiable after its signer
  stops. Every sidecar reads these keys through its policy source's watch, and a reader checks
  each against its id, so a value that does not match its key is refused, not trusted.
- ``<prefix>/consumed/<event_id>``: created once, on a lease as long as the envelope could still
  verify. The create-only compare is what makes a consume happen once across every consumer; the
  lease is what keeps the records from piling up.

Without etcd, :class:`MemoryConsumptions` keeps consumed ids in this process only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import random
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.decision.eventkeys import PUBLIC_KEY_BYTES, SigningKey, key_id
from authz_sidecar.store.etcd import Etcd
from authz_sidecar.store.layout import Layout

log = structlog.get_logger("authz_sidecar.store.events")

ALGORITHM = "Ed25519"
# What a failed etcd call raises through etcd3aio and grpc.aio.
ETCD_FAILURES = (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError)


class ConsumeUnavailableError(Exception):
    """Whether the event was consumed could not be recorded (etcd unreachable): never an accept."""


class ConsumeFullError(Exception):
    """The in-memory record is full of events that have not expired: forgetting one would let it
    be consumed twice, so the consume is refused instead."""


def encode_public_key(key: SigningKey, by: str, at: float) -> bytes:
    document = {
        "kid": key.kid,
        "alg": ALGORITHM,
        "public_key": base64.b64encode(key.public_raw).decode("ascii"),
        "published_at": int(at),
        "published_by": by,
    }
    return json.dumps(document, sort_keys=True).encode()


def decode_public_key(key: str, value: bytes, layout: Layout) -> tuple[str, bytes]:
    """(kid, raw public key) of one published value; ValueError naming what is wrong."""
    kid = key.removeprefix(layout.event_keys)
    try:
        document = json.loads(value)
        raw = base64.b64decode(document["public_key"], validate=True)
        alg, named = document["alg"], document["kid"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not a published event key ({type(exc).__name__})") from None
    if alg != ALGORITHM or len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"not a {PUBLIC_KEY_BYTES}-byte {ALGORITHM} key")
    if named != kid or key_id(raw) != kid:
        raise ValueError("the key id does not match the key (the first 16 hex of its SHA-256)")
    return kid, raw


class PublishedKeys:
    """Turns what the policy source mirrors under ``eventkeys/`` into the keys that verify; a value
    that does not decode is left out and logged once (while it stays the same)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._refused: dict[str, bytes] = {}

    def decode(self, kv: Mapping[str, bytes]) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        refused: dict[str, bytes] = {}
        for key, value in sorted(kv.items()):
            try:
                kid, raw = decode_public_key(key, value, self.layout)
            except ValueError as exc:
                refused[key] = value
                if self._refused.get(key) != value:
                    log.error("event_key_refused", key=key, error=str(exc))
                continue
            keys[kid] = raw
        self._refused = refused
        return keys


class KeyPublisher:
    """Publishes this sidecar's public keys, retrying with capped, jittered backoff until etcd has
    every one (the sidecar signs only once its signing key is published)."""

    def __init__(
        self,
        etcd: Etcd,
        layout: Layout,
        keys: Sequence[SigningKey],
        ident: str,
        *,
        base: float = 0.2,
        cap: float = 10.0,
    ) -> None:
        self.etcd = etcd
        self.layout = layout
        self.keys = tuple(keys)
        self.ident = ident
        self.base = base
        self.cap = cap
        self.attempts = 0
        self.published: list[str] = []
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {"published": list(self.published), "attempts": self.attempts, "last_error": self.last_error}

    async def publish(self, key: SigningKey) -> bool:
        """Create the key's value if absent; True when etcd holds this key under its id (created
        now or before), False when it holds something else there (logged: an operator's problem)."""
        kv, where = self.etcd.kv, self.layout.event_key(key.kid)
        response = await self.etcd.call(
            kv.txn,
            [kv.txn_compare_create_revision(where, 0)],
            [kv.txn_op_put(where, encode_public_key(key, self.ident, time.time()))],
            [kv.txn_op_get(where)],
        )
        if response.succeeded:
            log.info("event_key_published", key_id=key.kid, key=where)
            return True
        found = response.responses[0].response_range.kvs
        try:
            same = bool(found) and decode_public_key(where, found[0].value, self.layout) == (key.kid, key.public_raw)
        except ValueError:
            same = False
        if not same:
            log.error("event_key_conflict", key_id=key.kid, key=where, error="etcd holds another value there")
        return same

    async def run(self) -> None:
        pending = list(self.keys)
        while pending:
            self.attempts += 1
            try:
                for key in list(pending):
                    if await self.publish(key):
                        self.published.append(key.kid)
                        pending.remove(key)
                    else:
                        self.last_error = f"{self.layout.event_key(key.kid)} holds another key"
                        return  # trying again cannot help
                self.last_error = None
            except ETCD_FAILURES as exc:
                self.last_error = str(exc) or type(exc).__name__
                delay = random.uniform(0, min(self.cap, self.base * 2 ** min(self.attempts, 16)))  # noqa: S311
                log.warning("event_keys_not_published", retry_in=round(delay, 2), error=self.last_error)
                await asyncio.sleep(delay)


class Consumptions(Protocol):
    async def consume(self, event_id: str, ttl: int) -> bool:
        """True the first time `event_id` is consumed, False every time after, for `ttl` seconds."""
        ...

    def describe(self) -> str: ...


class EtcdConsumptions:
    """Once across every consumer: a create-only transaction on ``consumed/<event_id>``.

    A call whose answer is lost (a timeout, etcd3aio retrying UNAVAILABLE after the write landed)
    must not turn this consumer's own write into a replay: each record carries a nonce, and a failed
    compare reads the record back in the same transaction, so "created by this very call" is told
    apart from "created by someone else"."""

    def __init__(self, etcd: Etcd, layout: Layout, ident: str) -> None:
        self.etcd = etcd
        self.layout = layout
        self.ident = ident

    def describe(self) -> str:
        return "etcd"

    async def consume(self, event_id: str, ttl: int) -> bool:
        kv, where = self.etcd.kv, self.layout.consumed_event(event_id)
        nonce = secrets.token_hex(8)
        record = json.dumps({"consumed_at": time.time(), "by": self.ident, "nonce": nonce}, sort_keys=True)
        try:
            lease = await self.etcd.call(self.etcd.lease.grant, ttl)
            response = await self.etcd.call(
                kv.txn,
                [kv.txn_compare_create_revision(where, 0)],
                [kv.txn_op_put(where, record, lease=lease.ID)],
                [kv.txn_op_get(where)],
            )
        except ETCD_FAILURES as exc:
            raise ConsumeUnavailableError(f"etcd: {exc or type(exc).__name__}") from None
        if response.succeeded:
            return True
        found = response.responses[0].response_range.kvs
        mine = bool(found) and _nonce(found[0].value) == nonce
        if not mine:
            with contextlib.suppress(*ETCD_FAILURES):  # else it lapses on its own within the envelope's life
                await self.etcd.call(self.etcd.lease.revoke, lease.ID)
        return mine


def _nonce(value: bytes) -> str:
    try:
        return str(json.loads(value).get("nonce", ""))
    except (ValueError, AttributeError):
        return ""


class MemoryConsumptions:
    """Once within this process (the files policy source has no etcd): at most `limit` events not
    yet expired are remembered; past that a consume is refused, never forgotten."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"memory (this sidecar only, at most {self.limit} unexpired events)"

    async def consume(self, event_id: str, ttl: int) -> bool:
        now = time.monotonic()
        with self._lock:
            until = self._until.get(event_id)
            if until is not None and until > now:
                return False
            if len(self._until) >= self.limit:
                self._until = {k: u for k, u in self._until.items() if u > now}
                if len(self._until) >= self.limit:
                    raise ConsumeFullError(f"{self.limit} unexpired events are recorded in memory")
            self._until[event_id] = now + ttl
            return True
