"""The controller's webhooks against a real HTTP server on 127.0.0.1: gates that hold on anything but
a 2xx, retries and deadlines, an event feed that never blocks, and the configuration's rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from authz_sidecar import __version__
from authz_sidecar.control.webhooks import WebhookConfig, Webhooks
from authz_sidecar.errors import DocumentError

from .certs import make_certs
from .helpers import wait_for

_T = TypeVar("_T")


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0  # seconds to wait before answering; cut short when the server closes
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    raw: bytes = b""  # sent as is instead of an HTTP answer


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HookServer:
    """A webhook receiver on 127.0.0.1:0 in a thread. Scripted answers are used in order; once they
    run out, every request gets `default`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.default = Answer()
        self._script: list[Answer] = []
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with server._lock:
                    server._seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
                    answer = server._script.pop(0) if server._script else server.default
                if answer.delay:
                    server._closing.wait(answer.delay)
                with contextlib.suppress(OSError):  # the client gave up first
                    self._answer(answer)

            def _answer(self, answer: Answer) -> None:
                if answer.raw:
                    self.wfile.write(answer.raw)
                    return
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                if answer.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    half = len(answer.body) // 2
                    for piece in (answer.body[:half], answer.body[half:]):
                        self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, _format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        scheme = "http"
        if tls is not None:
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True)
            scheme = "https"
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.base = f"{scheme}://127.0.0.1:{self._http.server_address[1]}"

    def url(self, path: str = "/hook") -> str:
        return self.base + path

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self._script.extend(answers)

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def close(self) -> None:
        self._closing.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


@pytest.fixture
def hook() -> Iterator[HookServer]:
    server = HookServer()
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run(make: Callable[[], Awaitable[_T]]) -> _T:
    async def main() -> _T:
        return await make()

    return asyncio.run(main())


def timed(make: Callable[[], Awaitable[_T]]) -> tuple[_T, float]:
    started = time.monotonic()
    result = run(make)
    return result, time.monotonic() - started


PAYLOAD: dict[str, Any] = {
    "type": "confirm-promotion",
    "version": "v7",
    "plan_id": "v7-plan-1",
    "step": {"index": 2, "region": "eu-west", "weight": 100},
    "outcome": "Successful",
    "gates": [{"name": "unexpected_mismatches", "value": 0, "threshold": 0, "passed": True}],
    "message": "all gates passed (évaluations: 1200)",
    "at": "2025-01-01T12:00:00Z",
}


# --- gates ------------------------------------------------------------------------------------


def test_a_2xx_answer_allows(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), pre_step=hook.url()))
    hook.script(Answer(200, b"go"), Answer(204))
    assert run(lambda: hooks.confirm_promotion(PAYLOAD)).allowed
    verdict = run(lambda: hooks.pre_step(PAYLOAD))
    assert verdict.allowed
    assert verdict.detail == "pre-step answered 204"
    assert len(hook.seen) == 2


def test_a_500_holds_with_the_status_and_the_start_of_the_body(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), retries=0))
    hook.default = Answer(500, b"release freeze\r\n until Monday\x07")
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert not verdict.allowed
    assert verdict.detail == "confirm-promotion answered 500: release freeze until Monday"

    hook.default = Answer(500, b"x" * 100_000)
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert verdict.detail == "confirm-promotion answered 500: " + "x" * 200


def test_a_chunked_answer_is_decoded_for_the_excerpt(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(pre_step=hook.url(), retries=0))
    hook.default = Answer(503, b"region eu-west is in maintenance", chunked=True)
    verdict = run(lambda: hooks.pre_step(PAYLOAD))
    assert verdict.detail == "pre-step answered 503: region eu-west is in maintenance"


def test_failures_are_retried_until_the_hook_answers(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), retries=2))
    hook.script(Answer(500), Answer(503))
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert verdict.allowed
    assert verdict.detail == "confirm-promotion answered 200"
    assert len(hook.seen) == 3
    assert len({s.body for s in hook.seen}) == 1  # the same payload each time


def test_the_last_answer_holds_once_retries_run_out(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), retries=1))
    hook.default = Answer(502, b"bad gateway")
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert verdict.detail == "confirm-promotion answered 502: bad gateway"
    assert len(hook.seen) == 2


def test_a_4xx_is_an_answer_and_is_not_asked_again(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), retries=3))
    hook.default = Answer(403, b"not approved")
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert verdict.detail == "confirm-promotion answered 403: not approved"
    assert len(hook.seen) == 1


def test_a_redirect_is_not_followed(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url("/first"), retries=2))
    hook.default = Answer(302, headers={"Location": hook.url("/second")})
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert not verdict.allowed
    assert verdict.detail == "confirm-promotion answered 302 (a redirect, which is not followed)"
    assert [s.path for s in hook.seen] == ["/first"]


def test_a_hook_that_hangs_times_out_within_the_attempts_budget(hook: HookServer) -> None:
    timeout, retries = 0.3, 1
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), timeout=timeout, retries=retries))
    hook.default = Answer(200, delay=30)
    verdict, took = timed(lambda: hooks.confirm_promotion(PAYLOAD))
    assert not verdict.allowed
    assert "timed out" in verdict.detail
    assert verdict.detail == "confirm-promotion unreachable after 2 attempts: timed out after 0.3 s"
    # Two whole attempts, one backoff of at most 0.2 s, and scheduling slack.
    assert (retries + 1) * timeout <= took < (retries + 1) * timeout + 0.2 + 0.5
    assert len(hook.seen) == 2


def test_a_hook_that_trickles_its_answer_is_cut_off_by_the_deadline() -> None:
    """The deadline bounds the attempt, not each read: a byte every 0.1 s never finishes a head."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        stop = threading.Event()

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    if stop.wait(0.1):
                        return
                    with contextlib.suppress(OSError):
                        conn.sendall(bytes([byte]))

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        hooks = Webhooks(WebhookConfig(pre_step=f"http://127.0.0.1:{port}/", timeout=0.5, retries=0))
        verdict, took = timed(lambda: hooks.pre_step(PAYLOAD))
        stop.set()
        thread.join(5)
    assert verdict.detail == "pre-step unreachable after 1 attempt: timed out after 0.5 s"
    assert took < 1.0


def test_a_closed_port_is_unreachable_quickly() -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=f"http://127.0.0.1:{closed_port()}/hook", retries=2))
    verdict, took = timed(lambda: hooks.confirm_promotion(PAYLOAD))
    assert not verdict.allowed
    assert verdict.detail == "confirm-promotion unreachable after 3 attempts: connection refused"
    assert took < 0.2 + 0.4 + 0.5  # the two backoffs at most, and slack


def test_an_answer_that_is_not_http_is_unreachable(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), retries=0))
    hook.default = Answer(raw=b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    verdict = run(lambda: hooks.confirm_promotion(PAYLOAD))
    assert verdict.detail.startswith("confirm-promotion unreachable after 1 attempt: malformed answer: ")


def test_no_url_configured_allows_without_calling() -> None:
    hooks = Webhooks(WebhookConfig())
    assert run(lambda: hooks.confirm_promotion(PAYLOAD)).detail == "no confirm-promotion webhook"
    verdict = run(lambda: hooks.pre_step(PAYLOAD))
    assert verdict.allowed
    assert verdict.detail == "no pre-step webhook"


def test_a_payload_that_is_not_json_holds_without_a_call(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url()))
    verdict = run(lambda: hooks.confirm_promotion({**PAYLOAD, "at": math.nan}))
    assert not verdict.allowed
    assert verdict.detail.startswith("confirm-promotion not called: the payload is not JSON")
    assert hook.seen == []


def test_a_cancelled_call_ends_at_once(hook: HookServer) -> None:
    """A deposed leader's pending confirmation must not outlive it."""
    hooks = Webhooks(WebhookConfig(confirm_promotion=hook.url(), timeout=30))
    hook.default = Answer(200, delay=30)

    async def cancel_it() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hooks.confirm_promotion(PAYLOAD), 0.2)

    _, took = timed(cancel_it)
    assert took < 1.0


def test_https_hooks_are_verified(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certs["server_cert"], certs["server_key"])
    server = HookServer(tls=server_side)
    try:
        trusting = ssl.create_default_context(cafile=str(certs["ca"]))
        config = WebhookConfig(confirm_promotion=server.url(), retries=0)
        verdict = run(lambda: Webhooks(config, ssl_context=trusting).confirm_promotion(PAYLOAD))
        assert verdict.detail == "confirm-promotion answered 200"
        # The system's CAs do not know the test CA: held, and the detail says why.
        verdict = run(lambda: Webhooks(config).confirm_promotion(PAYLOAD))
        assert not verdict.allowed
        assert "TLS certificate not accepted" in verdict.detail
    finally:
        server.close()


# --- what a hook receives ---------------------------------------------------------------------


def test_payload_and_headers_arrive_verbatim(hook: HookServer) -> None:
    config = WebhookConfig(
        confirm_promotion=hook.url("/gate/confirm?team=iam&x=1"),
        pre_step=hook.url("/gate/step"),
        event=hook.url("/feed"),
    )
    hooks = Webhooks(config)

    async def all_three() -> None:
        await hooks.confirm_promotion(PAYLOAD)
        await hooks.pre_step({**PAYLOAD, "type": "pre-step"})
        hooks.event({**PAYLOAD, "type": "event"})
        await hooks.drain(5)

    run(all_three)
    seen = hook.seen
    assert [(s.method, s.path) for s in seen] == [
        ("POST", "/gate/confirm?team=iam&x=1"),
        ("POST", "/gate/step"),
        ("POST", "/feed"),
    ]
    for s, kind in zip(seen, ("confirm-promotion", "pre-step", "event"), strict=True):
        assert s.headers["Content-Type"] == "application/json"
        assert s.headers["User-Agent"] == f"authz-sidecar/{__version__}"
        assert s.headers["X-Authz-Webhook"] == kind
        assert s.headers["Host"] == hook.base.removeprefix("http://")
        assert int(s.headers["Content-Length"]) == len(s.body)
        sent = {**PAYLOAD, "type": kind}
        assert json.loads(s.body) == sent
        assert s.body == json.dumps(sent, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert hooks.events_delivered == 1


# --- events -----------------------------------------------------------------------------------


def test_an_event_to_a_dead_hook_returns_at_once_and_counts_a_failure() -> None:
    hooks = Webhooks(WebhookConfig(event=f"http://127.0.0.1:{closed_port()}/feed", retries=2))

    async def send() -> float:
        started = time.monotonic()
        hooks.event(PAYLOAD)
        took = time.monotonic() - started
        assert hooks.events_failed == 0  # not yet tried
        await hooks.drain(5)
        return took

    assert run(send) < 0.05
    assert hooks.events_failed == 1
    assert hooks.events_delivered == 0
    assert hooks.events_dropped == 0


def test_an_event_to_a_slow_hook_never_blocks_the_caller(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(event=hook.url(), timeout=5))
    hook.default = Answer(200, delay=1.0)

    async def send() -> tuple[float, float]:
        started = time.monotonic()
        hooks.event(PAYLOAD)
        returned = time.monotonic() - started
        # The loop stays free for the plan while the hook takes its time.
        slept_from = time.monotonic()
        await asyncio.sleep(0.2)
        slept = time.monotonic() - slept_from
        await asyncio.to_thread(wait_for, lambda: bool(hook.seen), 5.0, "the event at the hook")
        assert hooks.events_pending == 1
        assert hooks.events_delivered == 0
        await hooks.drain(5)
        return returned, slept

    returned, slept = run(send)
    assert returned < 0.05
    assert slept < 0.5
    assert hooks.events_delivered == 1
    assert hooks.events_pending == 0


def test_the_event_queue_is_bounded_and_drops_the_oldest(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(event=hook.url()), max_pending_events=3)
    hook.script(Answer(200, delay=0.5))  # the first delivery holds the queue up

    async def send() -> None:
        hooks.event({"type": "event", "n": 0})
        # Once the hook has it, 0 is in flight: no longer waiting, so not counted against the bound.
        await asyncio.to_thread(wait_for, lambda: bool(hook.seen), 5.0, "the first event at the hook")
        for n in range(1, 6):
            hooks.event({"type": "event", "n": n})
        assert hooks.events_dropped == 2  # 1 and 2 made room for 4 and 5
        assert hooks.events_pending == 4
        await hooks.drain(5)

    run(send)
    assert [json.loads(s.body)["n"] for s in hook.seen] == [0, 3, 4, 5]
    assert hooks.events_delivered == 4
    assert hooks.events_failed == 0


def test_drain_gives_up_at_its_timeout_and_counts_what_it_abandons(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(event=hook.url(), timeout=30))
    hook.default = Answer(200, delay=30)

    async def send() -> None:
        for n in range(3):
            hooks.event({"type": "event", "n": n})
        await hooks.drain(0.3)

    _, took = timed(send)
    assert took < 1.0
    assert hooks.events_dropped == 3  # the one in flight and the two waiting
    assert hooks.events_pending == 0


def test_an_event_that_is_not_json_is_counted_not_raised(hook: HookServer) -> None:
    hooks = Webhooks(WebhookConfig(event=hook.url()))

    async def send() -> None:
        hooks.event({"type": "event", "weight": math.inf})
        await hooks.drain(5)

    run(send)
    assert hooks.events_failed == 1
    assert hook.seen == []


def test_events_without_a_url_are_ignored() -> None:
    hooks = Webhooks(WebhookConfig())
    hooks.event(PAYLOAD)  # no loop needed: nothing is scheduled
    assert (hooks.events_pending, hooks.events_failed, hooks.events_dropped) == (0, 0, 0)


def test_the_queue_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending_events"):
        Webhooks(WebhookConfig(), max_pending_events=0)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "field", "says"),
    [
        ({"confirm_promotion": "ftp://127.0.0.1/hook"}, "confirm_promotion", "only http:// and https://"),
        ({"pre_step": "127.0.0.1:8080/hook"}, "pre_step", "only http:// and https://"),
        ({"event": "http:///no-host"}, "event", "names no host"),
        ({"event": "http://user:secret@127.0.0.1/"}, "event", "user:password@"),
        ({"event": "http://127.0.0.1/a\r\nX-Injected: 1"}, "event", "printable ASCII"),
        ({"event": "http://127.0.0.1:99999/"}, "event", "not a URL"),
        ({"event": 42}, "event", "expected a URL string"),
        ({"timeout": -1}, "timeout", "above 0"),
        ({"timeout": 0}, "timeout", "above 0"),
        ({"timeout": "5s"}, "timeout", "above 0"),
        ({"timeout": math.inf}, "timeout", "above 0"),
        ({"retries": 11}, "retries", "from 0 to 10"),
        ({"retries": -1}, "retries", "from 0 to 10"),
        ({"retries": True}, "retries", "from 0 to 10"),
        ({"confirm_promotoin": "http://127.0.0.1/"}, "confirm_promotoin", "unknown field"),
    ],
)
def test_from_document_refuses_with_the_field_named(document: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(DocumentError, match=says) as caught:
        WebhookConfig.from_document(document, "plan v7")
    assert caught.value.field == field
    assert caught.value.document == "plan v7"
    assert str(caught.value).startswith(f"plan v7: {field}: ")


def test_a_configuration_built_in_code_meets_the_same_rules() -> None:
    with pytest.raises(DocumentError, match="timeout"):
        WebhookConfig(timeout=-1)
    with pytest.raises(DocumentError, match="confirm_promotion"):
        WebhookConfig(confirm_promotion="ftp://127.0.0.1/")


def test_document_round_trips() -> None:
    config = WebhookConfig(
        confirm_promotion="https://gate.example/confirm?team=iam",
        pre_step="http://127.0.0.1:9000/step",
        event="http://[::1]:9001/feed",
        timeout=2.5,
        retries=4,
    )
    stored = json.loads(json.dumps(config.document()))
    assert WebhookConfig.from_document(stored, "plan") == config
    assert WebhookConfig.from_document(WebhookConfig().document(), "plan") == WebhookConfig()
    assert WebhookConfig.from_document({}, "plan") == WebhookConfig()
    assert WebhookConfig.from_document({"timeout": 3}, "plan").timeout == 3.0
