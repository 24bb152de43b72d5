"""A long build rests while other threads want to run, and runs at full speed when none do."""

from __future__ import annotations

import asyncio
import sys
import threading
from itertools import islice
from pathlib import Path

import pytest

from authz_sidecar.bench import scale
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.model import engine
from authz_sidecar.model.assembly import LastGood
from authz_sidecar.model.pacing import QUICK_SWITCH_INTERVAL, Handover, Pacer, pacing, pause
from authz_sidecar.model.values import Grant, PermissionSet
from authz_sidecar.store.etcd import QUICK_RESPONSE_BYTES, Etcd, EtcdOptions
from authz_sidecar.store.sources.etcd import SnapshotBuilder

from .helpers import RunningSidecar, check, request, sidecar_settings, status_of, unique_prefix, write_policy


class Clocks:
    """A wall clock and a thread CPU clock the test moves by hand, and the sleeps asked for."""

    def __init__(self) -> None:
        self.now = 0.0
        self.used = 0.0
        self.slept: list[float] = []

    def work(self, seconds: float, *, others: float = 0.0) -> None:
        """This thread worked `seconds`, and waited `others` more while other threads ran."""
        self.now += seconds + others
        self.used += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def pacer(self) -> Pacer:
        return Pacer(0.001, 0.002, 0.1, wall=lambda: self.now, cpu=lambda: self.used, sleep=self.sleep)


def test_pause_does_nothing_without_a_pacer_and_calls_the_innermost_one() -> None:
    calls: list[str] = []
    pause()
    with pacing(lambda: calls.append("outer")):
        pause()
        with pacing(lambda: calls.append("inner")):
            pause()
        pause()
    pause()
    assert calls == ["outer", "inner", "outer"]


def test_comparing_a_crowded_shard_pauses_every_thousand_principals_or_so() -> None:
    """Comparing two sets sharing no principal visits every principal of both, a shard at a time.
    At a million grants a shard holds ~2,000 of them, ~1 ms (up to 2.7) without a pause: a build
    could not rest there, and a Check waited for the end (docs/performance.md, "Eighth round").
    Here one shard holds 2 x 2,100 principals: comparing it must bring a pause per 1,024 of them
    beyond the pauses per shard that comparing two empty sets makes."""

    def crowded(prefix: str) -> engine.CompiledSet:
        names = (f"{prefix}{i}" for i in range(10**7))
        chosen = list(islice((n for n in names if hash(n) & engine._MASK == 0), 2_100))
        grants = tuple(Grant(n, ("r",)) for n in chosen)
        return engine.compile_set(PermissionSet(roles={"r": ("svc:view",)}, grants=grants))

    def pauses_predicting(one: engine.CompiledSet, other: engine.CompiledSet) -> int:
        pauses = 0

        def count() -> None:
            nonlocal pauses
            pauses += 1

        with pacing(count):
            predicted = engine.predict(one, other)
        assert sum(map(len, predicted.unscoped)) == sum(map(len, one.unscoped)) + sum(map(len, other.unscoped))
        return pauses

    empty = engine.compile_set(PermissionSet(roles={"r": ("svc:view",)}, grants=()))
    per_shard = pauses_predicting(empty, empty)
    assert pauses_predicting(crowded("a"), crowded("b")) - per_shard >= 2 * 2_100 // 1024


def test_a_pacer_on_another_thread_is_not_this_ones() -> None:
    calls: list[str] = []
    with pacing(lambda: calls.append("here")):
        elsewhere = threading.Thread(target=pause)
        elsewhere.start()
        elsewhere.join()
    assert calls == []


def test_alone_it_never_rests() -> None:
    clocks = Clocks()
    pacer = clocks.pacer()
    for _ in range(1000):
        clocks.work(0.0004)
        pacer()
    assert clocks.slept == [] and pacer.rests == 0


def test_it_rests_after_each_slice_once_others_waited_and_for_a_while_after() -> None:
    clocks = Clocks()
    pacer = clocks.pacer()
    clocks.work(0.0005)
    pacer()  # half a slice: not looked at yet
    clocks.work(0.0005, others=0.0002)
    pacer()  # a slice in which others ran a fifth of the time: rest
    assert clocks.slept == [0.002]
    for _ in range(20):  # others no longer seen, but within `memory` of the last time
        clocks.work(0.0011)
        pacer()
    assert len(clocks.slept) == 21
    for _ in range(200):  # past it: full speed again
        clocks.work(0.0011)
        pacer()
    assert 21 < len(clocks.slept) < 21 + 100
    resting = len(clocks.slept)
    for _ in range(50):
        clocks.work(0.0011)
        pacer()
    assert len(clocks.slept) == resting
    assert pacer.rests == resting


def test_a_little_time_lost_to_others_is_not_a_reason_to_rest() -> None:
    clocks = Clocks()
    pacer = clocks.pacer()
    for _ in range(100):
        clocks.work(0.0011, others=0.00005)  # a twentieth of a millisecond
        pacer()
    assert clocks.slept == []


def test_a_build_beside_a_busy_thread_rests_and_builds_the_same() -> None:
    active_text, _shadow, catalog = scale.documents(20_000)
    kv = scale._kv(catalog, scale._canonical(active_text), {}, {})
    alone = SnapshotBuilder(scale.LAYOUT, service="svc0", region="here", source="test")
    expected, _keys = alone.build(kv, 1, LastGood())
    stop = threading.Event()

    def spin() -> None:  # a thread that always wants the GIL, as a stream of Checks does
        while not stop.is_set():
            sum(range(100))

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        beside = SnapshotBuilder(scale.LAYOUT, service="svc0", region="here", source="test")
        built, _keys = beside.build(kv, 1, LastGood())
    finally:
        stop.set()
        busy.join()
    assert beside.rests > 0
    assert built.snapshot is not None and expected.snapshot is not None
    for principal in ("user-0", "user-1", "user-19999", "nobody"):
        for handle in ("svc0:view", "svc3:edit"):
            for scope in (None, "account:a0"):
                assert built.snapshot.active.decide(principal, handle, scope) is expected.snapshot.active.decide(
                    principal, handle, scope
                )


def test_requests_answered_meanwhile_are_a_reason_to_rest_though_they_took_no_time() -> None:
    """A Check answered by the lane holds the GIL for microseconds, too little to show in the
    clocks; the count of requests answered shows it."""
    clocks = Clocks()
    answered = [0]
    pacer = Pacer(
        0.001,
        0.002,
        0.1,
        wall=lambda: clocks.now,
        cpu=lambda: clocks.used,
        sleep=clocks.sleep,
        demand=lambda: answered[0],
    )
    for _ in range(100):
        clocks.work(0.0011)
        pacer()
    assert clocks.slept == []  # nothing answered: full speed
    answered[0] += 1
    clocks.work(0.0011)
    pacer()
    assert clocks.slept == [0.002]
    for _ in range(20):  # nothing more answered, but within `memory` of the last
        clocks.work(0.0011)
        pacer()
    assert len(clocks.slept) == 21
    for _ in range(200):
        clocks.work(0.0011)
        pacer()
    settled = len(clocks.slept)
    for _ in range(50):
        clocks.work(0.0011)
        pacer()
    assert len(clocks.slept) == settled  # past `memory`: full speed again


def test_the_sidecar_counts_what_its_lanes_and_its_python_path_answer(tmp_path: Path) -> None:
    """What the etcd source's builds are told of demand: every Check, whichever path answered it
    (the first by the Python path, the ones after by the lane)."""
    side = RunningSidecar(sidecar_settings(write_policy(tmp_path / "p"), identity=("jwt_authn",)))
    try:
        side.wait_ready()
        lanes = side.sidecar.handler.lanes
        assert lanes is not None
        before = side.sidecar.demand()
        for _ in range(5):
            assert status_of(check(side, request(sub="alice"))) == 200
        assert side.sidecar.demand() - before >= 5
        assert len(lanes.held[1] or ()) == 1
    finally:
        side.close()


def test_the_ingest_bench_follows_a_written_set_to_its_head() -> None:
    """``bench/ingest.py`` measures the watch while a set's chunks arrive: it must see them all,
    from another process through a real etcd, and stop at the head (not time out)."""
    from authz_sidecar.bench import ingest
    from authz_sidecar.bench.rebuild import policy
    from authz_sidecar.documents import dump_permission_set

    (row,) = ingest.run(20_000, 1)
    assert row["bytes"] == len(dump_permission_set(policy(20_000, "v2", changed=3)))
    assert row["longest_ms"] >= 0 and row["over_1ms"] >= row["over_2ms"]


def test_a_watch_hands_the_gil_over_quickly_while_big_values_arrive(etcd: EtcdCluster) -> None:
    """While etcd's responses carry a big set's chunks, the event loop decodes them one after
    another; the watch holds HANDOVER for that run of big responses, gives it back at the first
    small one (the set's head), and when it ends while holding it."""
    root = f"{unique_prefix()}/"
    before = sys.getswitchinterval()
    seen: list[tuple[str, float]] = []

    async def follow() -> None:
        async with Etcd(EtcdOptions(endpoints=(etcd.endpoints,))) as client:
            revision, _cluster = await client.current(root)
            # One at a time, each once the one before was seen: each comes in a response of its own.
            writes = [
                ("chunk-0", QUICK_RESPONSE_BYTES),
                ("chunk-1", QUICK_RESPONSE_BYTES),
                ("head", 10),
                ("chunk-2", QUICK_RESPONSE_BYTES),
            ]
            key, size = writes.pop(0)
            await client.call(client.kv.put, root + key, b"x" * size)
            async with asyncio.timeout(10):
                async for batch in client.watch(root, revision + 1, 30.0):
                    seen.extend((c.key.removeprefix(root), sys.getswitchinterval()) for c in batch.changes)
                    if not writes:
                        break  # ends holding it: the last response was big
                    key, size = writes.pop(0)
                    await client.call(client.kv.put, root + key, b"x" * size)

    asyncio.run(follow())
    quick = pytest.approx(QUICK_SWITCH_INTERVAL)
    assert seen == [("chunk-0", quick), ("chunk-1", quick), ("head", before), ("chunk-2", quick)]
    assert sys.getswitchinterval() == before


def test_a_build_and_a_watch_share_the_handover() -> None:
    """Whichever ends first, the interval comes back only when both are done, and to what it was."""
    before = sys.getswitchinterval()
    handover = Handover(0.0002)
    handover.enter()
    with handover.held():
        assert sys.getswitchinterval() == pytest.approx(0.0002)
        handover.leave()
        assert sys.getswitchinterval() == pytest.approx(0.0002)
    assert sys.getswitchinterval() == before
