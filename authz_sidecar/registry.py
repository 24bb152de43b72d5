"""The permission registry: a service's permissions registered by the service itself, at run time.

Two parts, both writing through :class:`~authz_sidecar.etcd.store.PolicyStore`:

- :class:`Registrar`: on start the sidecar merges its service's catalog (``--catalog``: permissions
  and routes) into etcd, retrying with capped exponential backoff and full jitter until etcd takes
  it, while the sidecar serves from what it has. A service therefore never waits on a central
  release, and a fleet restarting together does not hammer etcd in lockstep.
- :class:`RegistryService`: ``authz_sidecar.v1.Registry`` (Get, List, Put; no Delete). A Put is
  accepted only for the sidecar's own service, so one service cannot claim another's permissions.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.documents import Catalog, Permission, check_description, check_handle
from authz_sidecar.errors import DocumentError
from authz_sidecar.etcd.store import CatalogTooLargeError, ConflictError, OwnedElsewhereError, PolicyStore
from authz_sidecar.v1 import registry_pb2

log = structlog.get_logger("authz_sidecar.registry")


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


class RegistryError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _registered(service: str, permission: Permission) -> registry_pb2.RegisteredPermission:
    return registry_pb2.RegisteredPermission(
        service=service, handle=permission.handle, description=permission.description
    )


class RegistryService:
    """The Registry's logic as coroutines; :mod:`authz_sidecar.grpcfront` binds them to gRPC."""

    def __init__(self, store: PolicyStore | None, service: str) -> None:
        self.store = store
        self.service = service

    def _store(self) -> PolicyStore:
        if self.store is None:
            raise RegistryError(grpc.StatusCode.FAILED_PRECONDITION, "the registry needs the etcd source (--etcd)")
        return self.store

    async def _catalogs(self) -> list[Catalog]:
        try:
            return await self._store().catalogs()
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise RegistryError(grpc.StatusCode.UNAVAILABLE, f"etcd: {exc}") from None

    async def get(self, request: registry_pb2.GetPermissionRequest) -> registry_pb2.RegisteredPermission:
        for catalog in await self._catalogs():
            for permission in catalog.permissions:
                if permission.handle == request.handle:
                    return _registered(catalog.service, permission)
        raise RegistryError(grpc.StatusCode.NOT_FOUND, f"permission {request.handle!r} is not registered")

    async def list(self, request: registry_pb2.ListPermissionsRequest) -> registry_pb2.ListPermissionsResponse:
        return registry_pb2.ListPermissionsResponse(
            permissions=[
                _registered(c.service, p)
                for c in await self._catalogs()
                if not request.service or c.service == request.service
                for p in c.permissions
            ]
        )

    async def put(self, request: registry_pb2.PutPermissionRequest) -> registry_pb2.RegisteredPermission:
        store = self._store()
        if not self.service or request.service != self.service:
            raise RegistryError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this sidecar registers permissions of {self.service or 'no service'!r} only, not {request.service!r}",
            )
        try:
            check_handle(request.handle, "PutPermission", "handle")
            check_description(request.description, "PutPermission", "description")
        except DocumentError as exc:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        permission = Permission(request.handle, request.description)
        try:
            await store.register_permission(self.service, permission)
        except OwnedElsewhereError as exc:
            raise RegistryError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
        except CatalogTooLargeError as exc:
            raise RegistryError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except DocumentError as exc:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except (EtcdError, ConflictError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise RegistryError(grpc.StatusCode.UNAVAILABLE, f"etcd: {exc}") from None
        log.info("permission_registered", service=self.service, handle=request.handle)
        return _registered(self.service, permission)
