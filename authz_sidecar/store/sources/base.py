"""The interface every policy source implements (etcd, and a directory for a single machine).

A source owns its I/O and its retry loop, and talks to the sidecar only through the store: whenever
what it watches changes it reads each document, takes or refuses each one on its own
(:func:`authz_sidecar.model.assembly.assemble`, with the documents that served last), and tells the store
(``store.refusals``, then ``store.install`` or ``store.unavailable``). It never raises out of
``run`` for bad data; it reports through the store and keeps going.
"""

from __future__ import annotations

from typing import Protocol

from authz_sidecar.decision.state import SnapshotStore


class PolicySource(Protocol):
    def describe(self) -> str:
        """A short human description for logs and /status, e.g. 'files:/etc/authz'."""
        ...

    async def run(self, store: SnapshotStore) -> None:
        """Load, then follow changes until cancelled."""
        ...
