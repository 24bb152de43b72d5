"""Swapping snapshots under load: once a swap has completed, no answer comes from an older snapshot.

The decision memo belongs to the snapshot it was computed from. If it were kept beside the snapshot
(two attributes), a thread still holding the old snapshot could store its answer in the new
snapshot's memo, where it would be served until the next swap: a revoked grant would keep allowing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from authz_sidecar.decision.decider import Decider
from authz_sidecar.decision.identity import build_identifier
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import parse_catalog, parse_permission_set
from authz_sidecar.model.snapshot import Snapshot, build_snapshot
from authz_sidecar.telemetry.metrics import Metrics

from .helpers import CATALOG

PRINCIPALS = [f"user-{i}" for i in range(4)]
SWAPS = 400
THREADS = 6


def snapshot_number(n: int) -> Snapshot:
    """Snapshot n: version v<n>; every principal may edit in even snapshots and not in odd ones."""
    roles = ["editor"] if n % 2 == 0 else ["viewer"]
    active = {
        "version": f"v{n}",
        "roles": {"viewer": ["things:view"], "editor": ["things:view", "things:edit"]},
        "grants": [{"principal": p, "roles": roles} for p in PRINCIPALS],
    }
    return build_snapshot(
        parse_permission_set(active, "active"), [], [parse_catalog(CATALOG, "catalog")], service="things"
    )


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows, so interleavings that are rare become common."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_no_answer_from_an_old_snapshot_after_a_swap(fast_switching: None) -> None:
    """Deciding threads race a thread that swaps snapshots; every answer is from a snapshot at least
    as new as the last swap completed before the decision started."""
    store = SnapshotStore()
    decider = Decider(store, build_identifier(["header"], dev_header="x-dev-user"), Metrics(store))
    snapshots = [snapshot_number(n) for n in range(SWAPS + 1)]
    store.install(snapshots[0])
    completed = 0  # the index of the last snapshot whose install() has returned
    done = threading.Event()
    stale: list[tuple[int, int]] = []

    def decide_until_done(offset: int) -> None:
        i = offset
        while not done.is_set():
            principal = PRINCIPALS[i % len(PRINCIPALS)]
            i += 1
            floor = completed
            outcome = decider.decide("PUT", "/things/1", {"x-dev-user": principal})
            assert outcome.evaluation is not None
            answered_by = int(outcome.evaluation.enforced.meta.version[1:])
            if answered_by < floor:
                stale.append((floor, answered_by))

    threads = [threading.Thread(target=decide_until_done, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    try:
        for n in range(1, SWAPS + 1):
            store.install(snapshots[n])
            completed = n
            # Let the deciders see this snapshot before the next swap.
            for _ in range(3):
                outcome = decider.decide("PUT", "/things/1", {"x-dev-user": PRINCIPALS[n % len(PRINCIPALS)]})
                assert outcome.evaluation is not None
                answered_by = int(outcome.evaluation.enforced.meta.version[1:])
                if answered_by < n:
                    stale.append((n, answered_by))
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert not stale, f"{len(stale)} answers from an older snapshot, e.g. (swap completed, answered by): {stale[:5]}"
