"""The ``authz-sidecar`` command: ``serve`` runs a sidecar, ``validate`` checks a policy directory.

Every flag can also be set as ``AUTHZ_<FLAG>`` in the environment (``--policy-dir`` ->
``AUTHZ_POLICY_DIR``); a flag wins over the variable. Errors are one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from authz_sidecar import __version__
from authz_sidecar.config import Settings, validate
from authz_sidecar.errors import AuthzError
from authz_sidecar.identity import SOURCES

EXIT_USAGE = 2
EXIT_ERROR = 1
_DEFAULTS = Settings()


def _env(flag: str) -> str:
    return "AUTHZ_" + flag.lstrip("-").replace("-", "_").upper()


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _add(parser: argparse.ArgumentParser, flag: str, *, text: str, **kw: Any) -> None:
    """Add a flag whose default comes from AUTHZ_<FLAG>, then from Settings."""
    dest = flag.lstrip("-").replace("-", "_")
    env_value = os.environ.get(_env(flag))
    default = getattr(_DEFAULTS, dest, None) if dest in {f.name for f in fields(Settings)} else kw.pop("default", None)
    if env_value is not None:
        default = env_value
    elif isinstance(default, tuple):
        default = ",".join(default)
    suffix = f" [env {_env(flag)}]"
    parser.add_argument(flag, dest=dest, default=default, help=text + suffix, metavar=kw.pop("metavar", None), **kw)


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--etcd-ca", text="CA bundle for etcd over TLS", metavar="FILE")
    _add(parser, "--etcd-cert", text="client certificate for etcd", metavar="FILE")
    _add(parser, "--etcd-key", text="client certificate's key", metavar="FILE")
    _add(parser, "--etcd-server-name", text="name the etcd certificates carry, if not the endpoint's host")
    _add(parser, "--etcd-user", text="etcd user (with --etcd-password, better set in the environment)")
    _add(parser, "--etcd-password", text="etcd password")
    _add(parser, "--etcd-timeout", text="seconds each etcd request may take")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authz-sidecar", description="Envoy ext_authz sidecar with shadow sets.")
    parser.add_argument("--version", action="version", version=f"authz-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add(serve, "--listen", text="gRPC address (host:port or unix:///path)")
    _add(serve, "--http", text="ops HTTP address for /metrics /healthz /readyz /status")
    _add(serve, "--service", text="this service's name (selects its catalog's route table)")
    _add(serve, "--region", text="this sidecar's region (selects canary weights)")
    _add(serve, "--etcd", text="comma-separated etcd endpoints")
    _add(serve, "--prefix", text="etcd key prefix")
    _add_etcd_flags(serve)
    _add(serve, "--etcd-liveness", text="seconds a watch may stay silent before it is reopened")
    _add(
        serve, "--cache-file", text="disk copy of the last good snapshot; empty: ~/.cache/authz-sidecar/..., off: none"
    )
    _add(serve, "--max-staleness", text="deny everything after this many seconds without etcd; 0: never")
    _add(serve, "--report-interval", text="seconds between this sidecar's shadow reports in etcd")
    _add(
        serve,
        "--catalog",
        text="this service's catalog: registered in etcd on start (--etcd), or read beside --policy-dir",
        metavar="FILE",
    )
    _add(serve, "--policy-dir", text="directory with active.yaml, shadows/, catalog.yaml", metavar="DIR")
    _add(serve, "--poll-interval", text="seconds between policy directory checks")
    _add(
        serve,
        "--identity",
        text=f"identity sources in order, comma-separated ({', '.join(SOURCES)}); empty: derived from the settings",
    )
    _add(serve, "--jwt-authn-payload-key", text="key Envoy's jwt_authn payload_in_metadata names (default: any)")
    _add(serve, "--principal-claim", text="JWT claim that names the principal")
    _add(serve, "--jwks-file", text="JWKS file for verifying bearer tokens here", metavar="FILE")
    _add(serve, "--jwt-issuers", text="accepted issuers, comma-separated")
    _add(serve, "--jwt-audiences", text="accepted audiences, comma-separated")
    _add(serve, "--jwt-algorithms", text="allowed signing algorithms, comma-separated")
    _add(serve, "--payload-header", text="header carrying jwt_authn's forwarded payload (identity payload_header)")
    _add(serve, "--http-authz", text="also serve ext_authz's HTTP variant on this address (host:port)")
    _add(serve, "--http-authz-max-url-bytes", text="HTTP ext_authz: longest request target (URL); longer: 431")
    _add(serve, "--http-authz-max-headers", text="HTTP ext_authz: most headers in one request; more: 431")
    _add(serve, "--http-authz-max-header-bytes", text="HTTP ext_authz: URL + header names and values; more: 431")
    _add(serve, "--http-authz-max-body-bytes", text="HTTP ext_authz: largest body (never read); larger: 413")
    _add(serve, "--http-authz-request-timeout", text="HTTP ext_authz: seconds from a request's first byte to its last")
    _add(serve, "--http-authz-idle-timeout", text="HTTP ext_authz: seconds a connection may wait for its next request")
    _add(serve, "--grpc-max-concurrent-rpcs", text="RPCs in flight (queued included); beyond: RESOURCE_EXHAUSTED")
    _add(serve, "--grpc-max-message-bytes", text="largest request message; larger: RESOURCE_EXHAUSTED")
    _add(serve, "--dev-principal-header", text="DEVELOPMENT ONLY: trust this header as the principal")
    _add(serve, "--stickiness", text="canary stickiness key: principal or request_id")
    _add(serve, "--grace", text="seconds to let in-flight RPCs finish on SIGTERM")
    _add(serve, "--server-model", text="how Check is served: aio (grpc.aio) or threads (grpc.server + pool)")
    _add(serve, "--workers", text="worker threads for --server-model threads (the number of cores unless set)")
    _add(serve, "--log-level", text="debug, info, warning or error")
    _add(serve, "--log-decisions", text="share of decisions logged (0..1); mismatches are always logged")

    from authz_sidecar import ctl

    ctl.add_parser(sub, _add, _add_etcd_flags)

    check = sub.add_parser("validate", help="validate a policy directory and print what it would serve")
    _add(check, "--policy-dir", text="directory to validate", metavar="DIR")
    _add(check, "--service", text="this service's name")
    _add(check, "--region", text="region whose canary weights to show")
    _add(check, "--catalog", text="an extra catalog file", metavar="FILE")
    return parser


def _as_tuple(value: Any) -> tuple[str, ...]:
    return value if isinstance(value, tuple) else _split(str(value))


def _path(value: Any) -> Path | None:
    return Path(value) if value not in (None, "") else None


def _number(ns: argparse.Namespace, name: str) -> float:
    raw = getattr(ns, name)
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise AuthzError(f"--{name.replace('_', '-')}: {raw!r} is not a number") from None


def _integer(ns: argparse.Namespace, name: str) -> int:
    raw = getattr(ns, name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise AuthzError(f"--{name.replace('_', '-')}: {raw!r} is not a whole number") from None


def _etcd_settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The etcd connection flags, shared by serve and ctl."""
    return {
        "etcd": _as_tuple(ns.etcd),
        "etcd_ca": _path(ns.etcd_ca),
        "etcd_cert": _path(ns.etcd_cert),
        "etcd_key": _path(ns.etcd_key),
        "etcd_server_name": ns.etcd_server_name or "",
        "etcd_user": ns.etcd_user or "",
        "etcd_password": ns.etcd_password or "",
        "etcd_timeout": _number(ns, "etcd_timeout"),
    }


def settings_from(ns: argparse.Namespace) -> Settings:
    """Convert parsed flags (strings from the command line or environment) into Settings."""

    return validate(
        Settings(
            listen=ns.listen,
            http=ns.http,
            service=ns.service or "",
            region=ns.region or "",
            **_etcd_settings(ns),
            prefix=ns.prefix,
            etcd_liveness=_number(ns, "etcd_liveness"),
            cache_file=ns.cache_file or "",
            max_staleness=_number(ns, "max_staleness"),
            report_interval=_number(ns, "report_interval"),
            catalog=_path(ns.catalog),
            policy_dir=_path(ns.policy_dir),
            poll_interval=_number(ns, "poll_interval"),
            identity=_as_tuple(ns.identity),
            jwt_authn_payload_key=ns.jwt_authn_payload_key or "",
            principal_claim=ns.principal_claim,
            jwks_file=_path(ns.jwks_file),
            jwt_issuers=_as_tuple(ns.jwt_issuers),
            jwt_audiences=_as_tuple(ns.jwt_audiences),
            jwt_algorithms=_as_tuple(ns.jwt_algorithms),
            dev_principal_header=ns.dev_principal_header or "",
            payload_header=ns.payload_header,
            http_authz=ns.http_authz or "",
            http_authz_max_url_bytes=_integer(ns, "http_authz_max_url_bytes"),
            http_authz_max_headers=_integer(ns, "http_authz_max_headers"),
            http_authz_max_header_bytes=_integer(ns, "http_authz_max_header_bytes"),
            http_authz_max_body_bytes=_integer(ns, "http_authz_max_body_bytes"),
            http_authz_request_timeout=_number(ns, "http_authz_request_timeout"),
            http_authz_idle_timeout=_number(ns, "http_authz_idle_timeout"),
            grpc_max_concurrent_rpcs=_integer(ns, "grpc_max_concurrent_rpcs"),
            grpc_max_message_bytes=_integer(ns, "grpc_max_message_bytes"),
            stickiness=ns.stickiness,
            grace=_number(ns, "grace"),
            server_model=ns.server_model,
            workers=int(_number(ns, "workers")),
            log_level=ns.log_level,
            log_decisions=_number(ns, "log_decisions"),
        )
    )


def _serve(ns: argparse.Namespace) -> int:
    from authz_sidecar import logs
    from authz_sidecar.server import serve

    settings = settings_from(ns)
    try:
        logs.configure(settings.log_level)
    except ValueError as exc:
        raise AuthzError(f"--log-level: {exc}") from None
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
    return 0


def _ctl(ns: argparse.Namespace) -> int:
    from authz_sidecar import ctl

    return ctl.run(ns, Settings(**_etcd_settings(ns)).etcd_options())


def _validate(ns: argparse.Namespace) -> int:
    from authz_sidecar.sources.files import FilePolicySource

    if not ns.policy_dir:
        raise AuthzError("--policy-dir is required")
    source = FilePolicySource(
        Path(ns.policy_dir),
        service=ns.service or "",
        region=ns.region or "",
        extra_catalogs=(Path(ns.catalog),) if ns.catalog else (),
    )
    snapshot = source.load()
    print(
        json.dumps(
            {
                "active_version": snapshot.active_version,
                "principals": len(snapshot.active.principals()),
                "handles": len(snapshot.handles),
                "routes": len(snapshot.routes),
                "shadows": {
                    s.version: {"weight_here": s.weight_bp / 100, "predicted_impact": len(s.impact)}
                    for s in snapshot.shadows
                },
            },
            indent=2,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "serve":
            return _serve(ns)
        if ns.command == "ctl":
            return _ctl(ns)
        return _validate(ns)
    except AuthzError as exc:
        print(f"authz-sidecar: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
