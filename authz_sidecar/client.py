"""A small Python client for the sidecar's application API (``authz_sidecar.v1.Authz``).

    from authz_sidecar.client import AuthzClient

    with AuthzClient("unix:///run/authz/authz.sock") as authz:
        if authz.check("things:edit", token=user_token, scope="account:acme").allowed:
            ...

:class:`AuthzClient` is synchronous, :class:`AsyncAuthzClient` the same for asyncio. Every call has a
deadline (``timeout``, seconds). Unary calls are retried when, and only when, the sidecar is
UNAVAILABLE (starting, restarting, not listening yet), with a short backoff; a consuming
``verify_and_check`` is never retried, because a lost answer to a consume that did happen would make
the retry look like a replay. Streams are not retried either: resend the manifest.

Exceptions, all :class:`AuthzClientError` (with ``.code``, the gRPC status):

- :class:`UntrustedCallerError`: a bare principal from a caller the sidecar does not trust; send
  the end user's token (PERMISSION_DENIED).
- :class:`TokenRefusedError`: the token did not verify, or this sidecar verifies none
  (UNAUTHENTICATED).
- :class:`NotFreshError`: the sidecar had not applied ``at_least_revision`` by the deadline
  (FAILED_PRECONDITION); it never answers from an older snapshot.
- :class:`InvalidRequestError`: the request itself is wrong (INVALID_ARGUMENT).
- :class:`SidecarUnavailableError`: still UNAVAILABLE after the retries, or the deadline passed.
- :class:`AuthzClientError` itself: anything else.

A deny is not an exception: ``Decision.allowed`` is False with its ``reason``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, Union

import grpc
import grpc.aio

from authz_sidecar.v1 import authz_pb2, authz_pb2_grpc

DEFAULT_TIMEOUT = 2.0
DEFAULT_RETRIES = 2
_BACKOFF = 0.1
_T = TypeVar("_T")
Envelope = authz_pb2.Envelope


class AuthzClientError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class UntrustedCallerError(AuthzClientError):
    pass


class TokenRefusedError(AuthzClientError):
    pass


class NotFreshError(AuthzClientError):
    pass


class InvalidRequestError(AuthzClientError):
    pass


class SidecarUnavailableError(AuthzClientError):
    pass


_ERRORS: dict[grpc.StatusCode, type[AuthzClientError]] = {
    grpc.StatusCode.PERMISSION_DENIED: UntrustedCallerError,
    grpc.StatusCode.UNAUTHENTICATED: TokenRefusedError,
    grpc.StatusCode.FAILED_PRECONDITION: NotFreshError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.UNAVAILABLE: SidecarUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: SidecarUnavailableError,
}


def _error(exc: grpc.RpcError) -> AuthzClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _ERRORS.get(code, AuthzClientError)(code, details or "")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    decided_by: str  # "active" or "shadow" ("" when refused before any set was asked)
    version: str  # the set that decided
    active_version: str
    selection: str
    revision: int  # the sidecar had applied etcd up to here

    @classmethod
    def of(cls, r: authz_pb2.CheckResponse) -> Decision:
        return cls(r.allowed, r.reason, r.decided_by, r.enforced_version, r.active_version, r.selection, r.revision)


@dataclass(frozen=True, slots=True)
class Block:
    block_id: str
    origin_account: str
    origin_volume: str = ""
    created_at: int = 0
    checksum: str = ""

    def message(self) -> authz_pb2.Block:
        return authz_pb2.Block(
            block_id=self.block_id,
            origin_volume=self.origin_volume,
            origin_account=self.origin_account,
            created_at=self.created_at,
            checksum=self.checksum,
        )

    @classmethod
    def of(cls, b: authz_pb2.Block) -> Block:
        return cls(b.block_id, b.origin_account, b.origin_volume, b.created_at, b.checksum)


@dataclass(frozen=True, slots=True)
class RefusedBlock:
    block_id: str
    origin_account: str
    reason: str


@dataclass(frozen=True, slots=True)
class ManifestSummary:
    allowed: int
    refused: int
    version: str
    revision: int
    complete: bool
    permission: str


ManifestItem = Union[Block, RefusedBlock, ManifestSummary]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True, slots=True)
class Verification:
    valid: bool  # signature, expiry and (when consumed) first use all hold
    allowed: bool  # and the principal still holds the permission now
    reason: str
    version: str
    revision: int


def _items(response: authz_pb2.FilterManifestResponse) -> Iterator[ManifestItem]:
    kind = response.WhichOneof("item")
    if kind == "answers":
        yield from (Block.of(b) for b in response.answers.allowed)
        yield from (RefusedBlock(r.block_id, r.origin_account, r.reason) for r in response.answers.refused)
    elif kind == "allowed":
        yield Block.of(response.allowed)
    elif kind == "refused":
        r = response.refused
        yield RefusedBlock(r.block_id, r.origin_account, r.reason)
    else:
        s = response.summary
        yield ManifestSummary(s.allowed, s.refused, s.version, s.revision, s.complete, s.permission)


# Blocks per message: one message per block costs the sidecar far more than judging it.
BATCH = 1_000


def _header(action: str, principal: str, token: str, at_least_revision: int) -> authz_pb2.FilterManifestRequest:
    return authz_pb2.FilterManifestRequest(
        header=authz_pb2.ManifestHeader(
            principal=principal, token=token, action=action, at_least_revision=at_least_revision
        )
    )


def _batch(blocks: list[Block]) -> authz_pb2.FilterManifestRequest:
    return authz_pb2.FilterManifestRequest(blocks=authz_pb2.BlockBatch(blocks=[b.message() for b in blocks]))


def _manifest(
    blocks: Iterable[Block], action: str, principal: str, token: str, at_least_revision: int
) -> Iterator[authz_pb2.FilterManifestRequest]:
    yield _header(action, principal, token, at_least_revision)
    pending: list[Block] = []
    for block in blocks:
        pending.append(block)
        if len(pending) == BATCH:
            yield _batch(pending)
            pending = []
    if pending:
        yield _batch(pending)


def _sign_request(
    payload: bytes, permission: str, *, principal: str, token: str, scope: str, ttl_seconds: int
) -> authz_pb2.SignEventRequest:
    return authz_pb2.SignEventRequest(
        token=token, principal=principal, permission=permission, scope=scope, payload=payload, ttl_seconds=ttl_seconds
    )


def _verification(r: authz_pb2.VerifyEventResponse) -> Verification:
    return Verification(r.valid, r.allowed, r.reason, r.version, r.revision)


class AuthzClient:
    """The synchronous client. ``target``: ``host:port`` or ``unix:///path``."""

    def __init__(
        self,
        target: str = "127.0.0.1:9191",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = authz_pb2_grpc.AuthzStub(self._channel)
        self.timeout = timeout
        self.retries = retries

    def __enter__(self) -> AuthzClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, call: Callable[..., _T], request: Any, timeout: float | None, retry: bool = True) -> _T:
        deadline = time.monotonic() + (timeout or self.timeout)
        attempt = 0
        while True:
            try:
                return call(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as exc:
                error = _error(exc)
                attempt += 1
                pause = _BACKOFF * 2 ** (attempt - 1)
                if not retry or error.code != grpc.StatusCode.UNAVAILABLE or attempt > self.retries:
                    raise error from None
                if time.monotonic() + pause >= deadline:
                    raise error from None
                time.sleep(pause)

    def check(
        self,
        permission: str,
        *,
        principal: str = "",
        token: str = "",
        scope: str = "",
        at_least_revision: int = 0,
        timeout: float | None = None,
    ) -> Decision:
        request = authz_pb2.CheckRequest(
            principal=principal, token=token, permission=permission, scope=scope, at_least_revision=at_least_revision
        )
        return Decision.of(self._unary(self._stub.Check, request, timeout))

    def filter_manifest(
        self,
        blocks: Iterable[Block],
        *,
        action: str,
        principal: str = "",
        token: str = "",
        at_least_revision: int = 0,
        timeout: float | None = None,
    ) -> Iterator[ManifestItem]:
        """The blocks in (sent in batches), the answer out as it comes: the allowed :class:`Block`
        and the :class:`RefusedBlock` of each batch, then the :class:`ManifestSummary` (check
        ``complete``: False, or no summary at all, means the answer was cut short)."""
        try:
            for response in self._stub.FilterManifest(
                _manifest(blocks, action, principal, token, at_least_revision), timeout=timeout or self.timeout
            ):
                yield from _items(response)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def sign(
        self,
        payload: bytes,
        permission: str,
        *,
        principal: str = "",
        token: str = "",
        scope: str = "",
        ttl_seconds: int = 0,
        timeout: float | None = None,
    ) -> Envelope:
        request = _sign_request(
            payload, permission, principal=principal, token=token, scope=scope, ttl_seconds=ttl_seconds
        )
        response: authz_pb2.SignEventResponse = self._unary(self._stub.SignEvent, request, timeout)
        return response.envelope

    def verify_and_check(
        self, envelope: Envelope, *, consume: bool = True, timeout: float | None = None
    ) -> Verification:
        request = authz_pb2.VerifyEventRequest(envelope=envelope, consume=consume)
        return _verification(self._unary(self._stub.VerifyEvent, request, timeout, retry=not consume))


class AsyncAuthzClient:
    """The asyncio client; use inside a running loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:9191",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = authz_pb2_grpc.AuthzStub(self._channel)
        self.timeout = timeout
        self.retries = retries

    async def __aenter__(self) -> AsyncAuthzClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _unary(self, call: Callable[..., Any], request: Any, timeout: float | None, retry: bool = True) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        attempt = 0
        while True:
            try:
                return await call(request, timeout=max(0.001, deadline - loop.time()))
            except grpc.RpcError as exc:
                error = _error(exc)
                attempt += 1
                pause = _BACKOFF * 2 ** (attempt - 1)
                if not retry or error.code != grpc.StatusCode.UNAVAILABLE or attempt > self.retries:
                    raise error from None
                if loop.time() + pause >= deadline:
                    raise error from None
                await asyncio.sleep(pause)

    async def check(
        self,
        permission: str,
        *,
        principal: str = "",
        token: str = "",
        scope: str = "",
        at_least_revision: int = 0,
        timeout: float | None = None,
    ) -> Decision:
        request = authz_pb2.CheckRequest(
            principal=principal, token=token, permission=permission, scope=scope, at_least_revision=at_least_revision
        )
        return Decision.of(await self._unary(self._stub.Check, request, timeout))

    async def filter_manifest(
        self,
        blocks: Iterable[Block] | AsyncIterable[Block],
        *,
        action: str,
        principal: str = "",
        token: str = "",
        at_least_revision: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[ManifestItem]:
        async def requests() -> AsyncIterator[authz_pb2.FilterManifestRequest]:
            yield _header(action, principal, token, at_least_revision)
            if isinstance(blocks, AsyncIterable):
                pending: list[Block] = []
                async for block in blocks:
                    pending.append(block)
                    if len(pending) == BATCH:
                        yield _batch(pending)
                        pending = []
                if pending:
                    yield _batch(pending)
            else:
                for request in _manifest(blocks, action, principal, token, at_least_revision):
                    if request.WhichOneof("item") != "header":
                        yield request

        try:
            async for response in self._stub.FilterManifest(requests(), timeout=timeout or self.timeout):
                for item in _items(response):
                    yield item
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def sign(
        self,
        payload: bytes,
        permission: str,
        *,
        principal: str = "",
        token: str = "",
        scope: str = "",
        ttl_seconds: int = 0,
        timeout: float | None = None,
    ) -> Envelope:
        request = _sign_request(
            payload, permission, principal=principal, token=token, scope=scope, ttl_seconds=ttl_seconds
        )
        response: authz_pb2.SignEventResponse = await self._unary(self._stub.SignEvent, request, timeout)
        return response.envelope

    async def verify_and_check(
        self, envelope: Envelope, *, consume: bool = True, timeout: float | None = None
    ) -> Verification:
        request = authz_pb2.VerifyEventRequest(envelope=envelope, consume=consume)
        return _verification(await self._unary(self._stub.VerifyEvent, request, timeout, retry=not consume))


__all__ = [
    "AsyncAuthzClient",
    "AuthzClient",
    "AuthzClientError",
    "Block",
    "Decision",
    "Envelope",
    "InvalidRequestError",
    "ManifestItem",
    "ManifestSummary",
    "NotFreshError",
    "RefusedBlock",
    "SidecarUnavailableError",
    "TokenRefusedError",
    "UntrustedCallerError",
    "Verification",
]
