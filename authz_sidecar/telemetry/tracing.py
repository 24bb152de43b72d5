"""Tracing: one ``authz.check`` span per Check, a child of the trace the request belongs to.

Configured only by the standard OpenTelemetry environment variables, so the same settings work
for every process of a mesh: tracing is on when ``OTEL_TRACES_EXPORTER`` names ``otlp``, or when it
is unset and an OTLP endpoint is (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``), and ``OTEL_SDK_DISABLED`` is not true. ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` describe the service (through the SDK's Resource),
``OTEL_TRACES_SAMPLER``/``_ARG`` choose the sampler (default ``parentbased_always_on``),
``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_QUEUE_SIZE`` and ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` the
batching, and the ``OTEL_EXPORTER_OTLP_*`` variables the export (otlpexport.py): OTLP/gRPC, which
Jaeger ingests on 4317, or OTLP/HTTP with protobuf bodies (4318).

Why not the SDK's spans (docs/decisions/0005-tracing.md): measured behind Envoy, a span made and
exported by the SDK cost ~280 us of CPU per Check, more than the Check itself, because each one is
a tree of Python objects encoded field by field. Here a sampled Check costs a header parse, two
random numbers and an append to a queue; the exporter thread encodes the OTLP bytes itself, with
the attributes of each distinct outcome serialised once (outcomes are memoised per snapshot). With
tracing off the hot path holds no tracer; a full queue drops spans rather than wait, and a
collector that is down only makes the exporter thread back off, so it never slows or fails a Check.
Every span lost either way is counted (``authz_spans_dropped_total{reason}``).

The parts: the parent from the request's headers (:mod:`.tracecontext`), the sampler
(:mod:`.sampling`), the OTLP bytes (:mod:`.otlpencoding`), the transports (:mod:`.otlpexport`);
this module queues spans on the hot path and runs the exporter thread.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.sdk.resources import Resource

from authz_sidecar import __version__
from authz_sidecar.caches import remember
from authz_sidecar.model.evaluation import Outcome
from authz_sidecar.telemetry.otlpencoding import QueuedSpan, any_value, encode_attributes, length_delimited, spans_field
from authz_sidecar.telemetry.otlpexport import ExportError, ExportSettings, Transport, transport
from authz_sidecar.telemetry.sampling import Sampler
from authz_sidecar.telemetry.tracecontext import parent_from

if TYPE_CHECKING:  # the snapshot holder is read, never imported: telemetry sits below the decision path
    from authz_sidecar.decision.state import SnapshotStore

log = structlog.get_logger("authz_sidecar.telemetry.tracing")
DROP_REASONS = ("queue_full", "export_failed")
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _exporters(environ: Mapping[str, str]) -> list[str]:
    return [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(environ)
    if exporters:
        return "otlp" in exporters
    return any(environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


class CheckTracer:
    """Samples, queues and exports the ``authz.check`` span of each Check."""

    def __init__(
        self,
        store: SnapshotStore,
        region: str,
        export: ExportSettings,
        *,
        sampler: Sampler,
        resource: Resource,
        max_queue: int = 16_384,
        batch: int = 4096,
        interval: float = 1.0,
        dropped: dict[str, int] | None = None,
    ) -> None:
        self._store = store
        self._region = region
        self.export_settings = export
        self.sampler = sampler
        self._max_queue = max_queue
        self._batch = batch
        self._interval = interval
        self._queue: collections.deque[QueuedSpan] = collections.deque()
        self._attributes: dict[tuple[int, str], tuple[Outcome, bytes]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.exported = self.failed_exports = 0
        # Spans lost, by reason (DROP_REASONS); the metrics' dict when there is one, read at scrape time.
        self.drops = dropped if dropped is not None else {}
        for reason in DROP_REASONS:
            self.drops.setdefault(reason, 0)
        self._transport = transport(export)  # made here, so that a TLS file that does not load fails start-up
        resource_message = ResourceMessage(
            attributes=[KeyValue(key=k, value=any_value(v)) for k, v in resource.attributes.items()]
        )
        scope = InstrumentationScope(name="authz_sidecar", version=__version__)
        self._resource = length_delimited(1, resource_message.SerializeToString())
        self._scope = length_delimited(1, scope.SerializeToString())
        self._thread = threading.Thread(target=self._run, name="otlp-exporter", daemon=True)
        self._thread.start()

    def record(self, headers: Mapping[str, str] | None, outcome: Outcome, start_ns: int, end_ns: int) -> None:
        """Queue the span of one Check that started at `start_ns` and was decided at `end_ns`."""
        parent = parent_from(headers) if headers else None
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128) or 1
        if not self.sampler.sampled(trace_id, parent):
            return
        if len(self._queue) >= self._max_queue:
            self.drops["queue_full"] += 1
            return
        span_id = random.getrandbits(64) or 1
        self._queue.append((trace_id, span_id, parent, start_ns, end_ns, self._attributes_of(outcome)))
        if len(self._queue) >= self._batch:
            self._wake.set()

    def _attributes_of(self, outcome: Outcome) -> bytes:
        snapshot = self._store.snapshot
        active = snapshot.active_version if snapshot is not None else ""
        key = (id(outcome), active)
        cached = self._attributes.get(key)
        if cached is not None and cached[0] is outcome:
            return cached[1]
        encoded = encode_attributes(self.attributes(outcome, active))
        remember(self._attributes, key, (outcome, encoded), 65_536)
        return encoded

    def attributes(self, outcome: Outcome, active_version: str) -> dict[str, Any]:
        """The span's attributes (DESIGN section 8), a pure function of the outcome."""
        attributes: dict[str, Any] = {
            "authz.decision": "allow" if outcome.allowed else "deny",
            "authz.reason": outcome.reason.value,
            "authz.region": self._region,
        }
        if active_version:
            attributes["authz.active_version"] = active_version
        if outcome.permission:
            attributes["authz.permission"] = outcome.permission
        ev = outcome.evaluation
        if ev is None:  # refused before any set was consulted: no identity, unmapped, malformed...
            attributes["authz.decided_by"] = "none"
            return attributes
        attributes["authz.decided_by"] = ev.decided_by
        attributes["authz.selection"] = ev.selection.value
        attributes["authz.enforced_version"] = ev.enforced.meta.version
        attributes["authz.mismatch"] = ev.mismatch
        for observed in ev.observed:
            decision = "allow" if observed.allowed else "deny"
            if observed.shadow:
                attributes[f"authz.shadow.{observed.version}.decision"] = decision
            else:
                attributes["authz.active.decision"] = decision
        return attributes

    # --- the exporter thread ----------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def _run(self) -> None:
        backoff = 0.0
        try:
            while not self._stopping.is_set():
                self._wake.wait(max(self._interval, backoff))
                self._wake.clear()
                backoff = 0.0 if self._flush(self._transport) else min(max(backoff * 2, 0.5), 30.0)
            self._flush(self._transport)
        finally:
            self._transport.close()

    def _flush(self, transport: Transport) -> bool:
        """Export everything queued, a batch at a time; False if the collector failed (the batch is
        dropped: a span is worth less than the memory and time of keeping it)."""
        queue = self._queue
        while queue:
            items = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
            spans = spans_field(items)
            request = length_delimited(1, self._resource + length_delimited(2, self._scope + spans))
            try:
                transport.send(request)
            except Exception as exc:  # ExportError, or a fault of the transport: never end the thread
                self.failed_exports += 1
                self.drops["export_failed"] += len(items)
                if self.failed_exports in (1, 10, 100) or self.failed_exports % 1000 == 0:
                    log.warning(
                        "trace_export_failed",
                        protocol=self.export_settings.protocol,
                        endpoint=self.export_settings.endpoint,
                        error=str(exc) if isinstance(exc, ExportError) else repr(exc),
                        failures=self.failed_exports,
                        dropped=self.dropped,
                    )
                return False
            self.exported += len(items)
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (bounded by `timeout`) and stop the exporter thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)


def trace(tracer: CheckTracer, headers: Mapping[str, str] | None, outcome: Outcome, start_ns: int) -> None:
    """Record a Check's span; a fault in tracing is logged and never reaches the answer."""
    try:
        tracer.record(headers, outcome, start_ns, time.time_ns())
    except Exception:
        log.exception("trace_failed")


def _batching(environ: Mapping[str, str]) -> dict[str, Any]:
    """OTEL_BSP_* as the specification reads them (whole numbers, milliseconds for the delay; a value
    that does not read is ignored with a warning). Unset, the sidecar's own defaults stand: a
    second, a queue of 16384 and batches of 4096, larger than the SDK's because one Check is one span."""
    values: dict[str, Any] = {}
    for variable, key, least in (
        ("OTEL_BSP_SCHEDULE_DELAY", "interval", 10),  # ms; under 10 the exporter would only spin
        ("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue", 1),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "batch", 1),
    ):
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        if not raw.isdigit():
            log.warning("otel_setting_ignored", variable=variable, value=raw)
            continue
        value = max(int(raw), least)
        values[key] = value / 1000 if key == "interval" else value
    if "batch" in values:
        values["batch"] = min(values["batch"], values.get("max_queue", 16_384))
    return values


def build(
    store: SnapshotStore,
    region: str,
    environ: Mapping[str, str] = os.environ,
    *,
    dropped: dict[str, int] | None = None,
) -> CheckTracer | None:
    """The tracer the environment asks for, or None (tracing off, nothing on the hot path);
    ConfigError for export settings that could never work. `dropped` counts lost spans by reason."""
    unsupported = [name for name in _exporters(environ) if name not in ("otlp", "none")]
    if unsupported:
        log.warning("unsupported_traces_exporter", exporters=unsupported, supported=["otlp", "none"])
    if not enabled(environ):
        return None
    export = ExportSettings.from_env(environ)
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME with the SDK's own.
    name = environ.get("OTEL_SERVICE_NAME") or "authz-sidecar"
    resource = Resource.create({"service.name": name})
    log.info(
        "trace_export",
        protocol=export.protocol,
        endpoint=export.endpoint,
        secure=export.secure,
        timeout_seconds=export.timeout,
        headers=[key for key, _value in export.headers],  # names only: values are often credentials
    )
    return CheckTracer(
        store,
        region,
        export,
        sampler=Sampler.from_env(environ),
        resource=resource,
        dropped=dropped,
        **_batching(environ),
    )
