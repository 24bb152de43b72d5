"""Webhooks the canary controller calls, shaped like Flagger's: a confirm-promotion gate, a pre-step
gate and an event feed (docs/webhooks.md).

The two gates fail closed. A hook that is down, slow, redirecting or answering garbage holds the
promotion or the step, because the alternative is moving permissions on nobody's say-so; the plan
asks again at its next interval. The event feed is the opposite: it is told of outcomes after they
happened, so it must never hold the plan, and a caller's ``event()`` returns before any I/O.

HTTP is spoken over asyncio streams, not urllib in a worker thread. urllib's timeout bounds each
socket operation rather than the attempt, so a hook trickling its answer a byte at a time could hold
a plan for as long as it liked, and a thread cannot be cancelled when the leader is deposed. Here one
deadline covers connect, send and the answer's head, cancellation ends a call at once, and a dead
hook ties up no thread. The price is a deliberately small HTTP/1.1 client: one POST per connection,
no redirects, no proxies, no credentials in URLs, answers read to 64 KiB.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import re
import socket
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from authz_sidecar import __version__
from authz_sidecar.documents.checks import mapping_of, only_fields
from authz_sidecar.errors import DocumentError

log = structlog.get_logger("authz_sidecar.control.webhooks")

Kind = Literal["confirm-promotion", "pre-step", "event"]

USER_AGENT: Final = f"authz-sidecar/{__version__}"
# Enough for any explanation a hook gives; a hook cannot make the controller buffer more.
MAX_ANSWER_BYTES: Final = 64 * 1024
# The status line and headers together; a line longer than this is refused as malformed.
MAX_HEAD_BYTES: Final = 64 * 1024
EXCERPT_CHARS: Final = 200
MAX_RETRIES: Final = 10
MAX_URL_CHARS: Final = 2048
# Backoff before retry n: a ceiling of 0.2 s doubling per retry up to 2 s, drawn from its upper
# half. Jitter keeps several controllers' retries from arriving together; the cap keeps the worst
# call, (retries + 1) * timeout plus about 14 s at retries=10, inside any sane plan interval.
BACKOFF_BASE: Final = 0.2
BACKOFF_CAP: Final = 2.0
# Answers worth asking again: the hook is overloaded or restarting. Any other 4xx is the hook's
# considered "no"; repeating the question would only delay the same answer.
RETRIED_STATUSES: Final = frozenset({408, 425, 429})

_FIELDS: Final = frozenset({"confirm_promotion", "pre_step", "event", "timeout", "retries"})
_URL_FIELDS: Final = ("confirm_promotion", "pre_step", "event")
# Raw bytes go into the request line and Host header, so a URL is printable ASCII without spaces:
# anything else could split the request (CR/LF) or be sent to a host other than the one shown.
_URL_TEXT = re.compile(r"[\x21-\x7e]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: .*)?")


def _check_url(value: Any, where: str, name: str) -> str:
    def refuse(why: str) -> DocumentError:
        return DocumentError(why, document=where, field=name, value=value)

    if not isinstance(value, str):
        raise refuse(f"expected a URL string (empty for none), got {value!r}")
    if not value:
        return value
    if len(value) > MAX_URL_CHARS:
        raise refuse(f"a URL has at most {MAX_URL_CHARS} characters, this one {len(value)}")
    if not _URL_TEXT.fullmatch(value):
        raise refuse(
            f"{value!r} is not printable ASCII without spaces (percent-encode the path, give the host in punycode)"
        )
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise refuse(f"{value!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise refuse(f"{value!r}: only http:// and https:// hooks are called, not {parts.scheme or 'no scheme'}")
    if not parts.hostname:
        raise refuse(f"{value!r} names no host")
    if parts.username is not None or parts.password is not None:
        # The configuration is stored in etcd with the plan and printed by ctl status.
        raise refuse("a URL with user:password@ is refused: the plan, and so the password, is stored in etcd")
    if port == 0:
        raise refuse(f"{value!r}: port 0 cannot be called")
    return value


def _check_timeout(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise DocumentError(
            f"the seconds one attempt may take must be a number above 0, got {value!r}",
            document=where,
            field="timeout",
            value=value,
        )
    return float(value)


def _check_retries(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise DocumentError(
            f"extra attempts after the first must be a whole number from 0 to {MAX_RETRIES}, got {value!r}",
            document=where,
            field="retries",
            value=value,
        )
    return value


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Where the hooks are and how patiently they are called. An empty URL means no such hook."""

    confirm_promotion: str = ""  # non-2xx (or unreachable after retries) holds the promotion
    pre_step: str = ""  # called before each step's weights are applied; non-2xx holds the step
    event: str = ""  # told of every outcome; never blocks the plan
    timeout: float = 5.0  # seconds per attempt: connect, send and the answer's head
    retries: int = 2  # extra attempts after the first

    def __post_init__(self) -> None:
        # Checked here too so that a configuration built in code (flags, tests) meets the same rules
        # as one read from etcd: the client below writes URLs into requests as they are.
        for name in _URL_FIELDS:
            _check_url(getattr(self, name), "webhooks", name)
        _check_timeout(self.timeout, "webhooks")
        _check_retries(self.retries, "webhooks")

    def document(self) -> dict[str, Any]:
        """Every field, so that what etcd holds says what will be called without knowing defaults."""
        return {
            "confirm_promotion": self.confirm_promotion,
            "pre_step": self.pre_step,
            "event": self.event,
            "timeout": self.timeout,
            "retries": self.retries,
        }

    @classmethod
    def from_document(cls, data: Mapping[str, Any], where: str) -> WebhookConfig:
        """Read a stored or written configuration; missing fields take their defaults, unknown ones are
        refused (a misspelt ``confirm_promotoin`` must not silently leave promotions ungated)."""
        mapping = mapping_of(data, where, "webhooks")
        only_fields(mapping, _FIELDS, where)
        urls = {name: _check_url(mapping.get(name, ""), where, name) for name in _URL_FIELDS}
        timeout = _check_timeout(mapping.get("timeout", 5.0), where)
        retries = _check_retries(mapping.get("retries", 2), where)
        return cls(**urls, timeout=timeout, retries=retries)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A gate's answer, with the sentence the controller shows and audits."""

    allowed: bool  # True when no URL is configured, or the hook answered 2xx
    detail: str


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes


class _Unreachable(Exception):  # noqa: N818 - a condition, named for what the detail says
    """No HTTP answer from this attempt; the reason is the end of the detail sentence."""


def encode(payload: Mapping[str, Any]) -> bytes:
    """The body every hook receives: the payload as given, keys sorted, so equal payloads are equal
    bytes (a hook may sign, hash or deduplicate them). NaN and infinity are refused: not JSON."""
    text = json.dumps(dict(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _backoff(retry: int) -> float:
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (retry - 1))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


def _excerpt(body: bytes) -> str:
    """One line of the answer for a detail that reaches logs, the audit chain and a terminal."""
    text = body[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:EXCERPT_CHARS]


def _refused(kind: Kind, answer: _Answer) -> Verdict:
    status = f"{kind} answered {answer.status}"
    if 300 <= answer.status < 400:
        status += " (a redirect, which is not followed)"
    excerpt = _excerpt(answer.body)
    return Verdict(False, f"{status}: {excerpt}" if excerpt else status)


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readline()
    except ValueError:  # over the reader's limit (MAX_HEAD_BYTES)
        raise _Unreachable(f"malformed answer: a header line over {MAX_HEAD_BYTES} bytes") from None
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)
    return line.rstrip(b"\r\n")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    while True:
        line = await _line(reader)
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise _Unreachable(f"malformed answer: not an HTTP/1.x status line: {_excerpt(line[:60])!r}")
        status = int(match[1])
        headers: dict[str, str] = {}
        size = len(line)
        while line := await _line(reader):
            size += len(line)
            if size > MAX_HEAD_BYTES:
                raise _Unreachable(f"malformed answer: headers over {MAX_HEAD_BYTES} bytes")
            name, colon, value = line.partition(b":")
            if not colon:
                raise _Unreachable(f"malformed answer: a header line without a colon: {_excerpt(line[:60])!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        # 1xx answers are interim (100 Continue, 103 Early Hints); the real one follows.
        if not 100 <= status < 200 or status == 101:
            return status, headers


async def _read_chunked(reader: asyncio.StreamReader, into: bytearray) -> None:
    while len(into) < MAX_ANSWER_BYTES:
        size = int((await _line(reader)).split(b";")[0].strip(), 16)
        if size == 0:
            return
        take = min(size, MAX_ANSWER_BYTES - len(into))
        into += await reader.readexactly(take)
        if take < size:
            return
        await reader.readexactly(2)


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str], deadline: float) -> bytes:
    """What the answer explains, up to MAX_ANSWER_BYTES and the attempt's deadline. The status has
    already decided; a body cut short by the deadline or a dropped connection still explains."""
    body = bytearray()
    try:
        async with asyncio.timeout_at(deadline):
            if "chunked" in headers.get("transfer-encoding", "").lower():
                await _read_chunked(reader, body)
                return bytes(body)
            length = headers.get("content-length", "")
            want = min(int(length), MAX_ANSWER_BYTES) if length.isdigit() else MAX_ANSWER_BYTES
            while len(body) < want and (data := await reader.read(want - len(body))):
                body += data
    except asyncio.IncompleteReadError as exc:
        body += exc.partial
    except (TimeoutError, OSError, ValueError, _Unreachable):
        pass
    return bytes(body[:MAX_ANSWER_BYTES])


class Webhooks:
    """Calls the configured hooks. Use it from the controller's event loop: ``event()`` schedules its
    delivery there, and the counters are plain attributes read by the same loop."""

    def __init__(
        self, config: WebhookConfig, *, max_pending_events: int = 100, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        if max_pending_events < 1:
            raise ValueError(f"max_pending_events must be at least 1, got {max_pending_events}")
        self.config = config
        self.max_pending_events = max_pending_events
        self.events_delivered = 0
        self.events_failed = 0
        self.events_dropped = 0
        # https:// hooks are verified against the system's CAs unless a context says otherwise.
        self._ssl_context = ssl_context
        self._pending: collections.deque[tuple[bytes, dict[str, Any]]] = collections.deque()
        self._in_flight = False
        self._worker: asyncio.Task[None] | None = None

    @property
    def events_pending(self) -> int:
        """Events waiting, plus the one being delivered."""
        return len(self._pending) + self._in_flight

    async def confirm_promotion(self, payload: Mapping[str, Any]) -> Verdict:
        return await self._gate("confirm-promotion", self.config.confirm_promotion, payload)

    async def pre_step(self, payload: Mapping[str, Any]) -> Verdict:
        return await self._gate("pre-step", self.config.pre_step, payload)

    def event(self, payload: Mapping[str, Any]) -> None:
        """Queue one outcome for the event hook and return before any I/O. When more than
        ``max_pending_events`` wait, the oldest is dropped: the newest outcome (a rollback, a
        promotion) is the one an operator watching the feed most needs. Never raises."""
        if not self.config.event:
            return
        about = {key: payload.get(key) for key in ("type", "plan_id", "outcome") if key in payload}
        try:
            body = encode(payload)
            loop = asyncio.get_running_loop()
        except (TypeError, ValueError, RuntimeError) as exc:
            # A payload that is not JSON, or a call from outside the event loop: the caller's bug,
            # but the plan it is running must not stop for the feed's sake.
            self.events_failed += 1
            log.error("webhook_event_not_sent", error=str(exc) or type(exc).__name__, **about)
            return
        if len(self._pending) >= self.max_pending_events:
            _, lost = self._pending.popleft()
            self.events_dropped += 1
            log.warning("webhook_event_dropped", pending=len(self._pending), dropped_total=self.events_dropped, **lost)
        self._pending.append((body, about))
        worker = self._worker
        # A worker left on another loop (a previous asyncio.run) would never run again.
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._worker = loop.create_task(self._deliver_pending(), name="authz-sidecar-webhook-events")

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - the controller's interface
        """Wait up to ``timeout`` seconds for pending events. What is still pending then is abandoned
        and counted as dropped: at shutdown a hook that is down must not hold the process."""
        worker = self._worker
        if worker is None or worker.done():
            return
        await asyncio.wait({worker}, timeout=timeout)
        if worker.done():
            return
        abandoned = self.events_pending
        self._pending.clear()
        worker.cancel()
        await asyncio.wait({worker})
        self.events_dropped += abandoned
        log.warning("webhook_events_abandoned", count=abandoned, dropped_total=self.events_dropped)

    async def _deliver_pending(self) -> None:
        """One delivery at a time, in order: the feed reads as the plan happened."""
        while self._pending:
            body, about = self._pending.popleft()
            self._in_flight = True
            try:
                verdict = await self._call("event", self.config.event, body)
            except Exception as exc:  # a bug here must not end the feed or reach the plan
                verdict = Verdict(False, f"event not delivered: {exc!r}")
            finally:
                self._in_flight = False
            if verdict.allowed:
                self.events_delivered += 1
            else:
                self.events_failed += 1
                log.warning("webhook_event_failed", detail=verdict.detail, failed_total=self.events_failed, **about)

    async def _gate(self, kind: Kind, url: str, payload: Mapping[str, Any]) -> Verdict:
        if not url:
            return Verdict(True, f"no {kind} webhook")
        try:
            body = encode(payload)
        except (TypeError, ValueError) as exc:
            # Held, not raised: the plan stays where it is and says why, rather than the controller
            # failing at every interval.
            log.error("webhook_payload_not_json", kind=kind, error=str(exc))
            return Verdict(False, f"{kind} not called: the payload is not JSON ({exc})")
        return await self._call(kind, url, body)

    async def _call(self, kind: Kind, url: str, body: bytes) -> Verdict:
        attempts = self.config.retries + 1
        for n in range(1, attempts + 1):
            try:
                answer = await self._attempt(kind, url, body)
            except _Unreachable as exc:
                reason = str(exc)
                if n == attempts:
                    return Verdict(False, f"{kind} unreachable after {_attempts(attempts)}: {reason}")
            else:
                if 200 <= answer.status < 300:
                    return Verdict(True, f"{kind} answered {answer.status}")
                if not (answer.status >= 500 or answer.status in RETRIED_STATUSES) or n == attempts:
                    return _refused(kind, answer)
                reason = f"answered {answer.status}"
            log.info("webhook_retry", kind=kind, attempt=n, attempts=attempts, reason=reason)
            await asyncio.sleep(_backoff(n))
        raise AssertionError("unreachable")

    async def _attempt(self, kind: Kind, url: str, body: bytes) -> _Answer:
        """One POST on a fresh connection, bounded as a whole by the timeout; raises _Unreachable
        with the reason when no HTTP answer came."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (
            f"POST {target} HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            f"X-Authz-Webhook: {kind}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        context: ssl.SSLContext | None = None
        if secure:
            context = self._ssl_context = self._ssl_context or ssl.create_default_context()
        timeout = self.config.timeout
        deadline = asyncio.get_running_loop().time() + timeout
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(
                    host,
                    parts.port or (443 if secure else 80),
                    ssl=context,
                    server_hostname=host if secure else None,
                    limit=MAX_HEAD_BYTES,
                )
                writer.write(head + body)
                await writer.drain()
                status, headers = await _read_head(reader)
            body_read = b"" if 200 <= status < 300 else await _read_body(reader, headers, deadline)
            return _Answer(status, body_read)
        except TimeoutError:
            raise _Unreachable(f"timed out after {timeout:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise _Unreachable(f"TLS certificate not accepted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise _Unreachable(f"TLS failed: {exc.reason or exc}") from None
        except ConnectionRefusedError:
            raise _Unreachable("connection refused") from None
        except socket.gaierror as exc:
            raise _Unreachable(f"cannot resolve {host}: {exc.strerror}") from None
        except asyncio.IncompleteReadError:
            raise _Unreachable("connection closed before a complete answer") from None
        except OSError as exc:
            raise _Unreachable(exc.strerror or str(exc) or type(exc).__name__) from None
        finally:
            if writer is not None:
                # Connection: close was asked for and the answer is read; nothing is waited for.
                writer.close()
