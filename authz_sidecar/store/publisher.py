"""Publishes this sidecar's shadow-report tallies (:mod:`authz_sidecar.telemetry.reports`) to etcd.

Each report lives under ``<prefix>/reports/<version>/<sidecar id>`` on a lease of a few intervals'
life, so a sidecar that dies takes its report with it; ``ctl report`` sums what is there.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import Callable

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.model.snapshot import Snapshot
from authz_sidecar.store.etcd import Etcd
from authz_sidecar.store.layout import Layout
from authz_sidecar.telemetry.reports import ShadowReports

log = structlog.get_logger("authz_sidecar.store.publisher")


def sidecar_id(service: str) -> str:
    """Unique per sidecar instance: host and pid say where it runs, the suffix tells two sidecars
    of one process apart (and a restarted one from its predecessor, whose counts it does not have)."""
    return f"{service or 'sidecar'}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class ReportPublisher:
    """Writes this sidecar's tallies to etcd every `interval` seconds, each under a fresh lease of
    a few intervals' life (the previous lease is revoked once the key has moved to the new one)."""

    def __init__(
        self,
        etcd: Etcd,
        layout: Layout,
        reports: ShadowReports,
        ident: str,
        *,
        region: str,
        interval: float = 2.0,
        snapshot: Callable[[], Snapshot | None] = lambda: None,
    ) -> None:
        self.etcd = etcd
        self.layout = layout
        self.reports = reports
        self.ident = ident
        self.region = region
        self.interval = interval
        self.snapshot = snapshot
        self.ttl = max(2, round(interval * 3))
        # The lease the published keys hang on; revoked once they have moved to the next one.
        self._lease: int | None = None

    def key(self, version: str) -> str:
        return self.layout.reports(version) + self.ident

    async def publish(self) -> None:
        self.reports.settle()
        if not self.reports.tallies:
            return
        lease = await self.etcd.call(self.etcd.lease.grant, self.ttl)
        serving = self.snapshot()
        for version, tally in list(self.reports.tallies.items()):
            # What a controller needs to trust the report: which snapshot it was counted under and
            # how the shadow stands in it (a sidecar behind the pointers is not evidence yet).
            view = serving.by_version.get(version) if serving is not None else None
            document = {
                "sidecar": self.ident,
                "region": self.region,
                "at": time.time(),
                "interval": self.interval,
                "revision": serving.revision if serving is not None else 0,
                "state": ("stale" if view.stale else view.rollout.state) if view is not None else "",
                "weight": view.weight_bp // 100 if view is not None else 0,
                **tally.document(),
            }
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
