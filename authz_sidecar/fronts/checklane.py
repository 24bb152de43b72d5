"""The Check lane: whole Checks the decider has answered, answered again from their bytes in C.

Why: called directly, the sidecar spent ~1.4x the CPU per Check of the floor of Python gRPC, and
all of the difference was the handler's Python (parse, the memo's key, the counts, the render),
~17 us in place. A Check asked again on the same snapshot (the same token, peer, method, path,
shadow header and route settings: :data:`authz_sidecar.decision.decider.Settled`) has a known
answer; ``_checklane.Lane`` reads those fields from the request's bytes, finds the answer's bytes,
counts the hit and writes the decision log's line, without running the handler
(docs/performance.md, "The Check lane").

How it stays the decider's answer:
- A lane serves one snapshot: it is used only while that snapshot is the store's, and an answer
  decided on another snapshot is never put in it.
- It is taught only by the Python path (the decider's whole-Check memo), and only answers without
  a mismatch: a mismatch is logged per Check, which only the Python path does.
- It is off where an answer is not a pure function of those fields or where a Check must be seen
  one by one: identity sources beyond jwt_authn and mTLS, tracing. Sampled "decision" events
  (--log-decisions) are drawn per hit in C at the same rate, and logged by the decider.
- It reads bytes only as upb would parse them; anything else goes to the Python path
  (``_checklane.c``).

Counts of its hits (the decision metrics, the shadow reports, the latency histogram) are held in
the lane and handed to the metrics and the reports whenever they are read (:meth:`CheckLanes.settle`),
and when a lane is replaced.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import TYPE_CHECKING

import structlog

from authz_sidecar.decision.decider import MEMO_LIMIT, Decider, Settled
from authz_sidecar.model.snapshot import Snapshot
from authz_sidecar.telemetry.metrics import LatencyHistogram

if TYPE_CHECKING:
    from authz_sidecar.fronts._checklane import Lane
try:
    from authz_sidecar.fronts import _checklane

    _built: ModuleType | None = _checklane
except ImportError:  # installed without a C compiler: every Check is answered in Python
    _built = None

log = structlog.get_logger("authz_sidecar.check")
# What the hot path holds: the snapshot a lane serves (any object until there is one), and the lane.
Held = tuple[object, "Lane | None"]
_NOTHING: Held = (object(), None)


def available() -> bool:
    return _built is not None


def calls() -> int:
    """How many Checks were put to any lane in this process (0 where none is built)."""
    return _built.calls() if _built is not None else 0


class CheckLanes:
    """The lane of the serving snapshot, replaced when the snapshot is; read by the gRPC front."""

    def __init__(self, decider: Decider, latency: LatencyHistogram) -> None:
        if _built is None:
            raise RuntimeError("the Check lane is not built (authz_sidecar/fronts/_checklane.c)")
        self._new_lane: type[Lane] = _built.Lane
        self._decider = decider
        self._latency = latency
        self._log = decider.decision_log.queue_parts() if decider.decision_log is not None else None
        # Read without a lock on the hot path: (snapshot, lane), replaced whole.
        self.held: Held = _NOTHING
        # The lane replaced last: a Check that read it just before it was replaced may still count
        # a hit there, so it is settled once more (the next time anything is read) before it is let
        # go, and with it the evaluations, and so the compiled sets, of its snapshot.
        self._retired: Held = _NOTHING
        self._lock = threading.Lock()
        decider.add_pending(self.settle)
        decider.store.on_install(self._installed)

    def learn(self, raw: bytes, wire: bytes, settled: Settled) -> None:
        """Keep `wire` as the answer to Checks reading as `raw` does, if it may be kept."""
        snapshot, principal, scope, outcome = settled
        evaluation = outcome.evaluation
        if evaluation is None or evaluation.mismatch:
            return
        served, lane = self.held
        if served is not snapshot:
            if snapshot is not self._decider.store.snapshot:
                return  # decided on a snapshot no longer served
            lane = self._replace(snapshot, served)
        if lane is None:
            return
        args = (principal, outcome.permission or "", scope, evaluation)
        if not lane.learn(raw, wire, args) and len(lane) >= MEMO_LIMIT:
            # Full: emptied whole, as every cache here (caches.remember).
            lane = self._replace(snapshot, snapshot)
            if lane is not None:
                lane.learn(raw, wire, args)

    def _replace(self, snapshot: Snapshot, replaced: object) -> Lane | None:
        with self._lock:
            held = self.held
            if held[0] is not replaced:
                return held[1] if held[0] is snapshot else None  # another thread replaced it
            decider = self._decider
            lane = self._new_lane(MEMO_LIMIT, self._latency.bounds, self._log, decider.log_sampled, decider.log_rate)
            self._retire((snapshot, lane))
            return lane

    def _installed(self, _snapshot: Snapshot) -> None:
        """A new snapshot serves: the old one's lane is retired now, not when the next Check learns,
        so that it does not keep the old snapshot's sets alive while no Check comes."""
        with self._lock:
            self._retire(_NOTHING)

    def _retire(self, replacement: Held) -> None:
        self._settle(self._retired)
        self._settle(self.held)
        self._retired, self.held = self.held, replacement

    def settle(self) -> None:
        """Hand the held counts to the metrics and the shadow reports (and let the retired lane go)."""
        with self._lock:
            self._settle(self._retired)
            self._retired = _NOTHING
            self._settle(self.held)

    def _settle(self, held: Held) -> None:
        snapshot, lane = held
        if lane is None or not isinstance(snapshot, Snapshot):
            return
        hits, buckets, total, count = lane.drain()
        tally = self._decider.tally
        for counted, times in hits:
            tally(snapshot, counted, times)
        if count:
            self._latency.add(buckets, total, count)
