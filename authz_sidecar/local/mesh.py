"""``make run``: a local mesh of real processes: etcd, the demo upstream, authz-sidecar and Envoy.

It seeds etcd from examples/policy with the control plane's own commands (the catalog, the
active set v1 with ``ctl init``, the shadow v2 with ``ctl propose``), starts the sidecar on etcd
(it registers its catalog itself), mints demo tokens that Envoy's jwt_authn verifies, shows one
allowed request, one denied and one decided by the shadow picked with its header, prints the curl
and ctl commands to try more, and runs until Ctrl-C. ``--check`` exits after the demonstration
(non-zero if any answer was not the expected one).

Ctrl-C or SIGTERM, at any point (starting included), stops every process it started and removes
the work directory it created, demo tokens included; a ``--workdir`` given is left in place.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
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
from authz_sidecar.local.processes import (
    LOOPBACK,
    Process,
    StoppedError,
    free_port,
    ignore_stop_signals,
    stop_on_signals,
    stop_unrecorded_children,
    wait_for_http,
    wait_for_port,
)
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


def port_or_free(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, preferred))
        except OSError:
            return free_port()
    return preferred


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
        """etcd gets the example policy the way an operator would write it."""
        d = self.policy_dir
        self.ctl("registry", "put", "--file", str(d / "catalog.yaml"))
        self.ctl("init", "--file", str(d / "active.yaml"))
        for path in sorted((d / "shadows").glob("*.yaml")):
            meta = yaml.safe_load(path.read_text())
            request_id = str(meta.get("request_id") or path.stem)
            reason = str(meta.get("reason") or "example shadow")
            self.ctl("propose", "--file", str(path), "--request-id", request_id, "--reason", reason)

    def start(self, *, preferred: bool = True) -> None:
        pick = port_or_free if preferred else (lambda _p: free_port())
        self.ports = {
            "envoy": pick(8080),
            "admin": pick(9901),
            "grpc": pick(9191),
            "http": pick(9464),
            "upstream": pick(8081),
        }
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
        req = urllib.request.Request(self.url(path), method=method, headers=all_headers)  # noqa: S310 - loopback
        try:
            with urllib.request.urlopen(req, timeout=5) as response:  # noqa: S310 - loopback
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


DEMO: tuple[tuple[str, str, str, str | None, dict[str, str], int], ...] = (
    # (what it shows, method, path, principal, extra headers, expected status)
    ("alice (owner) reads a thing: allowed by the active set v1", "GET", "/things/42", "alice", {}, 200),
    ("dave (viewer) edits a thing: denied by v1 (v2 would allow: a mismatch)", "PUT", "/things/42", "dave", {}, 403),
    (
        "dave, a tester, picks shadow v2 by header: v2 makes him an editor",
        "PUT",
        "/things/42",
        "dave",
        {"x-authz-shadow-version": "v2"},
        200,
    ),
    (
        "bob names v2 by header but is not its tester: ignored, v1 decides",
        "PUT",
        "/things/42",
        "bob",
        {"x-authz-shadow-version": "v2"},
        403,
    ),
    ("bob falls in v2's 10% us-east canary: v2 decides for him", "PUT", "/things/42", "bob", {}, 200),
    ("no token at all: 401", "GET", "/things/42", None, {}, 401),
    ("a route the catalog does not map: denied", "GET", "/admin", "alice", {}, 403),
)


def demonstrate(mesh: Mesh) -> bool:
    ok = True
    for what, method, path, principal, headers, expected in DEMO:
        status, response_headers, body = mesh.request(method, path, principal, headers)
        decided = response_headers.get("x-authz-reason") or body.decode(errors="replace")[:120]
        mark = "ok " if status == expected else "BAD"
        ok = ok and status == expected
        print(f"  [{mark}] {status} {method} {path:<12} {what}\n        -> {decided}")
    return ok


def instructions(mesh: Mesh) -> str:
    tokens = {p: mesh.issuer.token(p, ttl=12 * 3600) for p in ("alice", "bob", "carol", "dave", "qa-bot", "mallory")}
    env_file = mesh.workdir / "tokens.env"
    env_file.write_text("".join(f"{p.upper().replace('-', '_')}={t}\n" for p, t in tokens.items()))
    base = mesh.url("")
    http = f"http://{LOOPBACK}:{mesh.ports['http']}"
    etcd = mesh.etcd_endpoints
    return f"""
Local mesh is up (Ctrl-C stops it). Envoy: {base}   sidecar status: {http}/status
Tokens (valid 12 h) are in {env_file}:  set -a; . {env_file}; set +a

  curl -i -H "authorization: Bearer $ALICE" {base}/things/1                  # allowed (v1)
  curl -i -X PUT -H "authorization: Bearer $DAVE" {base}/things/1            # 403: dave lacks things:edit in v1
  curl -i -X PUT -H "authorization: Bearer $DAVE" -H "x-authz-shadow-version: v2" {base}/things/1  # 200, v2 decides
  curl -i -X PUT -H "authorization: Bearer $BOB" {base}/things/1             # 200: bob is in v2's 10% canary
  curl -i -H "authorization: Bearer $CAROL" {base}/accounts/acme/things      # scoped grant: allowed
  curl -i -H "authorization: Bearer $CAROL" {base}/accounts/globex/things    # other scope: 403
  curl -i {base}/things/1                                                     # 401: no identity
  curl -s {http}/metrics | grep authz_                                        # decisions, mismatches

The sets live in etcd ({mesh.etcd_endpoints}); change them with the control plane (venv's bin/):
  authz-sidecar ctl status --etcd {etcd}                            # what is active and live
  authz-sidecar ctl canary v2 --weight us-east=100 --etcd {etcd}    # v2 decides for everyone here
  authz-sidecar ctl registry get --etcd {etcd}                      # the registered permissions
Every sidecar follows within milliseconds; a bad document keeps the last good set serving (see
/status). Logs: {mesh.workdir}/*.log
"""


def main() -> int:
    parser = argparse.ArgumentParser(description="run a local mesh: upstream + authz-sidecar + Envoy")
    parser.add_argument("--check", action="store_true", help="run the demonstration, then stop")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs, tokens and configs go")
    parser.add_argument("--free-ports", action="store_true", help="free ports, not 8080, 9191, 9464, ... if free")
    args = parser.parse_args()
    stop_on_signals()
    owned = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="authz-mesh-"))
    mesh: Mesh | None = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        policy_dir = workdir / "policy"
        if not policy_dir.exists():
            shutil.copytree(EXAMPLE_POLICY, policy_dir)
        # OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 make run: Envoy and the sidecar trace to it.
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").split("://", 1)[-1].rstrip("/")
        host, _, port = endpoint.rpartition(":")
        collector = (host, int(port)) if host and port.isdigit() else None
        mesh = Mesh(workdir=workdir, policy_dir=policy_dir, collector=collector)
        print(f"starting upstream, authz-sidecar and Envoy (workdir {workdir}) ...")
        mesh.start(preferred=not (args.check or args.free_ports))
        print("what the mesh answers:")
        ok = demonstrate(mesh)
        status = json.loads(urllib.request.urlopen(f"http://{LOOPBACK}:{mesh.ports['http']}/status").read())
        print(f"sidecar: active {status['active_version']}, shadows {[s['version'] for s in status['shadows']]}")
        if args.check:
            return 0 if ok else 1
        print(instructions(mesh))
        while all(p.alive() for p in mesh.processes):
            time.sleep(0.2)
        dead = [p.name for p in mesh.processes if not p.alive()]
        print(f"stopped because {', '.join(dead)} exited; see {workdir}", file=sys.stderr)
        owned = False  # keep the logs to read
        return 1
    except StoppedError:
        return 0  # how the mesh is meant to be stopped
    except Exception:
        owned = False
        print(f"the mesh failed; its logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        ignore_stop_signals()
        if mesh is not None:
            mesh.stop()
        stop_unrecorded_children()
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)  # logs, configs, etcd's data, demo tokens
        with contextlib.suppress(OSError):
            os.sync()


if __name__ == "__main__":
    sys.exit(main())
