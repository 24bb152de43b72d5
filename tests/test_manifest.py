"""FilterManifest (authz_sidecar.v1.Authz) over real gRPC on loopback, in both server models: the
blocks a principal may export, judged by the grants scoped to each block's origin account; refusals
that name their account and reason; a summary that tells a whole answer from a cut one; memory that
stays bounded over 100,000 blocks; and a cache that a new set version empties."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from authz_sidecar.decision import manifest as decision_manifest
from authz_sidecar.decision.manifest import ManifestError, account_scope, handle_for
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.v1 import authz_pb2 as pb
from authz_sidecar.v1 import authz_pb2_grpc

from .helpers import (
    ACTIVE,
    CATALOG,
    RunningSidecar,
    ctl_json,
    etcd_sidecar,
    moved,
    scrape,
    seed,
    sidecar_settings,
    unique_prefix,
    wait_for,
    write_json,
    write_policy,
)

EXPORT_CATALOG: dict[str, Any] = {
    **CATALOG,
    "permissions": [
        *CATALOG["permissions"],
        {"handle": "snapshots:export", "description": "Take a snapshot's blocks out"},
        {"handle": "snapshots:copy", "description": "Copy a snapshot's blocks"},
    ],
}
ROLES = {**ACTIVE["roles"], "exporter": ["snapshots:export"]}
# dana exports from acme and globex only; erin from every account (an unscoped grant).
GRANTS = [
    *ACTIVE["grants"],
    {"principal": "dana", "roles": ["exporter"], "scope": "account:acme"},
    {"principal": "dana", "roles": ["exporter"], "scope": "account:globex"},
    {"principal": "erin", "roles": ["exporter"]},
]
EXPORT_ACTIVE: dict[str, Any] = {"version": "v1", "roles": ROLES, "grants": GRANTS}
# Observed beside v1 (the dark launch): dana would export from initech too.
EXPORT_SHADOW: dict[str, Any] = {
    "version": "v2",
    "parent": "v1",
    "roles": ROLES,
    "grants": [*GRANTS, {"principal": "dana", "roles": ["exporter"], "scope": "account:initech"}],
}
ACCOUNTS = ("acme", "globex", "initech")
METHOD = "/authz_sidecar.v1.Authz/FilterManifest"


def export_policy(directory: Path) -> Path:
    return write_policy(directory, active=EXPORT_ACTIVE, shadows=[EXPORT_SHADOW], catalog=EXPORT_CATALOG)


def open_sidecar(policy: Path, model: str, **overrides: Any) -> RunningSidecar:
    side = RunningSidecar(sidecar_settings(policy, server_model=model, **overrides))
    try:
        side.wait_ready()
    except BaseException:
        side.close()
        raise
    return side


@pytest.fixture(params=["aio", "threads"])
def side(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningSidecar]:
    running = open_sidecar(export_policy(tmp_path / "policy"), request.param, workers=2)
    try:
        yield running
    finally:
        running.close()


def header(principal: str = "dana", action: str = "export", **fields: Any) -> pb.FilterManifestRequest:
    return pb.FilterManifestRequest(header=pb.ManifestHeader(principal=principal, action=action, **fields))


def block(block_id: str, account: str, **fields: Any) -> pb.Block:
    values: dict[str, Any] = {
        "origin_volume": "vol-1",
        "created_at": 1_700_000_000,
        "checksum": "sha256:" + "ab" * 32,
        **fields,
    }
    return pb.Block(block_id=block_id, origin_account=account, **values)


def batch(blocks: Iterable[pb.Block]) -> pb.FilterManifestRequest:
    return pb.FilterManifestRequest(blocks=pb.BlockBatch(blocks=list(blocks)))


def single(b: pb.Block) -> pb.FilterManifestRequest:
    return pb.FilterManifestRequest(block=b)


def three_accounts(count: int, start: int = 0) -> list[pb.Block]:
    return [block(f"blk-{i:07d}", ACCOUNTS[i % 3]) for i in range(start, start + count)]


@dataclass
class Answer:
    allowed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    summary: pb.ManifestSummary | None = None
    messages: int = 0

    def take(self, response: pb.FilterManifestResponse) -> None:
        self.messages += 1
        assert self.summary is None, "nothing comes after the summary"
        kind = response.WhichOneof("item")
        if kind == "allowed":
            self.allowed.append(response.allowed.block_id)
        elif kind == "refused":
            r = response.refused
            self.refused.append((r.block_id, r.origin_account, r.reason))
        elif kind == "answers":
            self.allowed += [b.block_id for b in response.answers.allowed]
            self.refused += [(r.block_id, r.origin_account, r.reason) for r in response.answers.refused]
        else:
            self.summary = response.summary


def stub(side: RunningSidecar) -> authz_pb2_grpc.AuthzStub:
    return authz_pb2_grpc.AuthzStub(side.channel)


def filter_manifest(side: RunningSidecar, messages: Iterable[pb.FilterManifestRequest], timeout: float = 30) -> Answer:
    answer = Answer()
    for response in stub(side).FilterManifest(iter(messages), timeout=timeout):
        answer.take(response)
    return answer


def refused_with(
    side: RunningSidecar, messages: Iterable[pb.FilterManifestRequest], timeout: float = 10
) -> tuple[grpc.StatusCode, str, Answer]:
    """The status a call ends with, and what was answered before it."""
    answer = Answer()
    with pytest.raises(grpc.RpcError) as raised:
        for response in stub(side).FilterManifest(iter(messages), timeout=timeout):
            answer.take(response)
    error: Any = raised.value
    return error.code(), error.details(), answer


# --- the rules, without a server -----------------------------------------------------------------


def test_an_action_is_checked_as_a_handles_action_part() -> None:
    assert handle_for("export") == "snapshots:export"
    assert handle_for("copy_out-2") == "snapshots:copy_out-2"
    for bad in ("", "Export", "export:all", "ex port", "*", "all", "manage", "x" * 64, "export\n"):
        with pytest.raises(ManifestError) as raised:
            handle_for(bad)
        assert raised.value.result == "invalid" and "not an action" in raised.value.message


def test_an_account_makes_a_scope_or_its_blocks_are_malformed() -> None:
    assert account_scope("acme") == "account:acme"
    assert account_scope("acme/eu-1:prod") == "account:acme/eu-1:prod"
    for bad in ("", "ac me", "acme\x00", "acme\n", "*", "all", "a" * 257):
        assert account_scope(bad) is None, bad


# --- answers -------------------------------------------------------------------------------------


def test_exactly_the_blocks_of_the_accounts_the_principal_holds_export_in_come_back(side: RunningSidecar) -> None:
    """Blocks of three accounts, dana holding export in two: those blocks are allowed, in order; each
    of the others is refused naming its account and the reason; the summary counts them all."""
    blocks = three_accounts(3000)
    before = scrape(side)
    with structlog.testing.capture_logs() as logs:
        # Both forms: blocks alone (answered alone), then batches (answered in parts).
        answer = filter_manifest(
            side, [header(), *(single(b) for b in blocks[:9]), batch(blocks[9:2000]), batch(blocks[2000:])]
        )
    after = scrape(side)

    assert answer.allowed == [b.block_id for b in blocks if b.origin_account in ("acme", "globex")]
    assert answer.refused == [
        (b.block_id, "initech", "missing_permission") for b in blocks if b.origin_account == "initech"
    ]
    summary = answer.summary
    assert summary is not None
    assert (summary.allowed, summary.refused, summary.complete) == (2000, 1000, True)
    assert (summary.version, summary.permission, summary.revision) == ("v1", "snapshots:export", 1)
    # 9 single answers, a batch of 1,991 in two parts, one of 1,000 in one, the summary.
    assert answer.messages == 9 + 2 + 1 + 1

    assert moved(before, after, "authz_manifest_requests_total", result="complete") == 1
    assert moved(before, after, "authz_manifest_blocks_total", decision="allow", reason="allowed") == 2000
    assert moved(before, after, "authz_manifest_blocks_total", decision="deny", reason="missing_permission") == 1000
    # One decision per account, not per block: the dark launch counts it like a Check's.
    assert (
        moved(
            before,
            after,
            "authz_decisions_total",
            decided_by="active",
            decision="allow",
            selection="default",
            reason="allowed",
        )
        == 2
    )
    audit = [e for e in logs if e["event"] == "manifest_account"]
    assert sorted((e["account"], e["allowed"], e["refused"], e["reason"]) for e in audit) == [
        ("acme", 1000, 0, "allowed"),
        ("globex", 1000, 0, "allowed"),
        ("initech", 0, 1000, "missing_permission"),
    ]
    assert {(e["principal"], e["permission"], e["version"], e["result"]) for e in audit} == {
        ("dana", "snapshots:export", "v1", "complete")
    }
    [request] = [e for e in logs if e["event"] == "manifest_request"]
    assert (request["allowed"], request["refused"], request["accounts"]) == (2000, 1000, 3)


def test_an_unscoped_grant_covers_every_account_and_an_unknown_principal_none(side: RunningSidecar) -> None:
    blocks = three_accounts(30)
    everything = filter_manifest(side, [header("erin"), batch(blocks)])
    assert len(everything.allowed) == 30 and everything.refused == []
    nothing = filter_manifest(side, [header("nobody"), batch(blocks)])
    assert nothing.allowed == [] and {r[2] for r in nothing.refused} == {"unknown_principal"}
    assert nothing.summary is not None and (nothing.summary.refused, nothing.summary.complete) == (30, True)
    # Another action is another handle: dana holds only export.
    copied = filter_manifest(side, [header(action="copy"), batch(blocks)])
    assert copied.allowed == [] and {r[2] for r in copied.refused} == {"missing_permission"}
    assert copied.summary is not None and copied.summary.permission == "snapshots:copy"


def test_an_empty_manifest_is_a_complete_answer_of_nothing(side: RunningSidecar) -> None:
    answer = filter_manifest(side, [header()])
    assert answer.summary is not None and (answer.summary.allowed, answer.summary.refused) == (0, 0)
    assert answer.summary.complete and answer.messages == 1


def test_mismatches_are_counted_once_per_account_not_per_block(side: RunningSidecar) -> None:
    """The shadow v2 would let dana export from initech (as it declares): 500 initech blocks are one
    mismatch, an expected one."""
    before = scrape(side)
    with structlog.testing.capture_logs() as logs:
        answer = filter_manifest(side, [header(), batch(three_accounts(1500))])
    after = scrape(side)
    assert answer.summary is not None and answer.summary.version == "v1"  # v2 is only observed
    assert moved(before, after, "authz_mismatches_total", version="v2", kind="expected", direction="deny_to_allow") == 1
    assert moved(before, after, "authz_shadow_evaluations_total", version="v2") == 3
    mismatches = [e for e in logs if e["event"] == "mismatch"]
    assert [(e["principal"], e["permission"], e["scope"]) for e in mismatches] == [
        ("dana", "snapshots:export", "account:initech")
    ]
    [initech] = [e for e in logs if e["event"] == "manifest_account" and e["account"] == "initech"]
    assert initech["mismatch"] is True


# --- malformed input -----------------------------------------------------------------------------


def test_a_malformed_block_is_refused_alone(side: RunningSidecar) -> None:
    good = block("good", "acme")
    bad = [
        block("", "acme"),  # no id
        block("no-account", ""),
        block("spaced", "ac me"),
        block("control", "acme\x07"),
        block("magic", "all"),
        block("long-account", "a" * 257),
        block("long-id-" + "x" * 600, "acme"),
        block("long-volume", "acme", origin_volume="v" * 513),
    ]
    before = scrape(side)
    with structlog.testing.capture_logs() as logs:
        answer = filter_manifest(side, [header(), batch([good, *bad]), single(bad[1]), single(good)])
    after = scrape(side)
    assert answer.allowed == ["good", "good"]
    assert [(r[0][:16], r[1][:8], r[2]) for r in answer.refused] == [
        (b.block_id[:16], b.origin_account[:8], "malformed_block") for b in [*bad, bad[1]]
    ]
    assert answer.summary is not None and (answer.summary.allowed, answer.summary.refused) == (2, 9)
    assert answer.summary.complete
    assert moved(before, after, "authz_manifest_blocks_total", decision="deny", reason="malformed_block") == 9
    audit = {e["account"]: e for e in logs if e["event"] == "manifest_account"}
    assert (audit["acme"]["allowed"], audit["acme"]["refused"], audit["acme"]["malformed"]) == (2, 3, 3)
    assert (audit[None]["refused"], audit[None]["malformed"]) == (6, 6)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "without a header"),
        ([single(block("b", "acme"))], "first message must be a ManifestHeader"),
        ([header(principal="")], "names no principal"),
        ([header(principal="dana\n")], "names no principal"),
        ([header(action="Export")], "not an action"),
        ([header(action="all")], "not an action"),
        ([header(action="frobnicate")], "snapshots:frobnicate is not in any registered catalog"),
        ([header(at_least_revision=-1)], "negative"),
        ([header(), header()], "a second ManifestHeader"),
        ([header(), pb.FilterManifestRequest()], "neither a block nor a batch"),
    ],
)
def test_a_request_that_cannot_be_judged_is_refused_whole_and_clearly(
    side: RunningSidecar, messages: list[pb.FilterManifestRequest], needle: str
) -> None:
    before = scrape(side)
    # Blocks follow, except where nothing at all is sent: none of them is answered.
    tail = [batch(three_accounts(3))] if messages else []
    code, details, answer = refused_with(side, [*messages, *tail])
    assert code is grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert answer.summary is None and answer.allowed == []
    wait_for(lambda: moved(before, scrape(side), "authz_manifest_requests_total", result="invalid") == 1)


def test_a_message_that_does_not_parse_is_invalid(side: RunningSidecar) -> None:
    call = side.channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        list(call(iter([header().SerializeToString(), b"\x12\xff\xff\xff"]), timeout=10))
    error: Any = raised.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in error.details()


def test_a_token_on_a_sidecar_that_verifies_none_is_refused(side: RunningSidecar) -> None:
    code, details, _answer = refused_with(side, [header(token="eyJ...")])
    assert code is grpc.StatusCode.UNAUTHENTICATED and "verifies no tokens" in details


def test_a_snapshot_older_than_asked_is_never_used(side: RunningSidecar) -> None:
    # Waited for up to the call's deadline, then refused, saying which revision it has.
    code, details, answer = refused_with(
        side, [header(at_least_revision=1_000_000), batch(three_accounts(3))], timeout=1.0
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "not 1000000" in details
    assert answer.messages == 0
    # At or below the snapshot's revision: answered.
    assert filter_manifest(side, [header(at_least_revision=1), batch(three_accounts(3))]).summary is not None


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_no_snapshot_is_unavailable_never_an_answer(tmp_path: Path, model: str) -> None:
    empty = tmp_path / "policy"
    empty.mkdir()
    running = RunningSidecar(sidecar_settings(empty, server_model=model))
    try:
        code, details, answer = refused_with(running, [header(), batch(three_accounts(3))])
        assert code is grpc.StatusCode.UNAVAILABLE and "no policy snapshot" in details
        assert answer.messages == 0
    finally:
        running.close()


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_a_canary_shadow_decides_the_whole_call(tmp_path: Path, model: str) -> None:
    """Selection is per call: with v2 canaried at 100% in this region, v2 judges every block (the
    summary names it) and v1 is the one observed."""
    policy = write_policy(
        tmp_path / "policy",
        active=EXPORT_ACTIVE,
        shadows=[{**EXPORT_SHADOW, "weights": {"us-east": 100}}],
        catalog=EXPORT_CATALOG,
    )
    running = open_sidecar(policy, model)
    try:
        before = scrape(running)
        answer = filter_manifest(running, [header(), batch(three_accounts(300))])
        after = scrape(running)
        assert answer.summary is not None and answer.summary.version == "v2" and answer.summary.complete
        assert len(answer.allowed) == 300
        key = {"decided_by": "shadow", "decision": "allow", "selection": "canary", "reason": "allowed"}
        assert moved(before, after, "authz_decisions_total", **key) == 3
        assert (
            moved(before, after, "authz_mismatches_total", version="v1", kind="expected", direction="allow_to_deny")
            == 1
        )
    finally:
        running.close()


# --- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_a_message_over_the_size_bound_ends_the_call(tmp_path: Path, model: str) -> None:
    running = open_sidecar(export_policy(tmp_path / "policy"), model, grpc_max_message_bytes=64 * 1024)
    try:
        code, details, answer = refused_with(
            running, [header(), batch(three_accounts(10)), batch(three_accounts(1000, start=10))]
        )
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "--grpc-max-message-bytes" in details
        assert len(answer.allowed) + len(answer.refused) == 10 and answer.summary is None
    finally:
        running.close()


def test_blocks_and_accounts_per_request_are_bounded(side: RunningSidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decision_manifest, "MAX_BLOCKS", 2500)
    code, details, answer = refused_with(
        side, [header(), *(batch(three_accounts(1000, start=i * 1000)) for i in range(3))]
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2,500 blocks" in details
    # The batches within the bound were answered; the one past it was not, and no summary came.
    assert len(answer.allowed) + len(answer.refused) == 2000 and answer.summary is None

    monkeypatch.setattr(decision_manifest, "MAX_ACCOUNTS", 5)
    code, details, answer = refused_with(side, [header(), batch(block(f"b{i}", f"acct-{i}") for i in range(6))])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 5 accounts" in details
    assert answer.summary is None


# --- streaming, memory and cut calls -------------------------------------------------------------


def manifest_of(blocks: int, per_batch: int = 1000, accounts: int = 10) -> Iterator[pb.FilterManifestRequest]:
    """A manifest made as it is sent: one batch exists at a time on the client's side too."""
    yield header("erin")
    for start in range(0, blocks, per_batch):
        yield batch(block(f"blk-{i:08d}", f"acct-{i % accounts}") for i in range(start, min(blocks, start + per_batch)))


def test_100000_blocks_stream_through_in_bounded_memory(side: RunningSidecar) -> None:
    """Answered as they arrive: the Python heap of the sidecar and of this client (tracemalloc sees
    both: they share this process) grows by well under what the manifest weighs (100,000 blocks are
    ~10 MiB on the wire and ~11 MiB held as messages), so neither side ever holds it whole. Measured:
    under 1 MiB. (Memory outside the Python heap, gRPC's and protobuf's own, is measured as the
    sidecar process's RSS by ``python -m authz_sidecar.bench.manifest``.)"""
    counted = {"allowed": 0, "refused": 0}
    summary: pb.ManifestSummary | None = None
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for response in stub(side).FilterManifest(manifest_of(100_000), timeout=120):
            if response.HasField("answers"):
                counted["allowed"] += len(response.answers.allowed)
                counted["refused"] += len(response.answers.refused)
            elif response.HasField("summary"):
                summary = response.summary
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    growth = peak - baseline
    assert counted == {"allowed": 100_000, "refused": 0}
    assert summary is not None and summary.complete and summary.allowed == 100_000
    assert growth < 4 * 1024 * 1024, f"the heap grew by {growth / 2**20:.1f} MiB while 100,000 blocks streamed"


def test_a_cancelled_call_never_gets_a_complete_summary(side: RunningSidecar) -> None:
    """The client cancels with its request stream still open: nothing more comes, the call counts
    as cancelled, and its accounts are audited as such."""
    release = threading.Event()

    def messages() -> Iterator[pb.FilterManifestRequest]:
        yield header()
        yield batch(three_accounts(30))
        release.wait(10)

    before = scrape(side)
    with structlog.testing.capture_logs() as logs:
        call = stub(side).FilterManifest(messages(), timeout=30)
        first = next(call)
        call.cancel()
        release.set()
        rest = Answer()
        with pytest.raises(grpc.RpcError) as raised:
            for response in call:
                rest.take(response)
        wait_for(lambda: moved(before, scrape(side), "authz_manifest_requests_total", result="cancelled") == 1)
    error: Any = raised.value
    assert error.code() is grpc.StatusCode.CANCELLED
    assert first.HasField("answers") and rest.summary is None
    assert moved(before, scrape(side), "authz_manifest_requests_total", result="complete") == 0
    assert {e["result"] for e in logs if e["event"] == "manifest_account"} == {"cancelled"}


def test_a_passed_deadline_never_gets_a_complete_summary(side: RunningSidecar) -> None:
    release = threading.Event()

    def messages() -> Iterator[pb.FilterManifestRequest]:
        yield header()
        yield batch(three_accounts(30))
        release.wait(10)  # the client stalls past its deadline

    before = scrape(side)
    answer = Answer()
    try:
        with pytest.raises(grpc.RpcError) as raised:
            for response in stub(side).FilterManifest(messages(), timeout=1.0):
                answer.take(response)
    finally:
        release.set()
    error: Any = raised.value
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and answer.summary is None
    assert len(answer.allowed) + len(answer.refused) == 30
    wait_for(lambda: moved(before, scrape(side), "authz_manifest_requests_total", result="cancelled") == 1)
    assert moved(before, scrape(side), "authz_manifest_requests_total", result="complete") == 0


def test_the_threads_model_keeps_a_worker_for_checks(tmp_path: Path) -> None:
    """With two workers one stream runs at a time; a second is refused at once instead of taking
    the worker Envoy's Checks need, and the first finishes whole."""
    running = open_sidecar(export_policy(tmp_path / "policy"), "threads", workers=2)
    release = threading.Event()
    try:

        def held() -> Iterator[pb.FilterManifestRequest]:
            yield header()
            yield batch(three_accounts(3))
            release.wait(10)

        first = stub(running).FilterManifest(held(), timeout=30)
        next(first)  # its handler holds a worker now
        code, details, _answer = refused_with(running, [header(), batch(three_accounts(3))])
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "one worker is kept for Check" in details
        release.set()
        rest = Answer()
        for response in first:
            rest.take(response)
        assert rest.summary is not None and rest.summary.complete and rest.summary.allowed == 2
        # The worker is free again.
        assert filter_manifest(running, [header(), batch(three_accounts(3))]).summary is not None
    finally:
        release.set()
        running.close()


# --- a new set version ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_a_new_set_version_gets_the_same_manifest_a_new_answer(etcd: EtcdCluster, tmp_path: Path, model: str) -> None:
    """The answers cached for v1 are not used once v2 is active (no TTL involved): the same
    manifest, sent again after `ctl promote`, is judged by v2."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=EXPORT_ACTIVE, catalogs=[EXPORT_CATALOG])
    running = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side", server_model=model)
    try:
        running.wait_ready()
        manifest = [header(), batch(three_accounts(300))]
        first = filter_manifest(running, manifest)
        assert first.summary is not None and first.summary.version == "v1" and len(first.allowed) == 200
        again = filter_manifest(running, manifest)
        assert again.allowed == first.allowed
        snapshot = running.sidecar.store.snapshot
        assert snapshot is not None
        assert ("manifest", "dana", "snapshots:export", "account:initech") in snapshot.memo  # cached under v1

        proposal = {**EXPORT_SHADOW, "request_id": "CR-7", "reason": "dana exports initech's blocks too"}
        ctl_json(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", proposal))
        promoted = ctl_json(etcd.endpoints, prefix, "promote", "v2", "--request-id", "PR-7", "--reason", "reviewed")
        assert promoted["active"] == "v2"
        wait_for(
            lambda: (
                running.sidecar.store.snapshot is not None and running.sidecar.store.snapshot.active_version == "v2"
            ),
            what="the sidecar to serve v2",
        )
        after = filter_manifest(running, manifest)
        assert after.summary is not None and after.summary.version == "v2" and after.summary.complete
        assert len(after.allowed) == 300 and after.refused == []
        assert after.summary.revision > first.summary.revision
    finally:
        running.close()


def test_a_stream_is_judged_by_the_snapshot_it_started_with(side: RunningSidecar, tmp_path: Path) -> None:
    """A set that changes mid-stream changes nothing for the call under way: its blocks are all
    judged by the version its summary names."""
    release = threading.Event()

    def messages() -> Iterator[pb.FilterManifestRequest]:
        yield header()
        yield batch(three_accounts(30))
        release.wait(10)
        yield batch(three_accounts(30, start=30))

    answer = Answer()
    call = stub(side).FilterManifest(messages(), timeout=30)
    answer.take(next(call))
    write_policy(
        tmp_path / "policy",
        active={"version": "v3", "roles": ROLES, "grants": EXPORT_SHADOW["grants"]},
        catalog=EXPORT_CATALOG,
    )
    wait_for(lambda: side.sidecar.store.snapshot is not None and side.sidecar.store.snapshot.active_version == "v3")
    release.set()
    for response in call:
        answer.take(response)
    assert answer.summary is not None and answer.summary.version == "v1"
    assert len(answer.allowed) == 40 and len(answer.refused) == 20
    fresh = filter_manifest(side, [header(), batch(three_accounts(30))])
    assert fresh.summary is not None and fresh.summary.version == "v3" and len(fresh.allowed) == 30
