"""The serving snapshot and what is known about how it got there.

Readers take ``store.snapshot`` (one attribute load, no lock): a new snapshot is installed by
replacing the reference, so a Check sees either the old snapshot or the new one, never a mix.
Sources call :meth:`SnapshotStore.install` with a snapshot they built and validated, or
:meth:`SnapshotStore.reject` with why they could not, which keeps the last good snapshot serving
and records the failure for /status, metrics and logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from authz_sidecar.snapshot import Snapshot

log = structlog.get_logger("authz_sidecar.state")

Listener = Callable[[Snapshot], None]


class SnapshotStore:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.invalid_documents = 0
        self.swaps = 0
        self._listeners: list[Listener] = []
        self._rejection_listeners: list[Callable[[str], None]] = []

    def on_install(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_reject(self, listener: Callable[[str], None]) -> None:
        self._rejection_listeners.append(listener)

    def install(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.swaps += 1
        self.last_error = None
        log.info(
            "snapshot_installed",
            active_version=snapshot.active_version,
            shadows=[s.version for s in snapshot.shadows],
            revision=snapshot.revision,
            source=snapshot.source,
        )
        for listener in self._listeners:
            listener(snapshot)

    def reject(self, error: str) -> None:
        self.invalid_documents += 1
        self.last_error = error
        self.last_error_at = time.time()
        serving = self.snapshot.active_version if self.snapshot else None
        log.error("snapshot_rejected", error=error, serving_version=serving)
        for listener in self._rejection_listeners:
            listener(error)

    def status(self) -> dict[str, Any]:
        snap = self.snapshot
        now = time.time()
        return {
            "ready": snap is not None,
            "active_version": snap.active_version if snap else None,
            "shadows": [
                {
                    "version": s.version,
                    "state": s.rollout.state,
                    "weights": dict(s.rollout.weights),
                    "testers": sorted(s.rollout.testers),
                    "weight_here": s.weight_bp / 100,
                    "predicted_impact": len(s.impact),
                }
                for s in snap.shadows
            ]
            if snap
            else [],
            "region": snap.region if snap else None,
            "revision": snap.revision if snap else None,
            "source": snap.source if snap else None,
            "routes": len(snap.routes) if snap else 0,
            "snapshot_age_seconds": round(now - snap.built_at, 3) if snap else None,
            "swaps": self.swaps,
            "invalid_documents": self.invalid_documents,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }
