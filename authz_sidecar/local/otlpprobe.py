"""Whether ``make run``'s processes trace, and where to: an OTLP endpoint that answers a short TCP
connect (``OTEL_EXPORTER_OTLP_ENDPOINT``, by default a local Jaeger's 4317), or nowhere, said with
how to turn traces on. Probing rather than trusting the variable: a sidecar and an Envoy exporting to
a collector that is not there only spend retries and log lines on it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from authz_sidecar.local.portplan import REGIONS

DEFAULT_OTLP = "http://127.0.0.1:4317"


@dataclass(frozen=True)
class Traces:
    """Where spans go: an OTLP collector that answered a TCP connect, or nowhere (said, with how
    to turn them on). Sidecars speak OTLP/gRPC or HTTP (their OTEL_* variables); Envoy's tracer
    is configured for OTLP/gRPC only."""

    endpoint: str  # what the sidecars export to; "" when traces are off
    envoy: tuple[str, int] | None  # Envoy's OTLP/gRPC collector
    note: str

    @staticmethod
    def probe(environ: Mapping[str, str], timeout: float = 0.3) -> Traces:
        raw = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or DEFAULT_OTLP
        endpoint = raw if "://" in raw else f"http://{raw}"
        parts = urlsplit(endpoint)
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        how = (
            "run a Jaeger 2 with OTLP on 4317 first, e.g. 'docker run --rm -p 16686:16686 -p 4317:4317 "
            "jaegertracing/jaeger:latest', then make run again (or set OTEL_EXPORTER_OTLP_ENDPOINT)"
        )
        if not host or not port:
            return Traces("", None, f"traces: off (OTEL_EXPORTER_OTLP_ENDPOINT={raw} names no host:port); {how}")
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError:
            return Traces("", None, f"traces: off (nothing answers at {raw}); to see them, {how}")
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        ).strip()
        if protocol != "grpc":
            note = f"traces: on, to {endpoint} ({protocol}) from the sidecars; Envoy's need OTLP/gRPC, so none"
            return Traces(endpoint, None, note)
        where = ", ".join(f"envoy-{r}" for r in REGIONS)
        return Traces(endpoint, (host, port), f"traces: on, to {endpoint} (OTLP/gRPC) from {where} and authz-sidecar")

    def sidecar_env(self, region: str) -> dict[str, str]:
        """The OTEL_* variables a region's sidecar gets: the collector and its region as a resource
        attribute; with traces off, an exporter of none (whatever the environment says)."""
        if not self.endpoint:
            return {"OTEL_TRACES_EXPORTER": "none"}
        given = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        attributes = ",".join(a for a in (given, f"cloud.region={region}") if a)
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_SERVICE_NAME": "authz-sidecar",
            "OTEL_RESOURCE_ATTRIBUTES": attributes,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
