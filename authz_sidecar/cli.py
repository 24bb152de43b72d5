"""The ``authz-sidecar`` command: ``serve`` runs a sidecar, ``ctl`` and ``controller`` change and roll out
policy, ``validate`` checks a policy directory, ``mesh up|demo`` run the local two-region mesh.

Every flag can also be set as ``AUTHZ_<FLAG>`` in the environment (``--policy-dir`` ->
``AUTHZ_POLICY_DIR``); a flag wins over the variable. Errors are one line on stderr and a
non-zero exit, never a traceback: 2 when the command line itself is wrong (argparse's errors and
every :class:`ConfigError`), 1 when the command ran and failed. A reader that goes away early
(``ctl status | head``) ends the command quietly.
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
from typing import Any, NoReturn

import structlog

from authz_sidecar import __version__
from authz_sidecar.config import Settings, parse_address, validate
from authz_sidecar.decision.identity import SOURCES
from authz_sidecar.errors import AuthzError, ConfigError
from authz_sidecar.store.layout import normalise_prefix

EXIT_USAGE = 2
EXIT_ERROR = 1
# What a shell reports for a process ended by SIGPIPE: the reader of our output went away.
EXIT_BROKEN_PIPE = 128 + 13
_DEFAULTS = Settings()


def _env(flag: str) -> str:
    return "AUTHZ_" + flag.lstrip("-").replace("-", "_").upper()


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line naming where help is, instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _add(parser: argparse.ArgumentParser, flag: str, *, text: str, shared: bool = False, **kw: Any) -> None:
    """Add a flag whose default comes from AUTHZ_<FLAG>, then from Settings.

    `shared`: the flag is also on the enclosing command (ctl's connection flags, which go before or
    after the verb), so here it has no default: a subcommand's parser would otherwise write its
    default over the value given before the verb."""
    dest = flag.lstrip("-").replace("-", "_")
    env_value = os.environ.get(_env(flag))
    default = getattr(_DEFAULTS, dest, None) if dest in {f.name for f in fields(Settings)} else kw.pop("default", None)
    if shared:
        default = argparse.SUPPRESS
    elif env_value is not None:
        default = env_value
    elif isinstance(default, tuple):
        default = ",".join(default)
    suffix = f" [env {_env(flag)}]"
    parser.add_argument(flag, dest=dest, default=default, help=text + suffix, metavar=kw.pop("metavar", None), **kw)


def _add_etcd_flags(parser: argparse.ArgumentParser, shared: bool = False) -> None:
    _add(parser, "--etcd-ca", text="CA bundle for etcd over TLS", metavar="FILE", shared=shared)
    _add(parser, "--etcd-cert", text="client certificate for etcd", metavar="FILE", shared=shared)
    _add(parser, "--etcd-key", text="client certificate's key", metavar="FILE", shared=shared)
    _add(
        parser, "--etcd-server-name", text="name the etcd certificates carry, if not the endpoint's host", shared=shared
    )
    _add(parser, "--etcd-user", text="etcd user (with --etcd-password, better set in the environment)", shared=shared)
    _add(parser, "--etcd-password", text="etcd password", shared=shared)
    _add(parser, "--etcd-timeout", text="seconds each etcd request may take", shared=shared)


def _add_identity_flags(serve: argparse.ArgumentParser) -> None:
    """Who is asking: the identity sources and how bearer tokens are verified."""
    _add(
        serve,
        "--identity",
        text=f"identity sources in order, comma-separated ({', '.join(SOURCES)}); empty: derived from the settings",
    )
    _add(serve, "--jwt-authn-payload-key", text="key Envoy's jwt_authn payload_in_metadata names (default: any)")
    _add(serve, "--principal-claim", text="JWT claim that names the principal")
    _add(serve, "--jwks-file", text="JWKS file for verifying bearer tokens here (reloaded on change)", metavar="FILE")
    _add(serve, "--jwks-url", text="JWKS URL for verifying bearer tokens, fetched in the background", metavar="URL")
    _add(serve, "--jwks-refresh-interval", text="seconds between JWKS URL fetches (shorter if Cache-Control max-age)")
    _add(serve, "--jwks-min-refresh-interval", text="minimum seconds between JWKS URL fetches (unknown kids ask)")
    _add(serve, "--jwks-timeout", text="seconds a JWKS URL fetch may take")
    _add(serve, "--jwt-issuers", text="accepted issuers, comma-separated")
    _add(serve, "--jwt-audiences", text="accepted audiences, comma-separated")
    _add(serve, "--jwt-algorithms", text="allowed signing algorithms, comma-separated")
    _add(serve, "--payload-header", text="header carrying jwt_authn's forwarded payload (identity payload_header)")


def _add_front_flags(serve: argparse.ArgumentParser) -> None:
    """The HTTP ext_authz variant and the bounds every front puts on its input."""
    _add(serve, "--http-authz", text="also serve ext_authz's HTTP variant on this address (host:port)")
    _add(serve, "--http-authz-max-url-bytes", text="HTTP ext_authz: longest request target (URL); longer: 431")
    _add(serve, "--http-authz-max-headers", text="HTTP ext_authz: most headers in one request; more: 431")
    _add(serve, "--http-authz-max-header-bytes", text="HTTP ext_authz: URL + header names and values; more: 431")
    _add(serve, "--http-authz-max-body-bytes", text="HTTP ext_authz: largest body (never read); larger: 413")
    _add(serve, "--http-authz-request-timeout", text="HTTP ext_authz: seconds from a request's first byte to its last")
    _add(serve, "--http-authz-idle-timeout", text="HTTP ext_authz: seconds a connection may wait for its next request")
    _add(serve, "--grpc-max-concurrent-rpcs", text="RPCs in flight (queued included); beyond: RESOURCE_EXHAUSTED")
    _add(serve, "--grpc-max-message-bytes", text="largest request message; larger: RESOURCE_EXHAUSTED")


def _add_event_flags(serve: argparse.ArgumentParser) -> None:
    """Signed events. --event-key is added by hand: AUTHZ_EVENT_KEY may hold a private key's PEM
    text, which must never become a default that --help prints."""
    serve.add_argument(
        "--event-key",
        dest="event_key",
        default=None,
        metavar="FILE",
        help="private Ed25519 key(s) for SignEvent: PEM PKCS#8 files or directories of *.pem, comma-separated; "
        "the newest (last; a directory's by name) signs [env AUTHZ_EVENT_KEY: the same paths, or the PEM text]",
    )
    _add(serve, "--event-ttl", text="seconds an envelope lives when SignEvent asks for no ttl")
    _add(serve, "--event-max-ttl", text="the longest ttl SignEvent grants")
    _add(serve, "--event-clock-skew", text="seconds an envelope is still accepted past its expiry (clock skew)")


def _event_keys(ns: argparse.Namespace) -> dict[str, Any]:
    """--event-key's paths, else AUTHZ_EVENT_KEY's: paths too, or PEM text."""
    from authz_sidecar.decision.eventkeys import ENVIRONMENT, environment_pem

    given = ns.event_key if ns.event_key is not None else os.environ.get(ENVIRONMENT, "")
    if ns.event_key is None and environment_pem(given):
        return {"event_key_pem": given}
    return {"event_key": tuple(Path(p) for p in _split(given))}


def _add_controller_parser(sub: Any) -> None:
    """`authz-sidecar controller`: runs the rollout plans."""
    controller = sub.add_parser("controller", help="run the rollout plans: canary, analyse, promote, roll back")
    _add(controller, "--etcd", text="comma-separated etcd endpoints")
    _add(controller, "--prefix", text="etcd key prefix")
    _add_etcd_flags(controller)
    _add(controller, "--controller-id", text="this controller's name in the election (default: controller@host:pid)")
    _add(
        controller,
        "--tick",
        text="seconds between passes over the plans (failing gates are judged every pass)",
        default="1",
    )
    _add(controller, "--lease-ttl", text="seconds a leader's term outlives its last renewal", default="5")
    _add(controller, "--retries", text="attempts of a rollback before the dead-letter queue", default="5")
    _add(controller, "--dlq-file", text="the local dead-letter file (etcd unreachable)", default="")
    _add(controller, "--metrics", text="host:port for the controller's /metrics (empty: none)", default="")
    _add(controller, "--log-level", text="debug, info, warning or error")


# mesh up's state file (authz_sidecar.local.meshstate), relative to the current directory.
MESH_STATE = ".authz-mesh/state.json"


def _add_mesh_parser(sub: Any) -> None:
    """`authz-sidecar mesh up|demo`: the local two-region mesh (authz_sidecar.local, imported only
    when the command runs: it is no part of a sidecar)."""
    mesh = sub.add_parser("mesh", help="a two-region mesh of real processes on loopback (make run, make demo)")
    verbs = mesh.add_subparsers(dest="mesh_command", required=True, metavar="VERB")
    up = verbs.add_parser(
        "up",
        help="start etcd, the controller and two regions of demo service + sidecar + Envoy; Ctrl-C stops it",
        description="Start etcd, one controller and two regions (us-east, eu-west) of demo service, sidecar and "
        "Envoy on 127.0.0.1, seeded from examples/policy; show what each region answers; run until Ctrl-C.",
    )
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        metavar="N",
        help="shift the port plan: us-east's Envoy on N, eu-west's on N+10, etcd on N+20 (default 8080)",
    )
    up.add_argument("--free-ports", action="store_true", help="any free ports instead of the plan")
    up.add_argument(
        "--state", default=MESH_STATE, metavar="FILE", help=f"where make demo finds the mesh (default {MESH_STATE})"
    )
    up.add_argument("--workdir", default=None, metavar="DIR", help="logs, configs, tokens (kept); default: a temp dir")
    up.add_argument("--check", action="store_true", help="start, show what each region answers, stop")
    demo = verbs.add_parser(
        "demo",
        help="a change's story on the running mesh: proposed, canaried in eu-west, promoted; a mistake rolled back",
        description="Drive the mesh 'mesh up' runs (found through --state; with none, one is started for the demo's "
        "duration) through a change's lifecycle, narrated with the commands' own output.",
    )
    demo.add_argument(
        "--state", default=MESH_STATE, metavar="FILE", help=f"the running mesh's state (default {MESH_STATE})"
    )
    demo.add_argument("--quick", action="store_true", help="short intervals and fewer steps (CI)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="authz-sidecar", description="Envoy ext_authz sidecar with shadow sets.")
    parser.add_argument("--version", action="version", version=f"authz-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the sidecar", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add(serve, "--listen", text="gRPC address (host:port or unix:///path)")
    _add(serve, "--http", text="ops HTTP address for /metrics /healthz /readyz /status")
    _add(serve, "--service", text="this service's name (selects its catalog's route table)")
    _add(serve, "--region", text="this sidecar's region (selects canary weights)")
    _add(serve, "--etcd", text="comma-separated etcd endpoints")
    _add(serve, "--prefix", text="etcd key prefix")
    _add_etcd_flags(serve)
    _add(serve, "--etcd-liveness", text="seconds a watch may stay silent before it is reopened")
    _add(serve, "--state-dir", text="directory for this sidecar's state (the disk copy); empty: ~/.cache/authz-sidecar")
    _add(
        serve,
        "--cache-file",
        text="disk copy of the last good snapshot; empty: <--state-dir>/<service><prefix>.json, off: none",
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
    _add_identity_flags(serve)
    _add_front_flags(serve)
    _add(serve, "--dev-principal-header", text="DEVELOPMENT ONLY: trust this header as the principal")
    _add(
        serve,
        "--app-trusted-peers",
        text="application API: callers whose bare principal is believed (loopback, unix, none, CIDRs)",
    )
    _add(serve, "--stickiness", text="canary stickiness key: principal or request_id")
    _add(serve, "--grace", text="seconds to let in-flight RPCs finish on SIGTERM")
    _add(serve, "--server-model", text="how Check is served: aio (grpc.aio) or threads (grpc.server + pool)")
    _add(serve, "--workers", text="worker threads for --server-model threads (the number of cores unless set)")
    _add(serve, "--log-level", text="debug, info, warning or error")
    _add(serve, "--log-decisions", text="share of decisions logged (0..1); mismatches are always logged")
    _add(serve, "--decision-log", text="write every decision as a JSON line here (for ctl replay)", metavar="FILE")
    _add(serve, "--decision-log-max-bytes", text="rotate the decision log before it passes this size", metavar="BYTES")
    _add(serve, "--decision-log-keep", text="rotated decision logs kept (FILE.1 ... FILE.N)", metavar="N")
    _add_event_flags(serve)

    from authz_sidecar.control import ctl

    ctl.add_parser(sub, _add, _add_etcd_flags)

    _add_controller_parser(sub)

    from authz_sidecar.deploy import command as envoy_config

    envoy_config.add_parser(sub)

    _add_mesh_parser(sub)

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
        raise ConfigError(f"--{name.replace('_', '-')}: {raw!r} is not a number") from None


def _integer(ns: argparse.Namespace, name: str) -> int:
    raw = getattr(ns, name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name.replace('_', '-')}: {raw!r} is not a whole number") from None


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
            state_dir=_path(ns.state_dir),
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
            jwks_url=ns.jwks_url or "",
            jwks_refresh_interval=_number(ns, "jwks_refresh_interval"),
            jwks_min_refresh_interval=_number(ns, "jwks_min_refresh_interval"),
            jwks_timeout=_number(ns, "jwks_timeout"),
            jwt_issuers=_as_tuple(ns.jwt_issuers),
            jwt_audiences=_as_tuple(ns.jwt_audiences),
            jwt_algorithms=_as_tuple(ns.jwt_algorithms),
            dev_principal_header=ns.dev_principal_header or "",
            app_trusted_peers=_as_tuple(ns.app_trusted_peers),
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
            decision_log=_path(ns.decision_log),
            decision_log_max_bytes=_integer(ns, "decision_log_max_bytes"),
            decision_log_keep=_integer(ns, "decision_log_keep"),
            **_event_keys(ns),
            event_ttl=_integer(ns, "event_ttl"),
            event_max_ttl=_integer(ns, "event_max_ttl"),
            event_clock_skew=_integer(ns, "event_clock_skew"),
        )
    )


def _serve(ns: argparse.Namespace) -> int:
    from authz_sidecar.server import serve
    from authz_sidecar.telemetry import logs

    settings = settings_from(ns)
    try:
        logs.configure(settings.log_level)
    except ValueError as exc:
        raise ConfigError(f"--log-level: {exc}") from None
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
    return 0


def _ctl(ns: argparse.Namespace) -> int:
    from authz_sidecar.control import ctl

    try:
        normalise_prefix(ns.prefix)
    except ValueError as exc:
        raise ConfigError(f"--prefix: {exc}") from None
    if not structlog.is_configured():
        # Audit records are logged as JSON lines on stderr; stdout stays the command's output alone.
        from authz_sidecar.telemetry import logs

        logs.configure("info")
    return ctl.run(ns, Settings(**_etcd_settings(ns)).etcd_options().validate())


def _controller(ns: argparse.Namespace) -> int:
    from authz_sidecar.control import deadletters
    from authz_sidecar.control.controller import serve_controller
    from authz_sidecar.telemetry import logs

    try:
        prefix = normalise_prefix(ns.prefix)
        logs.configure(ns.log_level)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = Settings(**_etcd_settings(ns)).etcd_options().validate()
    tick, lease_ttl, retries = _number(ns, "tick"), _integer(ns, "lease_ttl"), _integer(ns, "retries")
    if tick <= 0 or lease_ttl < 2 or retries < 1:
        raise ConfigError("--tick must be > 0, --lease-ttl at least 2 and --retries at least 1")
    metrics = parse_address(ns.metrics, "--metrics") if ns.metrics else None
    if isinstance(metrics, str):
        raise ConfigError("--metrics takes host:port")
    asyncio.run(
        serve_controller(
            options,
            prefix,
            ident=ns.controller_id or "",
            tick=tick,
            lease_ttl=lease_ttl,
            retries=retries,
            dlq_file=Path(ns.dlq_file or os.environ.get("AUTHZ_DLQ_FILE") or deadletters.default_file()),
            metrics_address=metrics,
        )
    )
    return 0


def _mesh(ns: argparse.Namespace) -> int:
    if ns.mesh_command == "demo":
        from authz_sidecar.local import demo

        return demo.run(demo.DemoOptions(state=Path(ns.state), quick=ns.quick))
    from authz_sidecar.local import regions
    from authz_sidecar.local.portplan import DEFAULT_BASE_PORT

    if ns.free_ports and ns.base_port is not None:
        raise ConfigError("--base-port and --free-ports contradict each other: one plan or none")
    options = regions.UpOptions(
        base_port=DEFAULT_BASE_PORT if ns.base_port is None else ns.base_port,
        free_ports=ns.free_ports,
        state=Path(ns.state),
        workdir=Path(ns.workdir) if ns.workdir else None,
        check=ns.check,
    )
    return regions.up(options)


def _validate(ns: argparse.Namespace) -> int:
    from authz_sidecar.store.sources.files import FilePolicySource

    if not ns.policy_dir:
        raise ConfigError("--policy-dir is required")
    source = FilePolicySource(
        Path(ns.policy_dir),
        service=ns.service or "",
        region=ns.region or "",
        extra_catalogs=(Path(ns.catalog),) if ns.catalog else (),
    )
    snapshot = source.load()
    from authz_sidecar.control.testing import directory_cases
    from authz_sidecar.model.values import PermissionSet

    assembled = source.assembled
    active = source.last.active.value if source.last.active is not None else None
    sets = [active] if isinstance(active, PermissionSet) else []
    sets += [s.permissions for s in (assembled.shadows.values() if assembled is not None else ())]
    cases = directory_cases(Path(ns.policy_dir), sets, snapshot.catalogs)
    failed = [
        f"{version}: case {r.case.name!r} expected {'allow' if r.case.allow else 'deny'}: {r.error or r.why}"
        for version, results in cases.items()
        for r in results
        if not r.passed
    ]
    print(
        json.dumps(
            {
                "active_version": snapshot.active_version,
                "principals": len(snapshot.active.principals()),
                "handles": len(snapshot.handles),
                "routes": len(snapshot.routes),
                "shadows": {
                    s.version: {
                        "weight_here": s.weight_bp / 100,
                        "cohort_here": len(s.cohort),
                        "predicted_impact": len(s.impact),
                    }
                    for s in snapshot.shadows
                },
                "cases": {
                    version: {
                        "passed": sum(r.passed for r in results),
                        "failed": [r.document() for r in results if not r.passed],
                    }
                    for version, results in cases.items()
                },
            },
            indent=2,
        )
    )
    if failed:
        sys.stdout.flush()
        print(f"authz-sidecar: {len(failed)} case(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _run(ns: argparse.Namespace) -> int:
    if ns.command == "serve":
        return _serve(ns)
    if ns.command == "ctl":
        return _ctl(ns)
    if ns.command == "controller":
        return _controller(ns)
    if ns.command == "envoy-config":
        from authz_sidecar.deploy import command as envoy_config

        return envoy_config.run(ns)
    if ns.command == "mesh":
        return _mesh(ns)
    return _validate(ns)


def _stdout_to_devnull() -> None:
    """After the reader of stdout went away, send what is still buffered nowhere, so that Python's
    own flush at exit does not print a BrokenPipeError."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # stdout is not a file (captured in a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(_build_parser().parse_args(argv))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return code
    except ConfigError as exc:
        print(f"authz-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AuthzError as exc:
        print(f"authz-sidecar: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
