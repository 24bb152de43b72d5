"""authz_sidecar.v1.Authz/FilterManifest: a manifest of blocks in, the blocks the principal may take
out with the action (and, for each other block, why not), streamed both ways in either server model.

The first request message is the header (principal, action); every later one a block or a batch of
blocks. Each message is answered as it arrives, before the next is read (a batch in parts of
:data:`ANSWER_CHUNK` blocks), so a sidecar holds one message and one answer of a call at a time
whatever the manifest's length, and gRPC's flow control holds back a client that sends faster than
it reads. The answer ends with a summary whose ``complete`` is true only when the request stream
ended normally and every block sent was answered; a call the client cancelled, whose deadline passed
or that broke a bound ends without one, so a consumer tells a whole answer from a cut one.

Messages are taken and returned as bytes (the handlers are registered without (de)serialisers):
a message's size is checked before it is parsed, and one that does not parse is a clear
INVALID_ARGUMENT instead of a failure inside gRPC. What is decided and counted is
:mod:`authz_sidecar.decision.manifest`'s; the loop over a batch's blocks is here, over the
protobuf messages, because copying them into plain values would cost more than judging them.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from authz_sidecar.decision.manifest import MAX_FIELD_CHARS, ManifestError, ManifestJudge, ManifestRequest
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.fronts.appidentity import AppIdentity, AppRefusedError
from authz_sidecar.fronts.freshness import wait_fresh, wait_fresh_async
from authz_sidecar.model.reasons import Reason
from authz_sidecar.v1 import authz_pb2

# Blocks per BatchAnswer: a large batch is answered in parts, so that the aio server's event loop
# (which answers Envoy's Checks too) is held for one part at a time (~1-2 ms), not for the batch.
ANSWER_CHUNK = 1000
# A block whose encoding is this long or shorter has no field over MAX_FIELD_CHARS: only longer
# ones are measured field by field.
_SMALL_BLOCK = MAX_FIELD_CHARS
_MALFORMED = Reason.MALFORMED_BLOCK.value
_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "refused": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "stale": grpc.StatusCode.UNAVAILABLE,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "error": grpc.StatusCode.INTERNAL,
}

log = structlog.get_logger("authz_sidecar.manifest")


def _fields_fit(block: authz_pb2.Block) -> bool:
    return (
        len(block.block_id) <= MAX_FIELD_CHARS
        and len(block.origin_volume) <= MAX_FIELD_CHARS
        and len(block.checksum) <= MAX_FIELD_CHARS
    )


def judge_blocks(
    request: ManifestRequest, blocks: Sequence[authz_pb2.Block]
) -> tuple[list[authz_pb2.Block], list[authz_pb2.RefusedBlock]]:
    """The allowed blocks (in order) and the refused ones with their reasons. The hot loop: per
    block one dict lookup for its account's verdict and one size check; an account seen for the
    first time is judged (and counted) by the request."""
    accounts = request.accounts
    first_seen = request.account
    refuse = authz_pb2.RefusedBlock
    allowed: list[authz_pb2.Block] = []
    refused: list[authz_pb2.RefusedBlock] = []
    for block in blocks:
        account = block.origin_account
        tally = accounts.get(account) or first_seen(account)
        if block.block_id and (block.ByteSize() <= _SMALL_BLOCK or _fields_fit(block)):
            tally.blocks += 1
            if tally.allowed:
                allowed.append(block)
                continue
            reason = tally.reason
        else:
            tally.malformed += 1
            reason = _MALFORMED
        refused.append(refuse(block_id=block.block_id, origin_account=account, reason=reason))
    return allowed, refused


class ManifestStream:
    """One call, without I/O: the handlers of both server models feed it the request messages as
    gRPC hands them over and send what it returns, so the two answer alike."""

    def __init__(self, servicer: ManifestServicer, context: Any) -> None:
        self._servicer = servicer
        self._context = context
        self.request: ManifestRequest | None = None
        # How the call ended, as counted; anything that is not set on the way ended it early.
        self.result = "cancelled"

    def _parse(self, raw: bytes) -> authz_pb2.FilterManifestRequest:
        limit = self._servicer.max_message_bytes
        if len(raw) > limit:
            raise ManifestError(
                "too_large",
                f"request message of {len(raw)} bytes is over the limit of {limit} (--grpc-max-message-bytes); "
                "send smaller batches",
            )
        try:
            return authz_pb2.FilterManifestRequest.FromString(raw)
        except DecodeError:
            raise ManifestError("invalid", "a request message does not parse as a FilterManifestRequest") from None

    def header(self, raw: bytes | None) -> tuple[authz_pb2.ManifestHeader, str]:
        """The header and who it is for (checked as every call of this API is)."""
        if raw is None:
            raise ManifestError("invalid", "the stream ended without a header: the first message is a ManifestHeader")
        message = self._parse(raw)
        if message.WhichOneof("item") != "header":
            raise ManifestError("invalid", "the first message must be a ManifestHeader (principal, action)")
        return message.header, self._servicer.principal_of(message.header, self._context)

    def begin(self, header: authz_pb2.ManifestHeader, principal: str) -> None:
        """The snapshot and set every block of the call is judged by (once it is fresh enough)."""
        self.request = self._servicer.judge.begin(principal, header.action, header.at_least_revision)

    def _begun(self) -> ManifestRequest:
        if self.request is None:
            raise RuntimeError("FilterManifest: a block answered before the header")
        return self.request

    def answer(self, raw: bytes) -> Iterator[bytes]:
        """The answers to one request message: a block alone is answered alone, a batch in parts."""
        request = self._begun()
        message = self._parse(raw)
        kind = message.WhichOneof("item")
        if kind == "blocks":
            blocks = message.blocks.blocks
            request.admit(len(blocks))
            for start in range(0, len(blocks), ANSWER_CHUNK):
                allowed, refused = judge_blocks(request, blocks[start : start + ANSWER_CHUNK])
                answers = authz_pb2.BatchAnswer(allowed=allowed, refused=refused)
                yield authz_pb2.FilterManifestResponse(answers=answers).SerializeToString()
        elif kind == "block":
            request.admit(1)
            allowed, refused = judge_blocks(request, [message.block])
            single = (
                authz_pb2.FilterManifestResponse(allowed=allowed[0])
                if allowed
                else authz_pb2.FilterManifestResponse(refused=refused[0])
            )
            yield single.SerializeToString()
        elif kind == "header":
            raise ManifestError("invalid", "a second ManifestHeader: the header is the first message only")
        else:
            raise ManifestError("invalid", "a request message with neither a block nor a batch of blocks")

    def summary(self) -> bytes:
        request = self._begun()
        allowed, refused = request.counts()
        summary = authz_pb2.ManifestSummary(
            allowed=allowed,
            refused=refused,
            version=request.version,
            revision=request.snapshot.revision,
            complete=True,
            permission=request.handle,
        )
        return authz_pb2.FilterManifestResponse(summary=summary).SerializeToString()

    def close(self, failure: ManifestError | None) -> None:
        """Count and audit the call, once, however it ended."""
        if failure is not None:
            self.result = failure.result
            log.info("manifest_refused", result=failure.result, error=failure.message)
        if self.request is not None:
            self.request.finish(self.result)
        else:
            self._servicer.judge.metrics.manifest(self.result, ())


def _fault() -> ManifestError:
    log.exception("manifest_failed")
    return ManifestError("error", "the sidecar failed while judging the manifest (logged as manifest_failed)")


def _alive_sync(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return bool(context.is_active()) and (remaining is None or remaining > 0)


def _alive_aio(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call can still be answered. A cancelled call or a passed deadline can end the
    request stream as if the client had finished sending; checked before the summary is made."""
    remaining = context.time_remaining()
    return not context.cancelled() and not context.done() and (remaining is None or remaining > 0)


class ManifestServicer:
    def __init__(
        self,
        judge: ManifestJudge,
        *,
        max_message_bytes: int,
        workers: int,
        identity: AppIdentity | None = None,
        store: SnapshotStore | None = None,
    ) -> None:
        self.judge = judge
        # Who a call is for, as the application API's Check decides it (None: the header's principal).
        self.identity = identity
        self._store = store
        self.max_message_bytes = max_message_bytes
        # The threads server model: a stream holds a worker thread for as long as it lasts, so one
        # worker is always left for Checks (Envoy's traffic) and a stream past that is refused.
        self._thread_streams = max(0, workers - 1)
        self._thread_slots = threading.Semaphore(self._thread_streams)

    def principal_of(self, header: authz_pb2.ManifestHeader, context: Any) -> str:
        """Who asks, called once per call before any block is read: a token, or a bare principal
        from a trusted caller (fronts/appidentity.py), as for every call of this API."""
        if self.identity is None:
            if header.token:
                raise ManifestError("invalid", "this sidecar verifies no tokens: give the principal")
            return header.principal
        try:
            return self.identity.principal(header.principal, header.token, str(context.peer()))
        except AppRefusedError as exc:
            raise ManifestError("refused", exc.message, code=exc.code) from None

    def fresh(self, wanted: int, context: Any) -> None:
        if wanted and self._store is not None:
            try:
                wait_fresh(self._store, wanted, context)
            except AppRefusedError as exc:
                raise ManifestError("stale", exc.message, code=exc.code) from None

    async def fresh_async(self, wanted: int, context: Any) -> None:
        if wanted and self._store is not None:
            try:
                await wait_fresh_async(self._store, wanted, context)
            except AppRefusedError as exc:
                raise ManifestError("stale", exc.message, code=exc.code) from None

    def serve_sync(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """The threads server model's handler (a generator in a worker thread)."""
        if not self._thread_slots.acquire(blocking=False):
            busy = ManifestError(
                "busy",
                f"at most {self._thread_streams} FilterManifest streams at once in the threads server model "
                "(one worker is kept for Check; raise --workers)",
            )
            ManifestStream(self, context).close(busy)
            context.abort(_CODES[busy.result], busy.message)
        stream = ManifestStream(self, context)
        failure: ManifestError | None = None
        try:
            try:
                header, principal = stream.header(next(requests, None))
                self.fresh(header.at_least_revision, context)
                stream.begin(header, principal)
                for raw in requests:
                    yield from stream.answer(raw)
                if _alive_sync(context):
                    yield stream.summary()
                    stream.result = "complete"
            except grpc.RpcError:
                pass  # the client cancelled or the deadline passed while a message was awaited
            except ManifestError as exc:
                failure = exc
            except Exception:
                failure = _fault()
        finally:
            stream.close(failure)
            self._thread_slots.release()
        if failure is not None:
            context.abort(failure.code or _CODES[failure.result], failure.message)

    async def serve_aio(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """The aio server model's handler (an async generator on the event loop). A cancelled call
        raises CancelledError at an await or a yield: it leaves through `finally`, uncaught."""
        stream = ManifestStream(self, context)
        failure: ManifestError | None = None
        try:
            try:
                incoming = aiter(requests)
                header, principal = stream.header(await anext(incoming, None))
                await self.fresh_async(header.at_least_revision, context)
                stream.begin(header, principal)
                async for raw in incoming:
                    for answer in stream.answer(raw):
                        yield answer
                if _alive_aio(context):
                    yield stream.summary()
                    stream.result = "complete"
            except ManifestError as exc:
                failure = exc
            except Exception:
                failure = _fault()
        finally:
            stream.close(failure)
        if failure is not None:
            await context.abort(failure.code or _CODES[failure.result], failure.message)
