"""The gRPC front: ext_authz Check, the application API, health and reflection, in one of two
server models chosen with ``--server-model``.

- ``aio``: grpc.aio on the sidecar's event loop (uvloop when installed).
- ``threads``: grpcio's synchronous server with a thread pool, beside the event loop that runs the
  policy source and the ops endpoint. The Check handler is a plain function over bytes, and reading
  the snapshot is one attribute load, so worker threads share nothing that needs a lock.

Both register Check as a generic handler without (de)serialisers: the handler parses the request
once itself and returns response bytes that were built when that response was first needed.

Both are bounded (:class:`RpcLimits`), through one interceptor each. A unary request message over
``--grpc-max-message-bytes`` is refused before it is parsed; gRPC itself stops reading any message at
twice that, refusing it before the sidecar sees it (so those alone go uncounted). RPCs beyond
``--grpc-max-concurrent-rpcs`` are refused before their message is read: by gRPC's own limit in the
thread-pool server (which counts calls queued for a worker too), by an interceptor in the aio
server. Every refusal is RESOURCE_EXHAUSTED, on which Envoy fails closed, and is counted in
``authz_rejected_total{front="grpc"}``. Both servers bind without SO_REUSEPORT, so a second
sidecar on the same port fails to start instead of splitting the traffic with the first.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar.fronts.appapi import AppAuthzServicer
from authz_sidecar.fronts.appidentity import AppRefusedError
from authz_sidecar.fronts.events import EventError, EventsService
from authz_sidecar.fronts.extauthz import CheckHandler
from authz_sidecar.fronts.manifest import ManifestServicer
from authz_sidecar.fronts.registry import RegistryError, RegistryService
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
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_TOO_MANY = "concurrent RPC limit exceeded (--grpc-max-concurrent-rpcs)"


@dataclass(frozen=True, slots=True)
class RpcLimits:
    max_concurrent_rpcs: int = 1024
    max_message_bytes: int = 4 * 1024 * 1024

    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 2 * self.max_message_bytes),
        ]


Rejected = Callable[[str], None]


class _Bounds:
    """Every unary method's handler, wrapped to see the request's size before it is parsed: the
    methods are registered with their deserialiser as usual, the wrapper takes it over. Wrapped once
    per handler (handlers are looked up anew for every call, but are the same objects)."""

    def __init__(self, limits: RpcLimits, rejected: Rejected, aio: bool) -> None:
        self._limit = limits.max_message_bytes
        self._rejected = rejected
        self._aio = aio
        self._wrapped: dict[int, tuple[Any, Any]] = {}

    def _refusal(self, raw: bytes) -> str | None:
        if len(raw) <= self._limit:
            return None
        self._rejected("message_too_large")
        return f"request message of {len(raw)} bytes is over the limit of {self._limit} (--grpc-max-message-bytes)"

    def wrap(self, handler: Any) -> Any:
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler  # bounded by gRPC's own ceiling only: health's Watch and reflection
        found = self._wrapped.get(id(handler))
        if found is not None and found[0] is handler:
            return found[1]
        behavior, parse, refusal = handler.unary_unary, handler.request_deserializer, self._refusal
        if self._aio:
            behavior = _awaitable(behavior)

            async def bounded_aio(raw: bytes, context: Any) -> Any:
                reason = refusal(raw)
                if reason is not None:
                    await context.abort(_EXHAUSTED, reason)
                try:
                    request = parse(raw) if parse is not None else raw
                except Exception:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse")
                return await behavior(request, context)

            bounded: Any = bounded_aio
        elif parse is None:
            # Bytes in (ext_authz Check): one call between gRPC and the handler, the size compared inline.
            limit = self._limit

            def bounded_bytes(raw: bytes, context: Any) -> Any:
                if len(raw) > limit:
                    context.abort(_EXHAUSTED, refusal(raw))
                return behavior(raw, context)

            bounded = bounded_bytes
        else:

            def bounded_sync(raw: bytes, context: Any) -> Any:
                reason = refusal(raw)
                if reason is not None:
                    context.abort(_EXHAUSTED, reason)
                try:
                    request = parse(raw)
                except Exception:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse")
                return behavior(request, context)

            bounded = bounded_sync
        wrapped = grpc.unary_unary_rpc_method_handler(bounded, response_serializer=handler.response_serializer)
        self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped


def _awaitable(behavior: Any) -> Any:
    """An aio behavior as a coroutine function (grpc.aio also takes plain functions)."""
    if inspect.iscoroutinefunction(behavior):
        return behavior

    async def call(request: Any, context: Any) -> Any:
        return behavior(request, context)

    return call


class _PoolRoutes(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The thread-pool server's one handler lookup: every method, bounded once when it is added
    (:class:`_Bounds`), found with one dict lookup per call. Not an interceptor: grpcio runs an
    interceptor pipeline for every call in its one serving thread (~1 us against ~0.2 us for the
    lookup alone), the thread every call waits for. Health and reflection are added here too, as
    they register themselves (through :meth:`add_registered_method_handlers`), so that every call
    passes :meth:`service`.

    It also counts the calls gRPC refuses for its concurrency limit, which it does without telling
    anyone. That server takes calls one after another in that one thread: each is looked up here,
    then is either handed to the executor (:class:`_ObservedPool`) or refused. A call found here
    that has not reached the executor when the next call is looked up was refused; it is counted
    then."""

    def __init__(self, bounds: _Bounds, rejected: Rejected) -> None:
        self._bounds = bounds
        self._rejected = rejected
        self._handlers: dict[str, Any] = {}
        self._generic: list[Any] = []
        self._awaiting = False

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for method, handler in handlers.items():
            self._handlers[f"/{service}/{method}"] = self._bounds.wrap(handler)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Generated servicer code registers each service both ways: the registered methods are
        found first, these only for a method none of them is (a servicer that registers no other
        way would still be served)."""
        self._generic.extend(handlers)

    def service(self, handler_call_details: Any) -> Any:
        if self._awaiting:
            self._rejected("concurrency")
        handler = self._handlers.get(handler_call_details.method)
        if handler is None:
            handler = self._bounds.wrap(self._generic_lookup(handler_call_details))
        self._awaiting = handler is not None
        return handler

    def _generic_lookup(self, handler_call_details: Any) -> Any:
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return handler
        return None

    def submitted(self) -> None:
        self._awaiting = False


class _ObservedPool(futures.ThreadPoolExecutor):
    def __init__(self, routes: _PoolRoutes, workers: int) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="check")
        self._routes = routes

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        self._routes.submitted()
        return super().submit(fn, *args, **kwargs)


async def _refuse_aio(_requests: Any, context: Any) -> None:
    await context.abort(_EXHAUSTED, _TOO_MANY)


# Stream-stream, so that a refused call's message is never read, whatever the method's kind.
_REFUSAL_AIO = grpc.stream_stream_rpc_method_handler(_refuse_aio)


class _AioAdmissions(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The aio server's interceptor: bounds every call's message (:class:`_Bounds`) and the calls in
    flight, each counted from the moment it is looked up (before its message is read) until its task
    ends, however it ends: the interceptor runs in the call's own task."""

    def __init__(self, bounds: _Bounds, limit: int, rejected: Rejected) -> None:
        self._bounds = bounds
        self._limit = limit
        self._rejected = rejected
        self.active = 0

    def _release(self, _task: asyncio.Task[Any]) -> None:
        self.active -= 1

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self.active >= self._limit:
            self._rejected("concurrency")
            return _REFUSAL_AIO
        task = asyncio.current_task()
        if task is not None:
            self.active += 1
            task.add_done_callback(self._release)
        return self._bounds.wrap(handler)


# A service's methods: (its full name, {method name: handler}).
Methods = tuple[str, dict[str, Any]]


def _check_methods(check: Any, app_check: Any, filter_manifest: Any = None) -> tuple[Methods, ...]:
    app_methods = {
        "Check": grpc.unary_unary_rpc_method_handler(
            app_check,
            request_deserializer=authz_pb2.CheckRequest.FromString,
            response_serializer=authz_pb2.CheckResponse.SerializeToString,
        )
    }
    if filter_manifest is not None:
        # Bytes both ways: the handler bounds and parses each message itself (fronts/manifest.py).
        app_methods["FilterManifest"] = grpc.stream_stream_rpc_method_handler(filter_manifest)
    return ((AUTHORIZATION_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)}), (APP_SERVICE, app_methods))


def _registry_methods(registry: RegistryService, aio: bool) -> Methods:
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
    return REGISTRY_SERVICE, handlers


def _events_methods(events: EventsService, aio: bool) -> Methods:
    """SignEvent and VerifyEvent; their checks run where the RPC is served, and only a consume
    (etcd, on the event loop) is handed over to the loop from the thread-pool server."""
    loop = asyncio.get_running_loop()
    if aio:

        async def sign_aio(request: Any, context: Any) -> Any:
            try:
                return events.sign(request, context)
            except EventError as exc:
                await context.abort(exc.code, exc.message)

        async def verify_aio(request: Any, context: Any) -> Any:
            try:
                return await events.settle(events.judge(request, context))
            except EventError as exc:
                await context.abort(exc.code, exc.message)

        sign, verify = sign_aio, verify_aio
    else:

        def sign_sync(request: Any, context: Any) -> Any:
            try:
                return events.sign(request, context)
            except EventError as exc:
                context.abort(exc.code, exc.message)

        def verify_sync(request: Any, context: Any) -> Any:
            try:
                verdict = events.judge(request, context)
                if not verdict.consume:
                    return verdict.response
                settled = asyncio.run_coroutine_threadsafe(events.settle(verdict), loop)
                try:
                    return settled.result(REGISTRY_TIMEOUT)
                except TimeoutError:
                    settled.cancel()
                    raise EventError(grpc.StatusCode.UNAVAILABLE, "the consume took too long") from None
            except EventError as exc:
                context.abort(exc.code, exc.message)

        sign, verify = sign_sync, verify_sync
    return (
        APP_SERVICE,
        {
            "SignEvent": grpc.unary_unary_rpc_method_handler(
                sign,
                request_deserializer=authz_pb2.SignEventRequest.FromString,
                response_serializer=authz_pb2.SignEventResponse.SerializeToString,
            ),
            "VerifyEvent": grpc.unary_unary_rpc_method_handler(
                verify,
                request_deserializer=authz_pb2.VerifyEventRequest.FromString,
                response_serializer=authz_pb2.VerifyEventResponse.SerializeToString,
            ),
        },
    )


def _target(address: tuple[str, int] | str) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def _bind(server: Any, address: tuple[str, int] | str) -> int:
    """Listen on `address`; OSError if gRPC cannot (the caller checked the usual causes first,
    see :func:`authz_sidecar.server.check_free`, since gRPC logs its own failure before raising)."""
    try:
        return int(server.add_insecure_port(_target(address)))
    except RuntimeError:
        raise OSError("gRPC could not listen there (in use, not this host's address, or not permitted)") from None


class GrpcFront:
    """Start, mark serving, stop and wait, the same way for both server models."""

    def __init__(
        self,
        model: str,
        handler: CheckHandler,
        app: AppAuthzServicer,
        registry: RegistryService,
        workers: int,
        *,
        limits: RpcLimits | None = None,
        rejected: Rejected | None = None,
        events: EventsService | None = None,
        manifest: ManifestServicer | None = None,
    ) -> None:
        if model not in SERVER_MODELS:
            raise ValueError(f"server model {model!r}")
        self.model = model
        self.limits = limits or RpcLimits()
        self._rejected: Rejected = rejected or (lambda _reason: None)
        self._handler = handler
        self._app = app
        self._manifest = manifest
        self._registry = registry
        self._events = events
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

            app = self._app

            async def app_check(request: authz_pb2.CheckRequest, context: Any) -> authz_pb2.CheckResponse:
                try:
                    if request.at_least_revision:
                        await app.fresh_async(request.at_least_revision, context)
                    return decide(request, context)
                except AppRefusedError as exc:
                    await context.abort(exc.code, exc.message)
                    raise  # abort raises; this line is for the type checker

            bounds = _Bounds(self.limits, self._rejected, aio=True)
            aio_server = grpc.aio.server(
                interceptors=[_AioAdmissions(bounds, self.limits.max_concurrent_rpcs, self._rejected)],
                options=self.limits.options(),
            )
            manifest = self._manifest.serve_aio if self._manifest is not None else None
            services = (*_check_methods(check, app_check, manifest), _registry_methods(self._registry, aio=True))
            if self._events is not None:
                services += (_events_methods(self._events, aio=True),)
            aio_server.add_generic_rpc_handlers(
                tuple(grpc.method_handlers_generic_handler(name, methods) for name, methods in services)
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, aio_server)
            reflection.enable_server_reflection(names, aio_server)
            self.port = _bind(aio_server, address)
            await aio_server.start()
            self._aio = aio_server
        else:
            routes = _PoolRoutes(_Bounds(self.limits, self._rejected, aio=False), self._rejected)
            manifest_sync = self._manifest.serve_sync if self._manifest is not None else None
            services = (
                *_check_methods(self._handler.check_wire, self._app_check_sync, manifest_sync),
                _registry_methods(self._registry, aio=False),
            )
            if self._events is not None:
                services += (_events_methods(self._events, aio=False),)
            for name, methods in services:
                routes.add_registered_method_handlers(name, methods)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, routes)
            reflection.enable_server_reflection(names, routes)  # type: ignore[arg-type]  # registers like a server
            sync_server = grpc.server(
                _ObservedPool(routes, self._workers),
                handlers=[routes],
                options=self.limits.options(),
                maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs,
            )
            self.port = _bind(sync_server, address)
            sync_server.start()
            self._sync = sync_server
        return self.port

    def _app_check_sync(self, request: authz_pb2.CheckRequest, context: Any) -> authz_pb2.CheckResponse:
        try:
            if request.at_least_revision:
                self._app.fresh(request.at_least_revision, context)
            return self._app.decide(request, context)
        except AppRefusedError as exc:
            context.abort(exc.code, exc.message)
            raise  # abort raises; this line is for the type checker

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
