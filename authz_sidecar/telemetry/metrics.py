"""Prometheus metrics (prefix ``authz_``), counted on the hot path without locks.

A Check counts into plain dicts keyed by label tuples and a fixed-bucket histogram; a collector turns
them into Prometheus families only when /metrics is scraped. prometheus_client's own Counter takes a
lock per increment, and a decision with three observed shadows would take five of them; here it is
a few dict operations. A decision is one: the labels of every family it counts in (the deciding set,
each observed set, each mismatch) are worked out once per distinct evaluation, which the decider
reuses from its memo, and the decision is counted under that one key (a tally); the families are
summed from the tallies at scrape time. Under the GIL each dict operation is atomic; in the threaded server model
two threads can race on one read-modify-write and lose an increment, which a counter of decisions
can afford and an answer never depends on.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from authz_sidecar.caches import remember
from authz_sidecar.model.assembly import KINDS
from authz_sidecar.model.evaluation import Evaluation
from authz_sidecar.model.events import EventRefusal
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.snapshot import Snapshot

if TYPE_CHECKING:  # the snapshot holder is read, never imported: telemetry sits below the decision path
    from authz_sidecar.decision.state import SnapshotStore

# Requests refused at a front before any decision, by front and reason (a bounded set of labels).
REJECTIONS = {
    "grpc": ("concurrency", "message_too_large"),
    "http": (Reason.HEADERS_TOO_LARGE.value, Reason.BODY_TOO_LARGE.value, Reason.REQUEST_TIMEOUT.value),
}
# How a FilterManifest request ended: its summary sent (complete), refused whole before any block
# (invalid: header, action or a message; unavailable: no snapshot; stale: older than the revision
# asked), cut (too_large: a bound; busy: no worker to spare; cancelled: the client went away or the
# deadline passed; error: a fault in the sidecar).
MANIFEST_RESULTS = (
    "complete",
    "invalid",
    "refused",
    "unavailable",
    "stale",
    "too_large",
    "busy",
    "cancelled",
    "error",
)
# The reasons a manifest's block is answered with (model.reasons.Reason values).
MANIFEST_REASONS = (
    Reason.ALLOWED.value,
    Reason.MISSING_PERMISSION.value,
    Reason.UNKNOWN_PRINCIPAL.value,
    Reason.MALFORMED_BLOCK.value,
)
# Distinct evaluations whose tally key is kept (emptied whole when full, caches.remember).
TALLY_LIMIT = 4096
# The label tuples one decision counts in: authz_decisions, the enforced set's authz_set_decisions,
# and per observed set its version, its authz_set_decisions labels and its mismatch labels (or None).
SetLabels = tuple[str, str, str, str]
Tally = tuple[SetLabels, SetLabels, tuple[tuple[str, SetLabels, tuple[str, str, str] | None], ...]]


def tally_of(evaluation: Evaluation) -> Tally:
    allowed = evaluation.allowed
    decision = "allow" if allowed else "deny"
    key = (evaluation.decided_by, decision, evaluation.selection.value, evaluation.reason.value)
    set_key = (
        "shadow" if evaluation.decided_by == "shadow" else "active",
        evaluation.enforced.meta.version,
        decision,
        "true",
    )
    observed = tuple(
        (
            obs.version,
            ("shadow" if obs.shadow else "active", obs.version, "allow" if obs.allowed else "deny", "false"),
            (
                obs.version,
                "expected" if obs.expected else "unexpected",
                "allow_to_deny" if allowed else "deny_to_allow",
            )
            if obs.mismatch
            else None,
        )
        for obs in evaluation.observed
    )
    return key, set_key, observed


LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class LatencyHistogram:
    """Fixed buckets, counted without a lock."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def add(self, counts: list[int], total: float, count: int) -> None:
        """Observations counted elsewhere in the same buckets (the Check lane's)."""
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.total += total
        self.count += count

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class _HotPathCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        # counts() settles first: the latency histogram read below includes what was held.
        counted, observations, set_decisions, mismatched = m.counts()
        decisions = CounterMetricFamily(
            "authz_decisions",
            "Check decisions by the set that decided, the answer, how the set was selected and the reason.",
            labels=["decided_by", "decision", "selection", "reason"],
        )
        for labels, n in counted.items():
            decisions.add_metric(list(labels), n)
        yield decisions
        observed = CounterMetricFamily(
            "authz_shadow_evaluations", "Evaluations of each observed set beside the enforced one.", labels=["version"]
        )
        for version, n in observations.items():
            observed.add_metric([version], n)
        yield observed
        per_set = CounterMetricFamily(
            "authz_set_decisions",
            "What each live set answered, by kind (active or shadow), version, answer, and whether that "
            "answer was enforced (the deciding set) or only observed.",
            labels=["kind", "version", "decision", "enforced"],
        )
        for set_labels, n in set_decisions.items():
            per_set.add_metric(list(set_labels), n)
        yield per_set
        mismatches = CounterMetricFamily(
            "authz_mismatches",
            "Observed sets that disagreed with the enforced set, by observed version, whether the change "
            "predicted it, and direction (enforced -> observed).",
            labels=["version", "kind", "direction"],
        )
        for mismatch_labels, n in mismatched.items():
            mismatches.add_metric(list(mismatch_labels), n)
        yield mismatches
        latency = HistogramMetricFamily(
            "authz_check_duration_seconds", "Time spent deciding one Check inside the sidecar."
        )
        latency.add_metric([], m.latency.buckets(), m.latency.total)
        yield latency
        spans = CounterMetricFamily(
            "authz_spans_dropped",
            "Trace spans lost before reaching the collector, by reason: queue_full (the exporter's queue "
            "was full), export_failed (the collector was unreachable, refused the batch or timed out).",
            labels=["reason"],
        )
        for reason, n in dict(m.spans_dropped).items():
            spans.add_metric([reason], n)
        yield spans
        decision_log = CounterMetricFamily(
            "authz_decision_log_dropped",
            "Decisions not written to the decision log (--decision-log), by reason: queue_full (the "
            "writer thread's queue was full; the Check did not wait), write_failed (the disk refused).",
            labels=["reason"],
        )
        for reason, n in dict(m.decision_log_dropped).items():
            decision_log.add_metric([reason], n)
        yield decision_log
        blocks = CounterMetricFamily(
            "authz_manifest_blocks",
            "FilterManifest blocks answered, by answer and reason (counted when their request ends).",
            labels=["decision", "reason"],
        )
        for reason, n in dict(m.manifest_blocks).items():
            blocks.add_metric(["allow" if reason == Reason.ALLOWED.value else "deny", reason], n)
        yield blocks
        requests = CounterMetricFamily(
            "authz_manifest_requests", "FilterManifest requests, by how they ended.", labels=["result"]
        )
        for result, n in dict(m.manifest_requests).items():
            requests.add_metric([result], n)
        yield requests


class Metrics:
    def __init__(self, store: SnapshotStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Decisions made with a set, one count per tally (see tally_of); refusals by their labels.
        self.tallies: dict[Tally, int] = {}
        self.refusals: dict[tuple[str, str, str, str], int] = {}
        # id(evaluation) -> (the evaluation, its tally): the evaluation is held so its id stays its own.
        self._tally_of: dict[int, tuple[Evaluation, Tally]] = {}
        self.latency = LatencyHistogram()
        # Counts a front holds until they are read (the Check lane's): see add_pending.
        self._pending: list[Callable[[], None]] = []
        # The tracer counts into it (tracing.DROP_REASONS); zeros while tracing is off.
        self.spans_dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0}
        # The decision log counts into it (decisionlog.DROP_REASONS); zeros while it is off.
        self.decision_log_dropped: dict[str, int] = {"queue_full": 0, "write_failed": 0}
        # FilterManifest, counted once per request when it ends (never per block).
        self.manifest_blocks: dict[str, int] = dict.fromkeys(MANIFEST_REASONS, 0)
        self.manifest_requests: dict[str, int] = dict.fromkeys(MANIFEST_RESULTS, 0)
        r.register(_HotPathCollector(self))
        # Rare events keep prometheus_client's own types.
        self.invalid_documents = Counter(
            "authz_invalid_documents_total",
            "Documents refused, by kind (active, shadow, catalog, pointer), each counted once when first "
            "seen: a shadow is left out, an active set or catalog keeps its last good version.",
            ["kind"],
            registry=r,
        )
        for kind in KINDS:
            self.invalid_documents.labels(kind)
        self._rejected = Counter(
            "authz_rejected",
            "Requests refused at a front before any decision: over a size or concurrency bound, or too slow.",
            ["front", "reason"],
            registry=r,
        )
        for front, reasons in REJECTIONS.items():
            for rejection in reasons:
                self._rejected.labels(front, rejection)
        self.events_signed = Counter("authz_events_signed", "Envelopes signed (SignEvent answered).", registry=r)
        self._events_verified = Counter(
            "authz_events_verified",
            "VerifyEvent answers by reason: allowed, an envelope refused (unknown_key, bad_signature, "
            "expired, replayed) or a permission no longer held (missing_permission, ...).",
            ["reason"],
            registry=r,
        )
        for verified in (Reason.ALLOWED, *EventRefusal, Reason.MISSING_PERMISSION, Reason.UNKNOWN_PRINCIPAL):
            self._events_verified.labels(verified.value)
        self._revision = Gauge("authz_snapshot_revision", "Source revision of the serving snapshot.", registry=r)
        self._built = Gauge(
            "authz_snapshot_built_timestamp_seconds", "When the serving snapshot was built.", registry=r
        )
        age = Gauge("authz_snapshot_age_seconds", "Seconds since the serving snapshot was built.", registry=r)
        age.set_function(lambda: time.time() - store.snapshot.built_at if store.snapshot else float("nan"))
        ready = Gauge("authz_ready", "1 once a valid snapshot is serving.", registry=r)
        ready.set_function(lambda: 1.0 if store.snapshot else 0.0)
        silent = Gauge(
            "authz_source_silent_seconds",
            "Seconds since the policy source last heard from its store (etcd: a listing, a change, a progress report).",
            registry=r,
        )
        silent.set_function(store.silence)
        connected = Gauge(
            "authz_source_connected",
            "1 while the policy source is connected to its store (etcd: a watch stream is open).",
            registry=r,
        )
        connected.set_function(lambda: 1.0 if store.source_state == "connected" else 0.0)
        stale = Gauge("authz_snapshot_stale", "1 while serving the disk copy, not yet confirmed by etcd.", registry=r)
        stale.set_function(lambda: 1.0 if store.stale and store.snapshot else 0.0)
        withheld = Gauge(
            "authz_snapshot_withheld",
            "1 while the snapshot is withheld because the source was silent longer than --max-staleness.",
            registry=r,
        )
        withheld.set_function(lambda: 1.0 if store.withheld is not None else 0.0)
        self._info = Gauge(
            "authz_snapshot_info",
            "The serving snapshot's active version (value is always 1).",
            ["active_version"],
            registry=r,
        )
        store.on_install(self.snapshot_installed)
        store.on_reject(lambda refusal: self.invalid_documents.labels(refusal.kind).inc())

    def snapshot_installed(self, snapshot: Snapshot) -> None:
        # The evaluations kept for their labels hold their compiled sets: let the replaced ones go.
        self._tally_of.clear()
        self._revision.set(snapshot.revision)
        self._built.set(snapshot.built_at)
        self._info.clear()
        self._info.labels(snapshot.active_version).set(1)

    def add_pending(self, settle: Callable[[], None]) -> None:
        """`settle` adds counts held elsewhere into these; it runs before they are read."""
        self._pending.append(settle)

    def settle(self) -> None:
        for settle in self._pending:
            settle()

    def decision(self, evaluation: Evaluation, times: int = 1) -> None:
        found = self._tally_of.get(id(evaluation))
        if found is None or found[0] is not evaluation:
            found = remember(self._tally_of, id(evaluation), (evaluation, tally_of(evaluation)), TALLY_LIMIT)
        tallies = self.tallies
        tally = found[1]
        tallies[tally] = tallies.get(tally, 0) + times

    def counts(
        self,
    ) -> tuple[
        dict[tuple[str, str, str, str], int],
        dict[str, int],
        dict[tuple[str, str, str, str], int],
        dict[tuple[str, str, str], int],
    ]:
        """The counter families summed from the tallies: authz_decisions, authz_shadow_evaluations,
        authz_set_decisions and authz_mismatches, each as {labels: count}."""
        self.settle()
        decisions = dict(self.refusals)
        observations: dict[str, int] = {}
        set_decisions: dict[tuple[str, str, str, str], int] = {}
        mismatches: dict[tuple[str, str, str], int] = {}
        for (key, set_key, observed), n in list(self.tallies.items()):
            decisions[key] = decisions.get(key, 0) + n
            set_decisions[set_key] = set_decisions.get(set_key, 0) + n
            for version, obs_key, mismatch in observed:
                observations[version] = observations.get(version, 0) + n
                set_decisions[obs_key] = set_decisions.get(obs_key, 0) + n
                if mismatch is not None:
                    mismatches[mismatch] = mismatches.get(mismatch, 0) + n
        return decisions, observations, set_decisions, mismatches

    def refusal(self, reason: Reason) -> None:
        """A deny decided before any set was consulted (no identity, unmapped, malformed...)."""
        key = ("none", "deny", "none", reason.value)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def manifest(self, result: str, blocks: Iterable[tuple[str, int]]) -> None:
        """A FilterManifest request ended with `result`, having answered `blocks` (reason, count)."""
        requests = self.manifest_requests
        requests[result] = requests.get(result, 0) + 1
        counted = self.manifest_blocks
        for reason, n in blocks:
            counted[reason] = counted.get(reason, 0) + n

    def rejected(self, front: str, reason: str) -> None:
        """A request refused at a front (see REJECTIONS); any other pair is a bug, so it raises."""
        if reason not in REJECTIONS[front]:
            raise ValueError(f"unknown rejection {front}/{reason}")
        self._rejected.labels(front, reason).inc()

    def event_verified(self, reason: str) -> None:
        self._events_verified.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
