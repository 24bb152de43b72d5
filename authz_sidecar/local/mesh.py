"""One region of the demo service on real processes (etcd, the demo upstream, a sidecar, Envoy), and
the pieces every local mesh starts its processes with.

:class:`Mesh` is the single-region mesh the end-to-end tests start with a policy directory of their
own. ``make run`` (``authz-sidecar mesh up``, :mod:`authz_sidecar.local.regions`) and ``make
scenario`` build their two regions from the same pieces: :func:`seed_policy` (etcd gets a policy
directory the way an operator writes it, with ctl), :func:`upstream_argv`, :func:`sidecar_argv` and
:func:`render_envoy`, so that a sidecar or an Envoy is started one way everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz_sidecar import cli
from authz_sidecar.documents import load_document, parse_catalog
from authz_sidecar.local import envoy
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http, wait_for_port
from authz_sidecar.local.tokens import DEMO_ISSUER, DemoIssuer

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy"


def run_ctl(endpoints: str, *args: str) -> dict[str, Any]:
    """Run ``authz-sidecar ctl ... --json`` in this process against `endpoints`; return what it
    printed. In-process: a ctl subprocess would spend a second of CPU importing before it does
    anything, which a mesh under load feels."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["ctl", *args, "--etcd", endpoints, "--json"])
    if code != 0:
        raise RuntimeError(f"ctl {' '.join(args)} failed (exit {code})")
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def upstream_argv(port: int) -> list[str]:
    """The demo upstream, echoing which set decided (authz_sidecar.local.upstream)."""
    return [sys.executable, "-m", "authz_sidecar.local.upstream", "--port", str(port)]


def sidecar_argv(
    *,
    grpc_port: int,
    http_port: int,
    etcd: str,
    catalog: Path,
    cache_file: Path,
    region: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """A sidecar of the demo service on etcd, reading identities from Envoy's jwt_authn payload."""
    return [
        sys.executable,
        "-m",
        "authz_sidecar",
        "serve",
        "--listen",
        f"{LOOPBACK}:{grpc_port}",
        "--http",
        f"{LOOPBACK}:{http_port}",
        "--etcd",
        etcd,
        "--catalog",
        str(catalog),
        "--cache-file",
        str(cache_file),
        "--service",
        "things",
        "--region",
        region,
        "--jwt-authn-payload-key",
        "jwt_payload",
        "--grace",
        "1",
        *extra,
    ]


def render_envoy(
    out: Path,
    *,
    listen_port: int,
    admin_port: int,
    authz_ports: Sequence[int],
    upstream_port: int,
    jwks: Path,
    collector: tuple[str, int] | None = None,
    catalog: Path = EXAMPLE_POLICY / "catalog.yaml",
    trace_service_name: str = "envoy",
) -> Path:
    """The Envoy in front of the demo upstream, generated from the service's catalog the way a
    platform team would (``authz-sidecar envoy-config``), asking the sidecars on `authz_ports`
    (Envoy balances its Checks over them, as over the replicas of a region)."""
    from authz_sidecar.deploy.envoyconfig import AuthzTarget, EnvoyConfigOptions, HostPort, JwtSettings, render

    options = EnvoyConfigOptions(
        upstream=HostPort(LOOPBACK, upstream_port),
        listen=HostPort(LOOPBACK, listen_port),
        admin=HostPort(LOOPBACK, admin_port),
        authz=tuple(AuthzTarget(address=HostPort(LOOPBACK, port)) for port in authz_ports),
        jwt=JwtSettings(issuer=DEMO_ISSUER, jwks_file=str(jwks)),
        otlp=HostPort(*collector) if collector is not None else None,
        trace_service_name=trace_service_name,
    )
    parsed = parse_catalog(load_document(catalog.read_text(), str(catalog)), str(catalog))
    out.write_text(render(parsed, options, source=catalog.name))
    return out


def seed_policy(endpoints: str, policy_dir: Path) -> None:
    """etcd gets a policy directory the way an operator would write it: the catalog (``ctl
    registry put``), the active set (``ctl init``), then each shadow (``ctl propose``, with the
    request id and reason its file gives, else its name)."""
    run_ctl(endpoints, "registry", "put", "--file", str(policy_dir / "catalog.yaml"))
    run_ctl(endpoints, "init", "--file", str(policy_dir / "active.yaml"))
    for path in sorted((policy_dir / "shadows").glob("*.yaml")):
        meta = yaml.safe_load(path.read_text())
        request_id = str(meta.get("request_id") or path.stem)
        reason = str(meta.get("reason") or "example shadow")
        run_ctl(endpoints, "propose", "--file", str(path), "--request-id", request_id, "--reason", reason)


@dataclass
class Mesh:
    """The processes of one local mesh, and how to reach them."""

    workdir: Path
    policy_dir: Path
    region: str = "us-east"
    ports: dict[str, int] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    issuer: DemoIssuer = field(default_factory=DemoIssuer)
    sidecar_args: tuple[str, ...] = ()
    # An OTLP/gRPC collector (host, port): the sidecar and Envoy send their spans there.
    collector: tuple[str, int] | None = None
    etcd: EtcdCluster | None = None

    @property
    def etcd_endpoints(self) -> str:
        if self.etcd is None:
            raise RuntimeError("the mesh is not started")
        return self.etcd.endpoints

    def ctl(self, *args: str) -> dict[str, Any]:
        """Run ``authz-sidecar ctl ... --json`` against the mesh's etcd; return what it printed."""
        return run_ctl(self.etcd_endpoints, *args)

    def seed(self) -> None:
        """etcd gets the mesh's policy directory the way an operator would write it."""
        seed_policy(self.etcd_endpoints, self.policy_dir)

    def start(self) -> None:
        """Everything on free loopback ports (tests run side by side); :meth:`stop` stops whatever
        was started if this fails part way."""
        self.ports = {name: free_port() for name in ("envoy", "admin", "grpc", "http", "upstream")}
        jwks = self.issuer.write_jwks(self.workdir / "jwks.json")
        try:
            self.etcd = EtcdCluster(self.workdir / "etcd")  # assigned first: stop() stops a half-started one
            self.etcd.start()
            self.seed()
            upstream = self._spawn("upstream", upstream_argv(self.ports["upstream"]))
            wait_for_port(self.ports["upstream"], upstream)
            self.start_sidecar()
            config = render_envoy(
                self.workdir / "envoy.yaml",
                listen_port=self.ports["envoy"],
                admin_port=self.ports["admin"],
                authz_ports=[self.ports["grpc"]],
                upstream_port=self.ports["upstream"],
                jwks=jwks,
                collector=self.collector,
            )
            proxy = envoy.start(config, self.workdir)
            self.processes.append(proxy)
            wait_for_port(self.ports["envoy"], proxy)
            wait_for_http(f"http://{LOOPBACK}:{self.ports['admin']}/ready", proxy)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str]) -> Process:
        env = {"PYTHONUNBUFFERED": "1"}
        if name == "sidecar" and self.collector is not None:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{self.collector[0]}:{self.collector[1]}"
            env["OTEL_SERVICE_NAME"] = "authz-sidecar"
            env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
        proc = Process(name, argv, self.workdir, env=env)
        self.processes.append(proc)
        return proc

    def start_sidecar(self) -> Process:
        sidecar = self._spawn(
            "sidecar",
            sidecar_argv(
                grpc_port=self.ports["grpc"],
                http_port=self.ports["http"],
                etcd=self.etcd_endpoints,
                catalog=self.policy_dir / "catalog.yaml",
                cache_file=self.workdir / "snapshot-cache.json",
                region=self.region,
                extra=self.sidecar_args,
            ),
        )
        wait_for_http(f"http://{LOOPBACK}:{self.ports['http']}/readyz", sidecar)
        return sidecar

    def sidecar(self) -> Process:
        return next(p for p in self.processes if p.name == "sidecar")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.etcd is not None:
            self.etcd.stop()

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.ports['envoy']}{path}"

    def request(
        self, method: str, path: str, principal: str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request through Envoy; return status, lower-cased headers and body."""
        all_headers = dict(headers or {})
        if principal is not None:
            all_headers["authorization"] = f"Bearer {self.issuer.token(principal)}"
        return send(method, self.url(path), all_headers)


def send(method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One request to a loopback URL; status, lower-cased headers and body, a 4xx or 5xx included."""
    req = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()
