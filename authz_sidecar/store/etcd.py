"""The connection to etcd: endpoints, TLS, user/password, and a watch stream that cannot die silently.

Built on etcd3aio (docs/decisions/0004-etcd-client.md): its channel (round robin over every
endpoint, keepalive), KV and Auth services. The watch is our own stream on the same channel,
because the sidecar needs three things etcd3aio's watch iterator does not give: the
``hasleader`` metadata (a member cut off from its cluster ends the stream instead of serving a
frozen view), client-initiated progress requests with a deadline on the answer (a stream to a
paused or half-dead member is noticed within ``liveness`` seconds), and compaction surfaced to the
caller rather than skipped over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from etcd3aio._protobuf import (  # the generated etcd API that etcd3aio ships; see the module docstring
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.connections import ConnectionManager
from etcd3aio.errors import EtcdError, EtcdUnauthenticatedError
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

from authz_sidecar.errors import ConfigError
from authz_sidecar.model.pacing import HANDOVER

# A listing of a large deployment, or a watch response carrying a transaction's worth of chunks,
# is far over gRPC's default 4 MiB receive limit.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# A watch response carrying at least this many bytes of values is part of a big set's chunks: the
# GIL is handed over quickly (HANDOVER) until a smaller response comes (the set's head, a
# progress report), so that Checks are not held behind the event loop decoding them one after
# another. `bench/ingest.py`, 8 runs each, alternating: a thread's waits for the GIL over 2 ms
# while a 1M-grant set arrives, median 13.5 (1-41) -> 8.5 (1-14), p99 wait 2.35 -> 1.82 ms; the
# longest (~5 ms, one response decoded in one C call) is unchanged (docs/performance.md).
QUICK_RESPONSE_BYTES = 256 * 1024


class WatchLostError(Exception):
    """The watch stream ended, was cancelled by etcd, or went silent past the liveness window."""


class CompactedError(Exception):
    """The revision to resume from has been compacted away: list again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (etcd now starts at {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class EtcdOptions:
    endpoints: tuple[str, ...]
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the servers' certificates carry, when endpoints are addresses.
    server_name: str = ""
    user: str = ""
    password: str = ""
    # Deadline of each unary call (list, put, txn).
    timeout: float = 5.0

    def __post_init__(self) -> None:
        # etcd's own tools, compose files and manifests spell an endpoint as a URL; the client takes
        # host:port, and TLS is on when a CA is given. A scheme that agrees with that is dropped
        # here; any other is left for validate() to refuse.
        scheme = "https://" if self.ca_file is not None else "http://"
        endpoints = tuple(e.removeprefix(scheme).rstrip("/") if e.startswith(scheme) else e for e in self.endpoints)
        object.__setattr__(self, "endpoints", endpoints)

    def validate(self) -> EtcdOptions:
        if not self.endpoints:
            raise ConfigError("--etcd: give at least one host:port")
        for endpoint in self.endpoints:
            if endpoint.startswith("https://"):
                raise ConfigError(f"--etcd: {endpoint!r}: https:// needs --etcd-ca (TLS is on when a CA is given)")
            if endpoint.startswith("http://"):
                raise ConfigError(f"--etcd: {endpoint!r}: http:// with --etcd-ca; TLS endpoints are https://")
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or "/" in host:
                raise ConfigError(f"--etcd: {endpoint!r} is not host:port")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("--etcd-cert and --etcd-key go together")
        if self.cert_file and not self.ca_file:
            raise ConfigError("--etcd-cert needs --etcd-ca (client certificates are only sent over TLS)")
        for flag, path in (("--etcd-ca", self.ca_file), ("--etcd-cert", self.cert_file), ("--etcd-key", self.key_file)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path}: not a file")
        if bool(self.user) != bool(self.password):
            raise ConfigError("--etcd-user and --etcd-password go together")
        if self.timeout <= 0:
            raise ConfigError("--etcd-timeout must be > 0")
        return self


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Change:
    """One watch event: a put (value set) or a delete (value None)."""

    key: str
    value: bytes | None
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Listing:
    """Every key under a prefix, read at one revision of one cluster."""

    revision: int
    cluster_id: int
    kvs: list[KeyValue]


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response, its fragments joined.

    `revision` and `cluster_id` are the response header's: etcd's current revision when it
    answered, and which cluster answered. With changes, everything up to the last change's
    mod revision has been delivered. Without (the creation response, a progress report) it only
    proves the stream alive: etcd 3.5.1 can report progress ahead of events still queued for
    the stream, so the revision must not be taken as delivered. It can still show that etcd went
    back (a restore: lower than what was applied) or was replaced (another cluster id).
    """

    revision: int
    cluster_id: int
    changes: list[Change]
    created: bool = False


def _hand_over_quickly(response: Any, quick: bool) -> bool:
    """Whether the watch holds HANDOVER after `response` (it held it before if `quick`)."""
    big = sum(len(e.kv.value) for e in response.events) >= QUICK_RESPONSE_BYTES
    if big != quick:
        (HANDOVER.enter if big else HANDOVER.leave)()
    return big


def _key(raw: bytes) -> str:
    # Keys under the prefix are written by this project as UTF-8; anything else is kept visible
    # (and reported by whoever reads it) rather than dropped.
    return raw.decode("utf-8", errors="backslashreplace")


class Etcd:
    """One client for one cluster. Use as ``async with Etcd(options) as etcd:``."""

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        manager = ConnectionManager(list(options.endpoints))
        manager.grpc_options += [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC waits up to two minutes between reconnects by default: a member back from a
            # restart would go unnoticed that long. Try again within a second instead.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # Connections of this client only: another client in the process (a test's ctl, the
            # registration) must not inherit this one's backoff state, nor it theirs.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        tls: dict[str, Any] = {}
        if options.ca_file is not None:
            tls["ca_cert"] = options.ca_file.read_bytes()
            if options.cert_file is not None and options.key_file is not None:
                tls["cert_chain"] = options.cert_file.read_bytes()
                tls["cert_key"] = options.key_file.read_bytes()
            tls["tls_server_name"] = options.server_name or None
        self._channel = manager.get_channel(**tls)
        # UNAVAILABLE during a leader election is retried with backoff (50 ms doubling, capped at 1 s)
        # inside the call's deadline; longer outages are the callers' business.
        self.kv = KVService(self._channel, max_attempts=5)
        self._auth = AuthService(self._channel, max_attempts=5)
        self.lease = LeaseService(self._channel, max_attempts=5)
        self._watch = WatchStub(self._channel)
        self._token: str | None = None

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    @property
    def endpoints(self) -> str:
        return ",".join(self.options.endpoints)

    async def authenticate(self) -> None:
        """Get a token for --etcd-user (a no-op without one). Called before the first request and
        again whenever etcd says the token is no longer valid."""
        if not self.options.user:
            return
        response = await self._auth.authenticate(self.options.user, self.options.password, timeout=self.options.timeout)
        self._token = response.token
        self.kv.set_token(self._token)
        self.lease.set_token(self._token)

    async def call(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one KV call with the deadline; authenticate first, and once more if the token expired."""
        if self.options.user and self._token is None:
            await self.authenticate()
        kwargs.setdefault("timeout", self.options.timeout)
        try:
            return await operation(*args, **kwargs)
        except EtcdUnauthenticatedError:
            if not self.options.user:
                raise
            await self.authenticate()
            return await operation(*args, **kwargs)

    async def listing(self, prefix: str) -> Listing:
        """Every key under `prefix`, the revision they were read at and the cluster that answered
        (one linearizable range)."""
        response = await self.call(self.kv.get, prefix, prefix_range_end(prefix.encode()))
        return Listing(
            response.header.revision,
            response.header.cluster_id,
            [KeyValue(_key(kv.key), kv.value, kv.mod_revision) for kv in response.kvs],
        )

    async def current(self, prefix: str) -> tuple[int, int]:
        """etcd's revision and cluster id now, from a linearizable read that returns no keys (only
        their count under `prefix`): what the cluster has committed, whichever member answers."""
        response = await self.call(self.kv.get, prefix, prefix_range_end(prefix.encode()), count_only=True)
        return response.header.revision, response.header.cluster_id

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` and the revision they were read at (one linearizable range)."""
        listing = await self.listing(prefix)
        return listing.revision, listing.kvs

    async def keys(self, prefix: str) -> list[str]:
        """The keys under `prefix`, without their values (a set's chunks can be megabytes)."""
        response = await self.call(self.kv.get, prefix, prefix_range_end(prefix.encode()), keys_only=True)
        return [_key(kv.key) for kv in response.kvs]

    async def get(self, key: str) -> KeyValue | None:
        response = await self.call(self.kv.get, key)
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return KeyValue(_key(kv.key), kv.value, kv.mod_revision)

    async def watch(self, prefix: str, start_revision: int, liveness: float) -> AsyncGenerator[WatchBatch, None]:
        """Yield the changes from `start_revision` on, a batch per response (see WatchBatch).

        Raises CompactedError when `start_revision` is no longer available and WatchLostError when the
        stream ends, is cancelled, loses its leader, or is silent for `liveness` seconds although a
        progress report was asked for every `liveness / 3`.
        """
        if self.options.user and self._token is None:
            await self.authenticate()
        create = WatchCreateRequest(
            key=prefix.encode(),
            range_end=prefix_range_end(prefix.encode()),
            start_revision=start_revision,
            progress_notify=True,
            fragment=True,
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(create_request=create)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(liveness / 3):
                        await stop.wait()
                if not stop.is_set():
                    yield WatchRequest(progress_request={})

        metadata = [("hasleader", "true")]
        if self._token:
            metadata.append(("token", self._token))
        call = self._watch.Watch(requests(), metadata=metadata)
        pending: list[Change] = []
        quick = False  # HANDOVER held for a run of big responses
        try:
            while True:
                try:
                    async with asyncio.timeout(liveness):
                        response = await call.read()
                except TimeoutError:
                    raise WatchLostError(f"no answer from etcd for {liveness:g} s") from None
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise WatchLostError("etcd ended the watch stream")
                quick = _hand_over_quickly(response, quick)
                if response.compact_revision:
                    raise CompactedError(response.compact_revision)
                if response.canceled:
                    raise WatchLostError(f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}")
                pending.extend(
                    Change(_key(e.kv.key), e.kv.value if e.type == 0 else None, e.kv.mod_revision)
                    for e in response.events
                )
                if response.fragment:
                    continue
                changes, pending = pending, []
                # The creation response carries the store's current revision, but events from
                # start_revision up to it may still be on their way: it proves the stream is alive,
                # not that the caller has seen everything up to that revision.
                yield WatchBatch(response.header.revision, response.header.cluster_id, changes, response.created)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._token = None
            raise WatchLostError(f"watch failed: {exc.code().name} {exc.details() or ''}".strip()) from None
        finally:
            if quick:
                HANDOVER.leave()
            stop.set()
            call.cancel()


__all__ = [
    "Change",
    "CompactedError",
    "Etcd",
    "EtcdError",
    "EtcdOptions",
    "KeyValue",
    "Listing",
    "WatchBatch",
    "WatchLostError",
]
