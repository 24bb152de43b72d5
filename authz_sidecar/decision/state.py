"""The serving snapshot and what is known about how it got there.

Readers take ``store.snapshot`` (one attribute load, no lock): a new snapshot is installed by
replacing the reference, so a Check sees either the old snapshot or the new one, never a mix.
Sources assemble a snapshot document by document (:mod:`authz_sidecar.model.assembly`) and call
:meth:`SnapshotStore.refusals` with the documents they refused (the list /status shows until
each is fixed; a refusal seen for the first time is counted and logged once), then
:meth:`SnapshotStore.install` with the snapshot, or :meth:`SnapshotStore.unavailable` with why
there is nothing to serve. A source that talks to a remote store
calls :meth:`SnapshotStore.heard` whenever it hears from it, so staleness is visible, and with
``--max-staleness`` the snapshot is withheld (every Check denies, health NOT_SERVING) while the
source has been silent too long, and served again the moment it is heard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from authz_sidecar.model.assembly import Refusal
from authz_sidecar.model.snapshot import Snapshot

log = structlog.get_logger("authz_sidecar.decision.state")

Listener = Callable[[Snapshot], None]


class SnapshotStore:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        # time.time() of the last install: from then on, Checks see that snapshot.
        self.installed_at: float | None = None
        # Why the source has nothing to serve (None once it has).
        self.waiting: str | None = None
        # The documents refused now, each with when it was first refused; the newest refusal last.
        self.refused: dict[Refusal, float] = {}
        self.last_error_at: float | None = None
        # Refusals seen since start (each counted once, however many rebuilds it lasts).
        self.invalid_documents = 0
        self.swaps = 0
        # Served from a copy kept on disk, not (yet) confirmed by the source.
        self.stale = False
        # time.monotonic() of the last word from the source; starts at creation so that a sidecar
        # that never reaches its source counts as silent since it started.
        self.last_contact = time.monotonic()
        self.contacted = False
        # What the source says of its connection: "connected", "connecting" or "unreachable" (etcd),
        # "local" (files, which have no connection to lose).
        self.source_state = "connecting"
        # The snapshot held back while the source is silent past --max-staleness.
        self.withheld: Snapshot | None = None
        # The source's revision whose changes are all applied (installed, or found not to matter):
        # what an application's at_least_revision is compared with. Set after any install it led to.
        self.applied_revision = 0
        self._advanced = threading.Condition()
        self._listeners: list[Listener] = []
        self._rejection_listeners: list[Callable[[Refusal], None]] = []
        self._serving_listeners: list[Callable[[bool], None]] = []

    def on_install(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_reject(self, listener: Callable[[Refusal], None]) -> None:
        """Told of each refusal the first time it is seen."""
        self._rejection_listeners.append(listener)

    @property
    def last_error(self) -> str | None:
        """Why nothing serves, else the newest refusal still standing, else None."""
        if self.waiting is not None:
            return self.waiting
        return str(next(reversed(self.refused))) if self.refused else None

    def on_serving(self, listener: Callable[[bool], None]) -> None:
        """Told False when the snapshot is withheld for staleness and True when it is served again."""
        self._serving_listeners.append(listener)

    def install(self, snapshot: Snapshot, *, stale: bool = False) -> None:
        self.withheld = None
        self.snapshot = snapshot
        self.installed_at = time.time()
        self.stale = stale
        self.swaps += 1
        self.waiting = None
        log.info(
            "snapshot_swapped",
            active_version=snapshot.active_version,
            shadows=[s.version for s in snapshot.shadows],
            revision=snapshot.revision,
            source=snapshot.source,
            stale=stale,
        )
        for listener in self._listeners:
            listener(snapshot)

    def advance(self, revision: int) -> None:
        """The source has applied everything up to `revision` (it can go back after a restore)."""
        with self._advanced:
            self.applied_revision = revision
            self._advanced.notify_all()

    def wait_applied(self, revision: int, timeout: float) -> bool:
        """Block (a worker thread) until `revision` is applied or `timeout` passes."""
        with self._advanced:
            return self._advanced.wait_for(lambda: self.applied_revision >= revision, timeout)

    def heard(self) -> None:
        """The source heard from its store just now (a listing, a change, a progress report)."""
        self.last_contact = time.monotonic()
        self.contacted = True
        if self.withheld is not None:
            self.snapshot, self.withheld = self.withheld, None
            log.warning("snapshot_served_again", active_version=self.snapshot.active_version)
            for listener in self._serving_listeners:
                listener(True)

    def silence(self) -> float:
        """Seconds since the source was last heard from."""
        return time.monotonic() - self.last_contact

    def enforce_max_staleness(self, max_staleness: float) -> None:
        """Withhold the snapshot if the source has been silent for longer than `max_staleness`."""
        if self.snapshot is None or self.silence() <= max_staleness:
            return
        self.withheld, self.snapshot = self.snapshot, None
        log.error("snapshot_withheld", silent_seconds=round(self.silence(), 3), max_staleness=max_staleness)
        for listener in self._serving_listeners:
            listener(False)

    def refusals(self, refusals: Iterable[Refusal]) -> None:
        """The documents the source refuses now: new ones are counted and logged, fixed ones leave."""
        now = time.time()
        current = dict.fromkeys(refusals)
        serving = self.snapshot.active_version if self.snapshot else None
        still = {r.document for r in current}
        for refusal in self.refused.keys() - current.keys():
            if refusal.document not in still:
                log.info("document_accepted", kind=refusal.kind, document=refusal.document)
        kept = {r: since for r, since in self.refused.items() if r in current}
        for refusal in current:
            if refusal in kept:
                continue
            kept[refusal] = now
            self.invalid_documents += 1
            self.last_error_at = now
            log.error(
                "document_invalid",
                kind=refusal.kind,
                document=refusal.document,
                reason=refusal.reason,
                serving_version=serving,
            )
            for listener in self._rejection_listeners:
                listener(refusal)
        self.refused = kept

    def unavailable(self, reason: str) -> None:
        """The source has nothing to serve (no valid active set yet): say why in /status."""
        if reason != self.waiting:
            log.warning(
                "snapshot_unavailable",
                reason=reason,
                serving_version=self.snapshot.active_version if self.snapshot else None,
            )
        self.waiting = reason
        self.last_error_at = time.time()

    def status(self) -> dict[str, Any]:
        snap = self.snapshot if self.snapshot is not None else self.withheld
        now = time.time()
        return {
            "ready": self.snapshot is not None,
            "active_version": snap.active_version if snap else None,
            "shadows": [
                {
                    "version": s.version,
                    "state": s.rollout.state,
                    "weights": dict(s.rollout.weights),
                    "testers": sorted(s.rollout.testers),
                    "weight_here": s.weight_bp / 100,
                    # Principals it decides for here by cohort (none when stale).
                    "cohort_here": len(s.cohort),
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
            "installed_at": self.installed_at,
            "stale": self.stale,
            "withheld_for_staleness": self.withheld is not None,
            "source_silent_seconds": round(self.silence(), 3),
            "source_contacted": self.contacted,
            "source_state": self.source_state,
            "swaps": self.swaps,
            "invalid_documents": self.invalid_documents,
            "refused_documents": [
                {"kind": r.kind, "document": r.document, "reason": r.reason, "since": since}
                for r, since in self.refused.items()
            ],
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }
