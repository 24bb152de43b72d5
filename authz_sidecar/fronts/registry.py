"""``authz_sidecar.v1.Registry`` (Get, List, Put; no Delete): a service's permissions registered by
the service itself, at run time, through :class:`~authz_sidecar.store.policy.PolicyStore`. A Put is
accepted only for the sidecar's own service, so one service cannot claim another's permissions.
(The sidecar's own ``--catalog`` is registered on start by :mod:`authz_sidecar.store.registration`.)
"""

from __future__ import annotations

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.documents import check_description, check_handle
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import Catalog, Permission
from authz_sidecar.store.policy import CatalogTooLargeError, ConflictError, OwnedElsewhereError, PolicyStore
from authz_sidecar.v1 import registry_pb2

log = structlog.get_logger("authz_sidecar.fronts.registry")


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
    """The Registry's logic as coroutines; :mod:`authz_sidecar.fronts.grpcfront` binds them to gRPC."""

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
