"""A sidecar registers its own service's catalog at run time (seed 001: PUT, no DELETE, retry until
the registry is up).

On start the sidecar merges its ``--catalog`` (permissions and routes) into etcd through
:class:`~authz_sidecar.store.policy.PolicyStore`, retrying with capped exponential backoff and full
jitter until etcd takes it, while the sidecar serves from what it has. A service therefore never
waits on a central release, and a fleet restarting together does not hammer etcd in lockstep.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import Catalog
from authz_sidecar.store.policy import CatalogTooLargeError, ConflictError, PolicyStore

log = structlog.get_logger("authz_sidecar.store.registration")


class Registrar:
    """Register one catalog until etcd has it; say how it went in /status."""

    def __init__(self, store: PolicyStore, catalog: Catalog, *, base: float = 0.2, cap: float = 10.0) -> None:
        self.store = store
        self.catalog = catalog
        self.base = base
        self.cap = cap
        self.attempts = 0
        self.registered_at: float | None = None
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "service": self.catalog.service,
            "registered": self.registered_at is not None,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        while True:
            self.attempts += 1
            try:
                await self.store.register_catalog(self.catalog)
            except (CatalogTooLargeError, DocumentError) as exc:
                # Merged with what etcd holds, the catalog is over a bound: trying again cannot help.
                self.last_error = str(exc)
                log.error("registration", result="refused", service=self.catalog.service, error=self.last_error)
                return
            except (EtcdError, ConflictError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                # Full jitter: anywhere between 0 and the capped exponential step.
                delay = random.uniform(0, min(self.cap, self.base * 2 ** min(self.attempts, 16)))  # noqa: S311
                log.warning(
                    "registration",
                    result="retrying",
                    service=self.catalog.service,
                    attempt=self.attempts,
                    retry_in=round(delay, 2),
                    error=self.last_error,
                )
                await asyncio.sleep(delay)
                continue
            self.registered_at = time.time()
            self.last_error = None
            log.info(
                "registration",
                result="registered",
                service=self.catalog.service,
                permissions=len(self.catalog.permissions),
                routes=len(self.catalog.routes),
                attempts=self.attempts,
            )
            return
