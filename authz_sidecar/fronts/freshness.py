"""``at_least_revision``: wait until the sidecar has applied an etcd revision, up to the call's
deadline, or refuse. Shared by every RPC of the application API that takes it: an answer never
comes from an older snapshot than the caller asked for."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.fronts.appidentity import AppRefusedError

# How long to wait when the call has no deadline of its own.
FRESHNESS_WAIT = 5.0


def budget(context: Any) -> float:
    """Up to the call's deadline, less a margin to say why before the caller's deadline says it."""
    remaining = context.time_remaining()
    return FRESHNESS_WAIT if remaining is None else max(0.0, min(float(remaining) - 0.1, 60.0))


def not_fresh(store: SnapshotStore, wanted: int) -> AppRefusedError:
    return AppRefusedError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"this sidecar has applied etcd up to revision {store.applied_revision}, not {wanted}: "
        "it never answers from an older snapshot than asked",
    )


def wait_fresh(store: SnapshotStore, wanted: int, context: Any) -> None:
    """Block (a worker thread) until `wanted` is applied, or AppRefusedError."""
    if wanted > store.applied_revision and not store.wait_applied(wanted, budget(context)):
        raise not_fresh(store, wanted)


async def wait_fresh_async(store: SnapshotStore, wanted: int, context: Any) -> None:
    """The same on the event loop: checked every few milliseconds, never blocking the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget(context)
    while wanted > store.applied_revision:
        if loop.time() >= deadline:
            raise not_fresh(store, wanted)
        await asyncio.sleep(0.005)
