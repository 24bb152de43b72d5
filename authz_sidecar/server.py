"""Assemble and run one sidecar: gRPC (ext_authz, health, reflection, the app API) and ops HTTP.

Readiness follows data: health is NOT_SERVING until the first valid snapshot is installed. On
SIGTERM or SIGINT the sidecar turns health to NOT_SERVING, stops accepting new RPCs, lets RPCs in
flight finish for ``--grace`` seconds, then stops its policy source and ops endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import structlog

from authz_sidecar.config import Settings, parse_address
from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.decider import Decider
from authz_sidecar.decision.eventkeys import EventKeys, load_signing_keys
from authz_sidecar.decision.identity import build_identifier
from authz_sidecar.decision.jwks import JwksFile, JwksUrl
from authz_sidecar.decision.manifest import ManifestJudge
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.decision.tokens import TokenVerifier
from authz_sidecar.documents import load_document, parse_catalog
from authz_sidecar.errors import BindError, ConfigError
from authz_sidecar.fronts import checklane
from authz_sidecar.fronts.appapi import AppAuthzServicer
from authz_sidecar.fronts.appidentity import AppIdentity, TrustedPeers
from authz_sidecar.fronts.events import EventsService
from authz_sidecar.fronts.extauthz import CheckHandler
from authz_sidecar.fronts.grpcfront import GrpcFront
from authz_sidecar.fronts.httpauthz import HttpAuthz
from authz_sidecar.fronts.manifest import ManifestServicer
from authz_sidecar.fronts.opshttp import OpsHttp
from authz_sidecar.fronts.registry import RegistryService
from authz_sidecar.model.pacing import Demand
from authz_sidecar.model.snapshot import Snapshot
from authz_sidecar.model.values import Catalog
from authz_sidecar.store.etcd import Etcd
from authz_sidecar.store.events import EtcdConsumptions, KeyPublisher, MemoryConsumptions, PublishedKeys
from authz_sidecar.store.layout import Layout
from authz_sidecar.store.policy import PolicyStore
from authz_sidecar.store.publisher import ReportPublisher, sidecar_id
from authz_sidecar.store.registration import Registrar
from authz_sidecar.store.sources.base import PolicySource
from authz_sidecar.store.sources.files import FilePolicySource
from authz_sidecar.telemetry import tracing
from authz_sidecar.telemetry.decisionlog import DecisionLog
from authz_sidecar.telemetry.metrics import Metrics
from authz_sidecar.telemetry.reports import ShadowReports

log = structlog.get_logger("authz_sidecar.server")


def build_source(settings: Settings, demand: Demand | None = None) -> PolicySource:
    """`demand`: the requests this process has answered, counted; large builds rest while it moves."""
    if settings.etcd:
        from authz_sidecar.store.sources.etcd import EtcdPolicySource

        return EtcdPolicySource(
            settings.etcd_options(),
            prefix=settings.prefix,
            service=settings.service,
            region=settings.region,
            cache_file=settings.cache_path(),
            liveness=settings.etcd_liveness,
            demand=demand,
        )
    if settings.policy_dir is None:
        raise ConfigError("no policy source: give --etcd HOST:PORT or --policy-dir DIR")
    extra = (settings.catalog,) if settings.catalog else ()
    return FilePolicySource(
        settings.policy_dir,
        service=settings.service,
        region=settings.region,
        extra_catalogs=extra,
        interval=settings.poll_interval,
    )


def build_jwks(settings: Settings) -> JwksFile | JwksUrl | None:
    """The verifier and what keeps its keys current, from --jwks-file or --jwks-url (or None)."""
    if settings.jwks_file is None and not settings.jwks_url:
        return None
    waiting_for = f"--jwks-url {settings.jwks_url}" if settings.jwks_url else f"--jwks-file {settings.jwks_file}"
    verifier = TokenVerifier(
        algorithms=settings.jwt_algorithms,
        issuers=settings.jwt_issuers,
        audiences=settings.jwt_audiences,
        principal_claim=settings.principal_claim,
        waiting_for=waiting_for,
    )
    if settings.jwks_file is not None:
        return JwksFile(settings.jwks_file, verifier, interval=settings.poll_interval)
    return JwksUrl(
        settings.jwks_url,
        verifier,
        refresh_interval=settings.jwks_refresh_interval,
        min_interval=settings.jwks_min_refresh_interval,
        timeout=settings.jwks_timeout,
    )


class Sidecar:
    def __init__(self, settings: Settings, source: PolicySource | None = None) -> None:
        self.settings = settings
        self.store = SnapshotStore()
        self.metrics = Metrics(self.store)
        # The JWKS file or URL, kept current by a task started with the sidecar.
        self.jwks = build_jwks(settings)
        identifier = build_identifier(
            settings.identity_sources(),
            jwt_authn_payload_key=settings.jwt_authn_payload_key,
            principal_claim=settings.principal_claim,
            verifier=self.jwks.verifier if self.jwks is not None else None,
            dev_header=settings.dev_principal_header or None,
            payload_header=settings.payload_header,
        )
        self.identity_sources = identifier.names
        # Shadow reports are published to etcd; without it nothing would read them, so nothing is tallied.
        self.reports = ShadowReports() if settings.etcd else None
        if self.reports is not None:
            reports = self.reports
            self.store.on_install(lambda snapshot: reports.retain({v.version for v in snapshot.shadows}))
        # Opened on start (a path that cannot be opened is a ConfigError naming --decision-log).
        self.decision_log = (
            DecisionLog(
                settings.decision_log,
                max_bytes=settings.decision_log_max_bytes,
                keep=settings.decision_log_keep,
                dropped=self.metrics.decision_log_dropped,
            )
            if settings.decision_log is not None
            else None
        )
        if self.decision_log is not None:
            decision_log = self.decision_log
            self.store.on_install(lambda _snapshot: decision_log.forget())
        self.decider = Decider(
            self.store,
            identifier,
            self.metrics,
            stickiness=settings.stickiness,
            log_decisions=settings.log_decisions,
            reports=self.reports,
            decision_log=self.decision_log,
        )
        self.tracer = tracing.build(self.store, settings.region, dropped=self.metrics.spans_dropped)
        self.answering = Answering(self.decider, self.metrics, self.tracer)
        self.handler = CheckHandler(self.answering)
        self.http_authz = (
            HttpAuthz(
                self.answering,
                self.metrics,
                settings.http_limits(),
            )
            if settings.http_authz
            else None
        )
        self.http_authz_port = 0
        self.source = source if source is not None else build_source(settings, self.demand)
        # The registry's own etcd client (the policy source keeps its own), made on start.
        self.etcd: Etcd | None = None
        self.registry = RegistryService(None, settings.service)
        self.registrar: Registrar | None = None
        self.publisher: ReportPublisher | None = None
        identity = AppIdentity(
            self.jwks.verifier if self.jwks is not None else None, TrustedPeers.parse(settings.app_trusted_peers)
        )
        self.events = EventsService(
            self.answering,
            self.store,
            EventKeys(
                load_signing_keys(settings.event_key, settings.event_key_pem), published_only=bool(settings.etcd)
            ),
            MemoryConsumptions(),
            self.metrics,
            default_ttl=settings.event_ttl,
            max_ttl=settings.event_max_ttl,
            clock_skew=settings.event_clock_skew,
            identity=identity,
        )
        self.key_publisher: KeyPublisher | None = None
        self.front = GrpcFront(
            settings.server_model,
            self.handler,
            AppAuthzServicer(self.answering, self.store, identity),
            self.registry,
            settings.workers,
            limits=settings.rpc_limits(),
            rejected=lambda reason: self.metrics.rejected("grpc", reason),
            events=self.events,
            manifest=ManifestServicer(
                ManifestJudge(self.store, self.decider, self.metrics, stickiness=settings.stickiness),
                max_message_bytes=settings.grpc_max_message_bytes,
                workers=settings.workers,
                identity=identity,
                store=self.store,
            ),
        )
        self.grpc_port = 0
        self.http_port = 0
        self._started = False
        # True once start() has finished: only a sidecar that started logs its stopping.
        self._running = False
        self._http: asyncio.Server | None = None
        self._source_task: asyncio.Task[None] | None = None
        self._started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.store.on_install(self._snapshot_installed)
        self.store.on_serving(self._serving_changed)

    def demand(self) -> int:
        """The Checks answered so far (what large builds rest for): every one put to a lane (counted
        in C), and every one the latency histogram saw."""
        return checklane.calls() + self.metrics.latency.count

    def _snapshot_installed(self, _snapshot: Snapshot) -> None:
        self._serving_changed(True)

    def _serving_changed(self, serving: bool) -> None:
        self._spawn(self.front.set_serving(serving))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enforce_max_staleness(self) -> None:
        limit = self.settings.max_staleness
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            self.store.enforce_max_staleness(limit)

    def _status_extra(self) -> dict[str, Any]:
        return {
            "service": self.settings.service,
            "listen": self.settings.listen,
            "identity_sources": list(self.identity_sources),
            "policy_source": self.source.describe(),
            "jwks": self.jwks.status() if self.jwks is not None else None,
            "registration": self.registrar.status() if self.registrar else None,
            "decision_log": self.decision_log.status() if self.decision_log is not None else None,
            "events": {
                **self.events.keys.status(),
                "publication": self.key_publisher.status() if self.key_publisher is not None else None,
                "consumed": self.events.consumptions.describe(),
            },
            "uptime_seconds": round(time.time() - self._started_at, 3),
        }

    def _own_catalog(self) -> Catalog | None:
        """The --catalog this sidecar registers (etcd source only; the file source reads it)."""
        path = self.settings.catalog
        if not self.settings.etcd or path is None:
            return None
        try:
            catalog = parse_catalog(load_document(path.read_bytes(), str(path)), str(path))
        except OSError as exc:
            raise ConfigError(f"--catalog {path}: {exc.strerror}") from None
        if self.settings.service and catalog.service != self.settings.service:
            raise ConfigError(f"--catalog {path} is the catalog of {catalog.service!r}, not of --service")
        return catalog

    def _events_on_etcd(self, etcd: Etcd, layout: Layout) -> None:
        """Consumes recorded in etcd, this sidecar's public keys published there, and the keys
        that verify read from there, through the policy source's watch."""
        ident = sidecar_id(self.settings.service)
        self.events.consumptions = EtcdConsumptions(etcd, layout, ident)
        keys = self.events.keys
        if keys.own:
            self.key_publisher = KeyPublisher(etcd, layout, keys.own, ident)
        from authz_sidecar.store.sources.etcd import EtcdPolicySource

        if isinstance(self.source, EtcdPolicySource):
            published = PublishedKeys(layout)
            self.source.follow(layout.event_keys, lambda kv: keys.published(published.decode(kv)))

    def _addresses(self) -> list[tuple[str, str]]:
        flags = [("--listen", self.settings.listen), ("--http", self.settings.http)]
        if self.settings.http_authz:
            flags.insert(1, ("--http-authz", self.settings.http_authz))
        return flags

    async def start(self) -> None:
        """Bind every address (or fail with one BindError naming the flag), then serve. A start
        that fails part way leaves nothing running: the caller stops the sidecar."""
        for flag, value in self._addresses():
            check_free(flag, value)
        catalog = self._own_catalog()
        if self.decision_log is not None:
            try:
                self.decision_log.start()
            except OSError as exc:
                raise ConfigError(f"--decision-log {self.decision_log.path}: {exc.strerror or exc}") from None
        if self.settings.etcd:
            self.etcd = Etcd(self.settings.etcd_options())
            store = self.registry.store = PolicyStore(self.etcd, self.settings.prefix)
            if catalog is not None:
                self.registrar = Registrar(store, catalog)
            self._events_on_etcd(self.etcd, store.layout)
            if self.reports is not None:
                ident = sidecar_id(self.settings.service)
                self.publisher = ReportPublisher(
                    self.etcd,
                    store.layout,
                    self.reports,
                    ident,
                    region=self.settings.region,
                    interval=self.settings.report_interval,
                    snapshot=lambda: self.store.snapshot,
                )
        with _naming("--listen", self.settings.listen):
            self.grpc_port = await self.front.start(parse_address(self.settings.listen, "--listen"))
        self._started = True
        if self.jwks is not None:
            self._spawn(self.jwks.run())
        if self.http_authz is not None:
            with _naming("--http-authz", self.settings.http_authz):
                self.http_authz_port = await self.http_authz.start(
                    parse_address(self.settings.http_authz, "--http-authz")
                )
        ops = OpsHttp(self.store, self.metrics, self._status_extra)
        with _naming("--http", self.settings.http):
            self._http = await ops.start(parse_address(self.settings.http, "--http"))
        sockets = self._http.sockets
        self.http_port = sockets[0].getsockname()[1] if sockets and not isinstance(sockets[0].getsockname(), str) else 0
        self._source_task = asyncio.create_task(self.source.run(self.store), name="policy-source")
        if self.settings.max_staleness > 0:
            self._spawn(self._enforce_max_staleness())
        if self.registrar is not None:
            self._spawn(self.registrar.run())
        if self.publisher is not None:
            self._spawn(self.publisher.run())
        if self.key_publisher is not None:
            self._spawn(self.key_publisher.run())
        log.info(
            "sidecar_started",
            grpc=self.settings.listen,
            grpc_port=self.grpc_port,
            server_model=self.front.model,
            http_authz=self.settings.http_authz or None,
            http=self.settings.http,
            http_port=self.http_port,
            source=self.source.describe(),
            region=self.settings.region,
            identity_sources=list(self.identity_sources),
            tracing=self.tracer is not None,
            decision_log=str(self.settings.decision_log) if self.settings.decision_log else None,
        )
        self._running = True

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace if grace is None else grace
        running, self._running = self._running, False
        if running:
            log.info("sidecar_stopping", grace_seconds=grace)
        if self._started:
            await self.front.stop(grace)
        if self.http_authz is not None:
            await self.http_authz.stop()
        if self.decision_log is not None:
            # After the fronts: the decisions of the RPCs that finished in the grace period are written too.
            await asyncio.to_thread(self.decision_log.stop)
        for task in [self._source_task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        if self.etcd is not None:
            await self.etcd.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)
        if running:
            log.info("sidecar_stopped")

    async def wait(self) -> None:
        """Run until the gRPC server ends or the policy source fails unexpectedly."""
        if not self._started or self._source_task is None:
            raise RuntimeError("Sidecar.wait() before start()")
        await asyncio.wait(
            [asyncio.ensure_future(self.front.wait()), self._source_task],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._source_task.done() and not self._source_task.cancelled() and self._source_task.exception():
            raise self._source_task.exception()  # type: ignore[misc]


def check_free(flag: str, value: str) -> None:
    """Refuse an address another process listens on, before anything binds. gRPC would log its own
    failure first, and for a unix socket gRPC and asyncio alike remove the file and take the path
    from whoever listens there."""
    address = parse_address(value, flag)
    if isinstance(address, str):
        path = address.removeprefix("unix://").removeprefix("unix:")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, contextlib.suppress(OSError):
                probe.settimeout(1.0)
                probe.connect(path)
                raise BindError(f"{flag} {value}: address already in use (another sidecar?)")
        return
    host, port = address
    if port == 0:
        return
    try:
        resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _bind_error(flag, value, exc) from None
    failed: list[OSError] = []
    for family, kind, proto, _name, sockaddr in resolved:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no owner
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                failed.append(exc)
    # In use or not permitted anywhere is fatal; a name that resolves to several addresses is served
    # on those that bind (as gRPC does), so another failure is fatal only when none binds.
    fatal = [e for e in failed if e.errno in (errno.EADDRINUSE, errno.EACCES)]
    if fatal or (failed and len(failed) == len(resolved)):
        raise _bind_error(flag, value, (fatal or failed)[0])


def _bind_error(flag: str, value: str, exc: OSError) -> BindError:
    return BindError.of(flag, value, exc, "sidecar")


@contextlib.contextmanager
def _naming(flag: str, value: str) -> Iterator[None]:
    """An OSError while binding `value` as one BindError line naming the flag."""
    try:
        yield
    except OSError as exc:
        raise _bind_error(flag, value, exc) from None


async def serve(settings: Settings) -> None:
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.stop(grace=0)
        raise
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waiter = asyncio.ensure_future(sidecar.wait())
    stop_waiter = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([waiter, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
    await sidecar.stop()
    for task in (waiter, stop_waiter):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
