"""Shadow reports: how much traffic has exercised each live shadow, per sidecar, published to etcd.

Each sidecar tallies, per live shadow: how many Checks evaluated it (observed beside the enforced
set, or deciding itself), its mismatches by kind and direction, the handles requests asked for,
which of the shadow's predicted-impact entries (principal, handle, scope) traffic actually hit, and
the (principal, handle) pairs behind unexpected mismatches, so that ``ctl report`` can say who and
what a change affects that nobody predicted.
Every few seconds it writes the tally under ``<prefix>/reports/<version>/<sidecar id>``, attached
to a lease that outlives a few publications, so a sidecar that dies takes its report with it.
``authz-sidecar ctl report VERSION`` sums the reports of every sidecar and computes coverage: the
share of the predicted impact that traffic exercised, and the handles it never did.

The tally is counted on the hot path with dict and set operations (no lock: a rare lost increment
under the threaded server is acceptable for a report; an answer never depends on it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.etcd.client import Etcd
from authz_sidecar.etcd.layout import Layout
from authz_sidecar.evaluation import Evaluation
from authz_sidecar.snapshot import Snapshot

log = structlog.get_logger("authz_sidecar.reports")
# Impact entries listed per report at most: coverage of a huge change is reported as a count.
MAX_EXERCISED = 10_000
# Distinct (principal, handle) pairs behind unexpected mismatches kept per shadow: a change that
# surprises everyone costs a bounded dict; mismatches of pairs past it are counted, not itemised.
MAX_UNEXPECTED_PAIRS = 1_000
# Of those, the most frequent listed in a published report (the rest are counted as unlisted).
PUBLISHED_UNEXPECTED_PAIRS = 100


@dataclass
class Tally:
    evaluations: int = 0
    mismatches: dict[str, int] = field(default_factory=dict)  # "expected/allow_to_deny" -> n
    handles: set[str] = field(default_factory=set)
    exercised: set[tuple[str, str, str | None]] = field(default_factory=set)
    unexpected: dict[tuple[str, str], int] = field(default_factory=dict)  # (principal, handle) -> n
    unexpected_unlisted: int = 0  # unexpected mismatches of pairs past MAX_UNEXPECTED_PAIRS

    def count_unexpected(self, principal: str, handle: str) -> None:
        pair = (principal, handle)
        n = self.unexpected.get(pair)
        if n is not None:
            self.unexpected[pair] = n + 1
        elif len(self.unexpected) < MAX_UNEXPECTED_PAIRS:
            self.unexpected[pair] = 1
        else:
            self.unexpected_unlisted += 1

    def document(self) -> dict[str, Any]:
        pairs = sorted(self.unexpected.items(), key=lambda item: (-item[1], item[0]))
        listed = pairs[:PUBLISHED_UNEXPECTED_PAIRS]
        return {
            "evaluations": self.evaluations,
            "mismatches": dict(sorted(self.mismatches.items())),
            "handles": sorted(self.handles),
            "exercised": sorted([list(e) for e in self.exercised], key=str)[:MAX_EXERCISED],
            "unexpected": [[p, h, n] for (p, h), n in listed],
            "unexpected_unlisted": self.unexpected_unlisted + sum(n for _pair, n in pairs[PUBLISHED_UNEXPECTED_PAIRS:]),
        }


class ShadowReports:
    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = {}

    def observe(
        self, snapshot: Snapshot, evaluation: Evaluation, principal: str, handle: str, scope: str | None
    ) -> None:
        """Count one Check against every live shadow it evaluated."""
        tallies = self.tallies
        versions = [o for o in evaluation.observed if o.shadow]
        enforced = evaluation.enforced.meta.version if evaluation.decided_by == "shadow" else None
        for version in [o.version for o in versions] + ([enforced] if enforced else []):
            tally = tallies.get(version)
            if tally is None:
                tally = tallies[version] = Tally()
            tally.evaluations += 1
            tally.handles.add(handle)
            view = snapshot.by_version.get(version)
            if view is not None:
                for entry in ((principal, handle, scope), (principal, handle, None)):
                    if entry in view.impact:
                        tally.exercised.add(entry)
        allowed = evaluation.allowed
        for observed in versions:
            if observed.mismatch:
                key = f"{'expected' if observed.expected else 'unexpected'}/" + (
                    "allow_to_deny" if allowed else "deny_to_allow"
                )
                tally = tallies[observed.version]
                tally.mismatches[key] = tally.mismatches.get(key, 0) + 1
                if not observed.expected:
                    tally.count_unexpected(principal, handle)

    def retain(self, live: set[str]) -> None:
        """Forget shadows that are no longer live."""
        self.tallies = {v: t for v, t in self.tallies.items() if v in live}


def sidecar_id(service: str) -> str:
    return f"{service or 'sidecar'}@{socket.gethostname()}:{os.getpid()}"


class ReportPublisher:
    """Writes this sidecar's tallies to etcd every `interval` seconds, each under a fresh lease of
    a few intervals' life (the previous lease is revoked once the key has moved to the new one)."""

    def __init__(
        self, etcd: Etcd, layout: Layout, reports: ShadowReports, ident: str, *, region: str, interval: float = 2.0
    ) -> None:
        self.etcd = etcd
        self.layout = layout
        self.reports = reports
        self.ident = ident
        self.region = region
        self.interval = interval
        self.ttl = max(2, round(interval * 3))
        # The lease the published keys hang on; revoked once they have moved to the next one.
        self._lease: int | None = None

    def key(self, version: str) -> str:
        return self.layout.reports(version) + self.ident

    async def publish(self) -> None:
        if not self.reports.tallies:
            return
        lease = await self.etcd.call(self.etcd.lease.grant, self.ttl)
        for version, tally in list(self.reports.tallies.items()):
            document = {"sidecar": self.ident, "region": self.region, "at": time.time(), **tally.document()}
            await self.etcd.call(self.etcd.kv.put, self.key(version), json.dumps(document), lease=lease.ID)
        previous, self._lease = self._lease, lease.ID
        if previous is not None:
            await self.etcd.call(self.etcd.lease.revoke, previous)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.publish()
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                log.warning("report_not_published", error=str(exc) or type(exc).__name__)
