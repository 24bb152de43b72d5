"""The gRPC front: ext_authz Check, the application API, health and reflection, in one of two
server models chosen with ``--server-model``.

- ``aio``: grpc.aio on the sidecar's event loop (uvloop when installed).
- ``threads``: grpcio's synchronous server with a thread pool, beside the event loop that runs the
  policy source and the ops endpoint. The Check handler is a plain function over bytes, and reading
  the snapshot is one attribute load, so worker threads share nothing that needs a lock.

Both register Check as a generic handler without (de)serialisers: the handler parses the request
once itself and returns response bytes that were built when that response was first needed.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar.appapi import AppAuthzServicer
from authz_sidecar.extauthz import CheckHandler
from authz_sidecar.registry import RegistryError, RegistryService
from authz_sidecar.v1 import authz_pb2, registry_pb2

AUTHORIZATION_SERVICE = pb.DESCRIPTOR.services_by_name["Authorization"].full_name
APP_SERVICE = authz_pb2.DESCRIPTOR.services_by_name["Authz"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
HEALTH_NAMES = ("", AUTHORIZATION_SERVICE, APP_SERVICE)
# Registry method -> (request type, response type, RegistryService coroutine name).
_REGISTRY_METHODS: dict[str, tuple[Any, Any, str]] = {
    "GetPermission": (registry_pb2.GetPermissionRequest, registry_pb2.RegisteredPermission, "get"),
    "ListPermissions": (registry_pb2.ListPermissionsRequest, registry_pb2.ListPermissionsResponse, "list"),
    "PutPermission": (registry_pb2.PutPermissionRequest, registry_pb2.RegisteredPermission, "put"),
}
# How long a Registry call served from a worker thread waits for etcd through the event loop.
REGISTRY_TIMEOUT = 15.0
SERVER_MODELS = ("aio", "threads")
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _generic_handlers(check: Any, app_check: Any) -> tuple[grpc.GenericRpcHandler, ...]:  # type: ignore[type-arg]
    return (
        grpc.method_handlers_generic_handler(
            AUTHORIZATION_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)}
        ),
        grpc.method_handlers_generic_handler(
            APP_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    app_check,
                    request_deserializer=authz_pb2.CheckRequest.FromString,
                    response_serializer=authz_pb2.CheckResponse.SerializeToString,
                )
            },
        ),
    )


def _registry_handler(registry: RegistryService, aio: bool) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """Registry calls run on the event loop, where the etcd client lives; from the thread-pool
    server they are handed over to it and awaited."""
    loop = asyncio.get_running_loop()
    handlers = {}
    for method, (request_type, response_type, name) in _REGISTRY_METHODS.items():
        call = getattr(registry, name)
        if aio:

            async def handle_aio(request: Any, context: Any, call: Any = call) -> Any:
                try:
                    return await call(request)
                except RegistryError as exc:
                    await context.abort(exc.code, exc.message)

            handler: Any = handle_aio
        else:

            def handle_sync(request: Any, context: Any, call: Any = call) -> Any:
                try:
                    return asyncio.run_coroutine_threadsafe(call(request), loop).result(REGISTRY_TIMEOUT)
                except RegistryError as exc:
                    context.abort(exc.code, exc.message)

            handler = handle_sync
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(REGISTRY_SERVICE, handlers)


def _target(address: tuple[str, int] | str) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


class GrpcFront:
    """Start, mark serving, stop and wait, the same way for both server models."""

    def __init__(
        self, model: str, handler: CheckHandler, app: AppAuthzServicer, registry: RegistryService, workers: int
    ) -> None:
        if model not in SERVER_MODELS:
            raise ValueError(f"server model {model!r}")
        self.model = model
        self._handler = handler
        self._app = app
        self._registry = registry
        self._workers = workers
        self._aio: grpc.aio.Server | None = None
        self._sync: grpc.Server | None = None
        self._health: Any = health.aio.HealthServicer() if model == "aio" else health.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else _NOT_SERVING
        for name in HEALTH_NAMES:
            if self.model == "aio":
                await self._health.set(name, status)
            else:
                self._health.set(name, status)

    async def start(self, address: tuple[str, int] | str) -> int:
        await self.set_serving(False)
        check_wire, decide = self._handler.check_wire, self._app.decide
        names = (AUTHORIZATION_SERVICE, APP_SERVICE, REGISTRY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        if self.model == "aio":

            async def check(raw: bytes, _context: Any) -> bytes:
                return check_wire(raw)

            async def app_check(request: authz_pb2.CheckRequest, context: Any) -> authz_pb2.CheckResponse:
                return decide(request, context.invocation_metadata())

            aio_server = grpc.aio.server()
            aio_server.add_generic_rpc_handlers(
                (*_generic_handlers(check, app_check), _registry_handler(self._registry, aio=True))
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, aio_server)
            reflection.enable_server_reflection(names, aio_server)
            self.port = aio_server.add_insecure_port(_target(address))
            await aio_server.start()
            self._aio = aio_server
        else:
            sync_server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="check"))
            sync_server.add_generic_rpc_handlers(
                (
                    *_generic_handlers(
                        lambda raw, _c: check_wire(raw), lambda req, c: decide(req, c.invocation_metadata())
                    ),
                    _registry_handler(self._registry, aio=False),
                )
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, sync_server)
            reflection.enable_server_reflection(names, sync_server)
            self.port = sync_server.add_insecure_port(_target(address))
            sync_server.start()
            self._sync = sync_server
        return self.port

    async def stop(self, grace: float) -> None:
        """Health to NOT_SERVING, refuse new RPCs, let RPCs in flight finish within `grace`."""
        if self.model == "aio":
            await self._health.enter_graceful_shutdown()
        else:
            self._health.enter_graceful_shutdown()
        if self._aio is not None:
            await self._aio.stop(grace)
        if self._sync is not None:
            await asyncio.to_thread(self._sync.stop(grace).wait)

    async def wait(self) -> None:
        if self._aio is not None:
            await self._aio.wait_for_termination()
        elif self._sync is not None:
            await asyncio.to_thread(self._sync.wait_for_termination)
