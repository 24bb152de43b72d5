"""Fill envoy/sidecar.yaml's placeholders, validate the result with Envoy, and start Envoy."""

from __future__ import annotations

import string
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from authz_sidecar.local.processes import Process, binary

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "envoy" / "sidecar.yaml"
TRACING = REPO_ROOT / "envoy" / "tracing.yaml"


def render(values: Mapping[str, object], out: Path, template: Path = TEMPLATE) -> Path:
    """Substitute every ${NAME}; a placeholder left without a value is an error, not an empty string."""
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    out.write_text(text)
    return out


def with_tracing(config: Path, collector: tuple[str, int], fragment: Path = TRACING) -> Path:
    """Merge envoy/tracing.yaml into a rendered config: Envoy's OpenTelemetry tracer, exporting over
    OTLP/gRPC to `collector`, so Envoy's spans sit in the same traces as the sidecar's
    ``authz.check`` spans. Kept out of the main template so a mesh without a collector does not
    trace at all."""
    values = {"OTLP_ADDRESS": collector[0], "OTLP_PORT": collector[1]}
    tracing = yaml.safe_load(string.Template(fragment.read_text()).substitute(values))
    data = yaml.safe_load(config.read_text())
    manager = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["tracing"] = tracing["tracing"]
    data["static_resources"]["clusters"].append(tracing["cluster"])
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def with_authz_endpoints(config: Path, endpoints: Sequence[tuple[str, int]]) -> Path:
    """Point a rendered config's ``authz_sidecar`` cluster at several sidecars: Envoy balances its
    Checks over them, as it would over the replicas of a region. The template names one sidecar,
    which is what a sidecar deployment (one per service instance) has."""
    data = yaml.safe_load(config.read_text())
    cluster = next(c for c in data["static_resources"]["clusters"] if c["name"] == "authz_sidecar")
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                for host, port in endpoints
            ]
        }
    ]
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
