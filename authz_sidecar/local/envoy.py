"""Fill envoy/sidecar.yaml's placeholders, validate the result with Envoy, and start Envoy."""

from __future__ import annotations

import string
import subprocess
from collections.abc import Mapping
from pathlib import Path

import yaml

from authz_sidecar.local.processes import Process, binary

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "envoy" / "sidecar.yaml"


def render(values: Mapping[str, object], out: Path, template: Path = TEMPLATE) -> Path:
    """Substitute every ${NAME}; a placeholder left without a value is an error, not an empty string."""
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    out.write_text(text)
    return out


def with_tracing(config: Path, collector: tuple[str, int], service_name: str = "envoy") -> Path:
    """Add Envoy's OpenTelemetry tracer, exporting over OTLP/gRPC to `collector` (Jaeger takes OTLP
    on 4317): Envoy's spans then sit in the same traces as the sidecar's ``authz.check`` spans.
    Kept out of the template so that a mesh without a collector does not trace at all."""
    data = yaml.safe_load(config.read_text())
    manager = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["tracing"] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "0.25s"},
                "service_name": service_name,
            },
        }
    }
    data["static_resources"]["clusters"].append(
        {
            "name": "otel_collector",
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "otel_collector",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {"socket_address": {"address": collector[0], "port_value": collector[1]}}
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``envoy --mode validate``; the caller checks returncode and output."""
    return subprocess.run(  # noqa: S603 - fixed argv
        [binary("envoy"), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start(config: Path, log_dir: Path, name: str = "envoy", concurrency: int = 1) -> Process:
    return Process(
        name,
        [
            binary("envoy"),
            "-c",
            str(config),
            "--concurrency",
            str(concurrency),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        log_dir,
    )
