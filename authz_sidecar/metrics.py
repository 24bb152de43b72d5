"""Prometheus metrics (prefix ``authz_``), one registry per sidecar so tests can run several.

Label children are resolved once and cached by their label tuple: ``labels()`` costs a lock and a
dict walk, and a Check should pay one dict lookup per counter instead.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from authz_sidecar.evaluation import Evaluation
from authz_sidecar.reasons import Reason
from authz_sidecar.snapshot import Snapshot
from authz_sidecar.state import SnapshotStore

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    def __init__(self, store: SnapshotStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._decisions = Counter(
            "authz_decisions_total",
            "Check decisions by the set that decided, the answer, how the set was selected and the reason.",
            ["decided_by", "decision", "selection", "reason"],
            registry=r,
        )
        self._mismatches = Counter(
            "authz_mismatches_total",
            "Observed sets that disagreed with the enforced set, by observed version, "
            "whether the change predicted it, and direction (enforced -> observed).",
            ["version", "kind", "direction"],
            registry=r,
        )
        self._observations = Counter(
            "authz_shadow_evaluations_total",
            "Evaluations of each observed set beside the enforced one.",
            ["version"],
            registry=r,
        )
        self.latency = Histogram(
            "authz_check_duration_seconds",
            "Time spent deciding one Check inside the sidecar.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.invalid_documents = Counter(
            "authz_invalid_documents_total",
            "Policy updates refused because a document was invalid; the last good snapshot kept serving.",
            registry=r,
        )
        self._revision = Gauge("authz_snapshot_revision", "Source revision of the serving snapshot.", registry=r)
        self._built = Gauge(
            "authz_snapshot_built_timestamp_seconds", "When the serving snapshot was built.", registry=r
        )
        age = Gauge("authz_snapshot_age_seconds", "Seconds since the serving snapshot was built.", registry=r)
        age.set_function(lambda: time.time() - store.snapshot.built_at if store.snapshot else float("nan"))
        ready = Gauge("authz_ready", "1 once a valid snapshot is serving.", registry=r)
        ready.set_function(lambda: 1.0 if store.snapshot else 0.0)
        self._info = Gauge(
            "authz_snapshot_info",
            "The serving snapshot's active version (value is always 1).",
            ["active_version"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        store.on_install(self.snapshot_installed)
        store.on_reject(lambda _error: self.invalid_documents.inc())

    def snapshot_installed(self, snapshot: Snapshot) -> None:
        self._revision.set(snapshot.revision)
        self._built.set(snapshot.built_at)
        self._info.clear()
        self._info.labels(snapshot.active_version).set(1)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def decision(self, evaluation: Evaluation) -> None:
        allowed = evaluation.allowed
        self._child(
            self._decisions,
            evaluation.decided_by,
            "allow" if allowed else "deny",
            evaluation.selection,
            evaluation.reason,
        ).inc()
        for obs in evaluation.observed:
            self._child(self._observations, obs.version).inc()
            if obs.mismatch:
                self._child(
                    self._mismatches,
                    obs.version,
                    "expected" if obs.expected else "unexpected",
                    "allow_to_deny" if allowed else "deny_to_allow",
                ).inc()

    def refusal(self, reason: Reason) -> None:
        """A deny decided before any set was consulted (no identity, unmapped, malformed...)."""
        self._child(self._decisions, "none", "deny", "none", reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
