"""The Check lane (fronts/_checklane.c, fronts/checklane.py): a whole Check asked again is answered
from its bytes, with the answer, the counts and the log lines the Python path gives.

Held to two references: upb's parse of the view (the lane reads a field only as upb would, and
declines anything else), and the handler without the lane (the same bytes out for any request,
and the same counts)."""

from __future__ import annotations

import collections
import json
import random
import struct
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar._proto.view import check_view_pb2 as view
from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.decider import MEMO_LIMIT, Decider
from authz_sidecar.decision.identity import JWT_AUTHN_NAMESPACE, build_identifier
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.fronts import _checklane
from authz_sidecar.fronts.extauthz import CheckHandler
from authz_sidecar.model.snapshot import Snapshot, build_snapshot
from authz_sidecar.telemetry.decisionlog import DecisionLog
from authz_sidecar.telemetry.metrics import LATENCY_BUCKETS, Metrics
from authz_sidecar.telemetry.reports import ShadowReports

from . import helpers
from .helpers import ACTIVE, CATALOG, shadow

SHADOW = "x-authz-shadow-version"


def snapshot(*shadows: dict[str, Any], active: dict[str, Any] = ACTIVE) -> Snapshot:
    return build_snapshot(
        parse_permission_set(active, "active"),
        [parse_shadow(s, s["version"]) for s in shadows],
        [parse_catalog(CATALOG, "catalog")],
        service="things",
        region="us-east",
    )


def request(
    sub: str | None = "alice",
    *,
    method: str = "GET",
    path: str = "/things/1",
    headers: dict[str, str] | None = None,
    extensions: dict[str, str] | None = None,
    peer: str = "",
    request_id: str = "req-1",
) -> bytes:
    """helpers.request's CheckRequest, with what Envoy adds that no decision reads: the request id
    (also as a header), the host, the time and the peer's address."""
    req = helpers.request(path, method, {"x-request-id": request_id, **(headers or {})}, sub, extensions, peer)
    http = req.attributes.request.http
    http.id, http.host = request_id, "things"
    req.attributes.source.address.socket_address.address = "127.0.0.1"
    req.attributes.request.time.seconds = 1_700_000_000
    return req.SerializeToString()


class Side:
    """A handler over `store` with its own metrics, reports and (optionally) decision log."""

    def __init__(
        self,
        store: SnapshotStore,
        *,
        lane: bool,
        log: DecisionLog | None = None,
        log_rate: float = 0.0,
        sources: tuple[str, ...] = ("jwt_authn", "mtls"),
    ) -> None:
        self.metrics = Metrics(store)
        self.reports = ShadowReports()
        identifier = build_identifier(list(sources), jwt_authn_payload_key="jwt_payload")
        self.decider = Decider(
            store, identifier, self.metrics, reports=self.reports, decision_log=log, log_decisions=log_rate
        )
        self.handler = CheckHandler(Answering(self.decider, self.metrics), lane=lane)

    def check(self, raw: bytes) -> bytes:
        return self.handler.check_wire(raw)

    def kept(self) -> int:
        lanes = self.handler.lanes
        assert lanes is not None
        return len(lanes.held[1] or ())

    def counts(self) -> tuple[Any, ...]:
        decisions, observations, per_set, mismatches = self.metrics.counts()
        self.reports.settle()
        reports = {
            version: {**tally.document(), "denied_principals": sorted(p for p, _t in tally.denied.items())}
            for version, tally in self.reports.tallies.items()
        }
        return decisions, observations, per_set, mismatches, self.metrics.latency.count, reports


@pytest.fixture
def store() -> SnapshotStore:
    held = SnapshotStore()
    held.install(snapshot(shadow("v2", testers=["qa-bot"]), shadow("v3", grants=[])))
    return held


def status(raw: bytes) -> int:
    code: int = pb.CheckResponse.FromString(raw).status.code
    return code


# --- it is there, and it answers ---------------------------------------------------------------


def test_the_lane_is_built() -> None:
    """pyproject.toml builds it optionally, so that a machine without a C compiler still installs
    the sidecar; this is where a build that failed is seen."""
    assert hasattr(_checklane, "Lane") and hasattr(_checklane, "fields")


def test_a_check_asked_again_is_answered_by_the_lane(store: SnapshotStore) -> None:
    laned, plain = Side(store, lane=True), Side(store, lane=False)
    asked = [request("bob"), request("alice", method="PUT"), request("bob", method="PUT"), request("nobody")]
    for raw in asked * 3:
        assert laned.check(raw) == plain.check(raw)
    # bob is a mismatch in v3 (which grants nothing): never kept; alice PUT is allowed everywhere
    # but v3 too. What is kept: nobody (denied by every set).
    assert laned.kept() == 1
    assert laned.counts() == plain.counts()
    decisions = laned.counts()[0]
    assert sum(decisions.values()) == 12


def test_request_ids_and_other_fields_outside_the_key_share_an_answer(store: SnapshotStore) -> None:
    """Envoy's request id, time, addresses and other headers differ per request; the answer does not."""
    side = Side(store, lane=True)
    side.check(request("nobody", request_id="a"))
    assert side.kept() == 1
    lanes = side.handler.lanes
    assert lanes is not None
    lane = lanes.held[1]
    assert lane is not None
    before = lane.drain()[3]
    for i in range(20):
        side.check(request("nobody", request_id=f"r{i}", headers={"user-agent": f"ua{i}"}))
    assert lane.drain()[3] == before + 20


# --- the same answers and counts as the Python path ---------------------------------------------

_texts = st.text(max_size=12)
_requests = st.builds(
    lambda sub, method, path, shadow_header, ext, peer, rid: request(
        sub,
        method=method,
        path=path,
        headers={} if shadow_header is None else {SHADOW: shadow_header},
        extensions=ext,
        peer=peer,
        request_id=rid,
    ),
    st.one_of(st.none(), st.sampled_from(["alice", "bob", "carol", "qa-bot", "zed"]), _texts),
    st.sampled_from(["GET", "PUT", "DELETE", ""]),
    st.sampled_from(["/things/1", "/things", "/accounts/acme/things", "/accounts/x/things", "/nope", "/a/../things"]),
    st.one_of(st.none(), st.sampled_from(["v2", "v3", "v9", ""]), _texts),
    st.dictionaries(
        st.sampled_from(["permission", "scope", "other"]),
        st.sampled_from(["things:view", "things:edit", "account:acme", "", "bad handle!"]),
        max_size=3,
    ),
    st.sampled_from(["", "spiffe://cluster/ns/x/sa/y"]),
    _texts,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_requests, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_any_requests_get_the_python_paths_answers_and_counts(
    store: SnapshotStore, asked: list[bytes], rng: random.Random
) -> None:
    """Differential: the same requests, each asked one to three times in a shuffled order, through
    the handler with and without the lane: the same bytes back, and the same decision metrics,
    latency count and shadow reports."""
    laned, plain = Side(store, lane=True), Side(store, lane=False)
    order = [raw for raw in asked for _ in range(rng.randint(1, 3))]
    rng.shuffle(order)
    for raw in order:
        assert laned.check(raw) == plain.check(raw)
    assert laned.counts() == plain.counts()


@pytest.mark.parametrize("sources", [("jwt_authn", "header"), ("jwt",), ("header",)])
def test_the_lane_is_off_where_the_principal_can_come_from_elsewhere(
    store: SnapshotStore, sources: tuple[str, ...]
) -> None:
    """A header or a token the sidecar verifies could name another principal for the same bytes
    the lane reads: the lane stays off."""
    metrics = Metrics(store)
    from authz_sidecar.decision.tokens import TokenVerifier
    from authz_sidecar.local.tokens import DemoIssuer

    identifier = build_identifier(
        list(sources), dev_header="x-user", verifier=TokenVerifier(DemoIssuer().jwks()), jwt_authn_payload_key="x"
    )
    handler = CheckHandler(Answering(Decider(store, identifier, metrics), metrics))
    assert handler.lanes is None


def test_a_traced_sidecar_answers_in_python(store: SnapshotStore) -> None:
    """Each traced Check is a span of its own, which only the Python path makes."""
    from authz_sidecar.telemetry.tracing import CheckTracer

    metrics = Metrics(store)
    decider = Decider(store, build_identifier(["jwt_authn"]), metrics)
    tracer = CheckTracer.__new__(CheckTracer)  # never called: the handler only asks whether there is one
    assert CheckHandler(Answering(decider, metrics, tracer)).lanes is None


# --- snapshots ------------------------------------------------------------------------------------


def test_a_new_snapshot_is_never_answered_from_the_old_ones_lane(store: SnapshotStore) -> None:
    side = Side(store, lane=True)
    raw = request("dave")
    assert status(side.check(raw)) != 0 and status(side.check(raw)) != 0
    assert side.kept() == 1
    granted = {**ACTIVE, "grants": [*ACTIVE["grants"], {"principal": "dave", "roles": ["viewer"]}]}
    store.install(snapshot(active=granted))
    assert status(side.check(raw)) == 0
    assert status(side.check(raw)) == 0
    # Every Check counted, those the old lane answered included.
    assert sum(side.counts()[0].values()) == 4


def test_an_answer_decided_on_a_replaced_snapshot_is_not_kept(store: SnapshotStore) -> None:
    side = Side(store, lane=True)
    lanes = side.handler.lanes
    assert lanes is not None
    old = store.snapshot
    assert old is not None
    store.install(snapshot())
    outcome = side.decider.decide_for("nobody", "things:view")
    lanes.learn(request("nobody"), b"stale answer", (old, "nobody", None, outcome))
    assert lanes.held[1] is None or len(lanes.held[1]) == 0
    assert side.check(request("nobody")) != b"stale answer"


def test_a_full_lane_starts_again(store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("authz_sidecar.fronts.checklane.MEMO_LIMIT", 3)
    side = Side(store, lane=True)
    for i in range(7):
        raw = request(f"stranger-{i}")
        side.check(raw)
        assert side.check(raw) == Side(store, lane=False).check(raw)
        assert 1 <= side.kept() <= 3
    assert sum(side.counts()[0].values()) == 14
    assert MEMO_LIMIT > 3  # the real bound is the memo's


# --- the decision log and its sampled events --------------------------------------------------------


def test_every_answer_the_lane_gives_is_in_the_decision_log(store: SnapshotStore, tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "d.log", interval=0.01)
    log.start()
    try:
        side = Side(store, lane=True, log=log)
        for _ in range(50):
            side.check(request("nobody"))
        assert side.kept() == 1
    finally:
        log.stop()
    lines = [json.loads(line) for line in (tmp_path / "d.log").read_text().splitlines()]
    assert len(lines) == 50
    assert {(line["principal"], line["handle"], line["answer"], line["version"]) for line in lines} == {
        ("nobody", "things:view", "deny", "v1")
    }
    times = [line["time"] for line in lines]
    assert times == sorted(times) and time.time() - 60 < times[0] <= time.time()


def test_a_full_decision_log_queue_counts_the_lanes_drops(store: SnapshotStore, tmp_path: Path) -> None:
    """The writer is not started: the queue of 5 fills, and the lane counts the rest as dropped."""
    log = DecisionLog(tmp_path / "d.log", max_queue=5)
    side = Side(store, lane=True, log=log)
    for _ in range(30):
        side.check(request("nobody"))
    assert log.queued == 5
    assert log.drops["queue_full"] == 25


@pytest.fixture
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def test_sampled_decisions_are_drawn_per_check_with_their_request_id(
    store: SnapshotStore, events: list[MutableMapping[str, Any]]
) -> None:
    side = Side(store, lane=True, log_rate=1.0)
    for i in range(10):
        side.check(request("nobody", request_id=f"id-{i}"))
    assert side.kept() == 1
    logged = [e for e in events if e["event"] == "decision"]
    assert [e["request_id"] for e in logged] == [f"id-{i}" for i in range(10)]
    assert {(e["principal"], e["permission"], e["decision"], e["reason"]) for e in logged} == {
        ("nobody", "things:view", "deny", "unknown_principal")
    }


def test_about_the_share_asked_for_is_sampled(store: SnapshotStore, events: list[MutableMapping[str, Any]]) -> None:
    side = Side(store, lane=True, log_rate=0.25)
    for _ in range(4000):
        side.check(request("nobody"))
    logged = sum(1 for e in events if e["event"] == "decision")
    assert 800 < logged < 1200


def test_mismatches_are_logged_for_every_check(store: SnapshotStore, events: list[MutableMapping[str, Any]]) -> None:
    """bob is allowed GET by v1 and denied by v3: never kept, every Check logs its mismatch."""
    side = Side(store, lane=True)
    for _ in range(5):
        side.check(request("bob"))
    assert side.kept() == 0
    assert sum(1 for e in events if e["event"] == "mismatch") == 5


# --- faults ---------------------------------------------------------------------------------------


def test_a_fault_in_the_lane_is_answered_by_the_python_path(
    store: SnapshotStore, tmp_path: Path, events: list[MutableMapping[str, Any]]
) -> None:
    """A queue whose length cannot be read makes the lane's answer fail: the Check is logged as a
    lane fault and answered by the Python path, which fails closed on the same fault."""
    log = DecisionLog(tmp_path / "d.log")
    side = Side(store, lane=True, log=log)
    raw = request("nobody")
    side.check(raw)
    assert side.kept() == 1

    class Broken(collections.deque[Any]):
        def __len__(self) -> int:
            raise RuntimeError("broken queue")

    lanes = side.handler.lanes
    assert lanes is not None
    snap, _lane = lanes.held
    lanes.held = (snap, _checklane.Lane(4, LATENCY_BUCKETS, (Broken(), 10, 5, lambda: None, {})))
    lane = lanes.held[1]
    assert lane is not None
    evaluation = side.decider.decide_for("nobody", "things:view").evaluation
    assert evaluation is not None
    assert lane.learn(raw, b"kept", ("nobody", "things:view", None, evaluation))
    answer = side.check(raw)
    assert answer != b"kept"
    assert any(e["event"] == "check_lane_failed" for e in events)


def test_a_fault_while_learning_still_answers(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, events: list[MutableMapping[str, Any]]
) -> None:
    """Keeping an answer is after the answer: a fault there is logged, and the Check is answered."""
    side = Side(store, lane=True)
    lanes = side.handler.lanes
    assert lanes is not None

    def broken(*_args: object) -> None:
        raise MemoryError("no room for the entry")

    monkeypatch.setattr(lanes, "learn", broken)
    raw = request("nobody")
    assert side.check(raw) == Side(store, lane=False).check(raw)
    assert any(e["event"] == "check_lane_failed" for e in events)


def test_lane_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        _checklane.Lane(0, ())
    with pytest.raises(ValueError, match="rate"):
        _checklane.Lane(1, (), None, print, 2.0)
    with pytest.raises(TypeError):
        _checklane.Lane(1, (), (collections.deque(), 1, 1, "not callable", {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bounds"):
        _checklane.Lane(1, [0.1] * 40)
    lane = _checklane.Lane(1, ())
    with pytest.raises(TypeError):
        lane.answer("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lane.learn(b"", b"", ("too", "short"))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="once"):
        lane.__init__(1, ())  # type: ignore[misc]


# --- reading bytes as upb does --------------------------------------------------------------------


def upb_fields(raw: bytes) -> tuple[bytes | None, ...] | None:
    """What the Python path keys a whole Check by, read with upb; None where it refuses the bytes."""
    try:
        parsed = view.CheckRequestView.FromString(raw)
    except DecodeError:
        return None
    attrs = parsed.attributes
    if not attrs.request.HasField("http"):
        return None
    http = attrs.request.http

    def text(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    return (
        attrs.metadata_context.filter_metadata.get(JWT_AUTHN_NAMESPACE),
        attrs.source.principal.encode(),
        http.method.encode(),
        http.path.encode(),
        text(http.headers.get(SHADOW)),
        text(attrs.context_extensions.get("permission")),
        text(attrs.context_extensions.get("scope")),
    )


def agrees(raw: bytes) -> tuple[bytes | None, ...] | None:
    """The lane reads `raw` as upb does, or declines it."""
    read = _checklane.fields(raw)
    if read is not None:
        assert read == upb_fields(raw), raw
    return read


def tag(field: int, wire: int) -> bytes:
    value, out = (field << 3) | wire, bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def message(field: int, body: bytes) -> bytes:
    return tag(field, 2) + _varint(len(body)) + body


def check_of(attributes: bytes) -> bytes:
    return message(1, attributes)


HTTP = message(2, b"GET") + message(4, b"/things/1")
REQUEST = message(4, message(2, HTTP))


def test_what_envoy_sends_is_read() -> None:
    raw = request("alice", headers={SHADOW: "v2"}, extensions={"permission": "things:view", "scope": ""}, peer="p")
    assert agrees(raw) is not None
    read = _checklane.fields(raw)
    assert read is not None
    assert read[1:] == (b"p", b"GET", b"/things/1", b"v2", b"things:view", b"")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("empty", b""),
        ("no http", check_of(message(4, b""))),
        ("attributes twice (upb merges)", check_of(REQUEST) + check_of(REQUEST)),
        ("http twice", check_of(message(4, message(2, HTTP) + message(2, HTTP)))),
        ("a group", check_of(REQUEST + tag(7, 3) + tag(7, 4))),
        ("wire type 6", check_of(REQUEST) + tag(9, 6)),
        ("field number 0", check_of(REQUEST) + b"\x02\x00"),
        ("a known field as a varint", check_of(REQUEST + tag(1, 0) + b"\x01")),
        ("method as a varint", check_of(message(4, message(2, HTTP + tag(2, 0) + b"\x01")))),
        ("truncated", check_of(REQUEST)[:-1]),
        ("a length past the end", check_of(REQUEST) + tag(9, 2) + b"\x7f"),
        ("an overlong tag", check_of(REQUEST) + b"\x8a\x00\x00"),
        ("invalid UTF-8 in the path", check_of(message(4, message(2, tag(4, 2) + b"\x02\xc3\x28")))),
        ("a surrogate in a header", check_of(message(4, message(2, HTTP + message(3, message(2, b"\xed\xa0\x80")))))),
        ("invalid UTF-8 in the request id", check_of(message(4, message(2, HTTP + tag(1, 2) + b"\x01\xff")))),
        ("invalid UTF-8 in a metadata key", check_of(REQUEST + message(11, message(1, message(1, b"\xff"))))),
        ("a varint of 11 bytes", check_of(REQUEST) + tag(9, 0) + b"\xff" * 10 + b"\x01"),
    ],
)
def test_what_upb_would_not_read_as_the_lane_does_is_declined(name: str, raw: bytes) -> None:
    assert _checklane.fields(raw) is None, name
    upb_fields(raw)  # whatever upb makes of it, the Python path decides it


def test_maps_take_the_last_entry_and_keep_missing_keys_and_values_empty() -> None:
    http = HTTP + message(3, message(1, SHADOW.encode()) + message(2, b"v2"))
    http += message(3, message(1, SHADOW.encode()) + message(2, b"v3"))
    attributes = message(4, message(2, http))
    attributes += message(10, message(1, b"scope"))  # a scope with no value: ""
    attributes += message(10, message(2, b"orphan"))  # an entry with no key: ""
    attributes += message(11, message(1, message(1, JWT_AUTHN_NAMESPACE.encode())))
    read = agrees(check_of(attributes))
    assert read is not None
    assert read[0] == b"" and read[4] == b"v3" and read[5] is None and read[6] == b""


@settings(max_examples=400, deadline=None)
@given(_requests, st.data())
def test_damaged_bytes_are_read_as_upb_reads_them_or_declined(raw: bytes, data: st.DataObject) -> None:
    """Truncations, changed bytes, inserted bytes, repeated and unknown fields: whatever the lane
    reads, upb reads the same; every undamaged request is read."""
    assert agrees(raw) is not None
    damage = data.draw(st.sampled_from(["cut", "flip", "insert", "twice", "unknown", "nested unknown"]))
    at = data.draw(st.integers(0, len(raw)))
    if damage == "cut":
        raw = raw[:at]
    elif damage == "flip":
        raw = raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :]
    elif damage == "insert":
        raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=6)) + raw[at:]
    elif damage == "twice":
        raw = raw + raw
    else:
        # Nested in the attributes, past the fields the view knows there (1, 4, 10, 11).
        field = data.draw(st.integers(1 if damage == "unknown" else 12, 2**29 - 1))
        wire = data.draw(st.sampled_from([0, 1, 2, 5]))
        body = {0: _varint(data.draw(st.integers(0, 2**64 - 1))), 1: b"\x00" * 8, 5: b"\x00" * 4}.get(wire)
        unknown = tag(field, wire) + (body if body is not None else _varint(3) + b"abc")
        if damage == "unknown":
            raw = raw + unknown
        else:
            attributes = pb.CheckRequest.FromString(raw).attributes.SerializeToString()
            raw = check_of(attributes + unknown)
            assert agrees(raw) is not None  # an unknown field is skipped, as upb skips it
    agrees(raw)


def test_random_bytes_are_declined_or_read_as_upb_reads_them() -> None:
    rng = random.Random(20261201)  # noqa: S311 - damage, not a secret
    base = request("alice", headers={SHADOW: "v2"}, extensions={"permission": "things:view"})
    read = 0
    for _ in range(20_000):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        read += agrees(bytes(raw)) is not None
    assert read > 0  # damage that misses the fields the lane reads is still read


def test_a_framed_message_is_not_a_check_request() -> None:
    raw = request("alice")
    framed = b"\x00" + struct.pack(">I", len(raw)) + raw
    agrees(framed)


def test_a_replaced_snapshot_is_not_kept_alive_by_its_lane(store: SnapshotStore) -> None:
    """The lane holds evaluations, and through them the compiled sets of its snapshot: once another
    snapshot serves and the counts were read, nothing of the old one is held here."""
    side = Side(store, lane=True)
    for _ in range(3):
        side.check(request("nobody"))
    assert side.kept() == 1
    lanes = side.handler.lanes
    assert lanes is not None
    lane = lanes.held[1]
    assert sys.getrefcount(lane) > 2
    store.install(snapshot())
    side.counts()  # what a scrape does: settles, and lets the retired lane go
    assert sys.getrefcount(lane) == 2  # this test's name for it, and getrefcount's argument
    assert sum(side.counts()[0].values()) == 3
