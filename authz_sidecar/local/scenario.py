"""``make scenario``: the controller proves itself on a live mesh, with nobody at the keyboard.

Real processes on 127.0.0.1: etcd; two regions (us-east, eu-west), each a demo upstream behind its
Envoy, which asks the region's sidecars; two controllers (one leads); and one load generator per
region sending steady traffic from hundreds of principals (:mod:`authz_sidecar.local.loadgen`).

1. An accident goes out: a change that declares one thing (a viewer gains the editor role) and also
   does another (viewers lose ``things:view``), accepted at propose time as undeclared. It is
   canaried at 10% in eu-west with a plan, and the controller must roll it back unaided.
2. The intended part alone is proposed again; it must go through every step of the same plan and be
   promoted, unaided.

Every answer the clients got is judged afterwards (:mod:`authz_sidecar.local.verdicts`) against
the sets stored in etcd and the pointer moves the audit recorded. It prints the timeline of each
phase (t=0 at the canary's start) and the counts, and exits non-zero when an assertion fails;
``requests.csv`` in the work directory has every request with its verdict (the answer expected
under the active set then, the answer got, the set that decided it when that can be told).

``--quick`` runs the same story smaller and faster for CI. Every process started is stopped by its
pid at the end, on failure and on Ctrl-C too; the work directory (logs, configs, records) is
removed unless the run failed or ``--workdir`` named it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from authz_sidecar.documents import load_document, parse_permission_set
from authz_sidecar.local import envoy
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.loadgen import LoadConfig
from authz_sidecar.local.mesh import (
    EXAMPLE_POLICY,
    render_envoy,
    run_ctl,
    sidecar_argv,
    upstream_argv,
)
from authz_sidecar.local.processes import (
    LOOPBACK,
    Process,
    StoppedError,
    free_port,
    ignore_stop_signals,
    interruptibly,
    stop_on_signals,
    stop_unrecorded_children,
    wait_for_http,
    wait_for_port,
)
from authz_sidecar.local.tokens import DemoIssuer
from authz_sidecar.local.verdicts import (
    LoggedMismatch,
    Observed,
    ReportPoint,
    Request,
    Route,
    SidecarView,
    Verdict,
    confirmed_by_log,
    first_rise,
    in_cohort,
    judge_all,
    share_bound,
    timeline_of,
)
from authz_sidecar.model.engine import CompiledSet, compile_set
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.plans import PlanStore
from authz_sidecar.store.policy import PolicyStore
from authz_sidecar.telemetry import logs

REGIONS = ("us-east", "eu-west")
CANARY_REGION = "eu-west"
PLAN = ("eu-west=10,50,100", "us-east=10,50,100")
PLAN_WEIGHTS: list[dict[str, int]] = [
    {"eu-west": 10},
    {"eu-west": 50},
    {"eu-west": 100},
    {"eu-west": 100, "us-east": 10},
    {"eu-west": 100, "us-east": 50},
    {"eu-west": 100, "us-east": 100},
]
FIRST_WEIGHT = 10
# The bound: the controller rolls a harmful change back within this many seconds of the
# first unexpected mismatch.
ROLLBACK_BOUND = 30.0
# Seconds either side of a request in which a pointer move may already (or still) have decided it:
# the audit's time is taken just before its transaction, and sidecars follow within milliseconds.
SLACK = 1.0
ROLES = {
    "viewer": ["things:view"],
    "editor": ["things:view", "things:edit"],
    "owner": ["things:view", "things:edit", "things:delete", "things:edit:locked"],
}
ROUTES = (
    Route("GET", "/things/{id}", "things:view", None, 5),
    Route("GET", "/things", "things:view", None, 2),
    Route("PUT", "/things/{id}", "things:edit", None, 2),
    Route("DELETE", "/things/{id}", "things:delete", None, 1),
    Route("GET", "/accounts/acme/things", "things:view", "account:acme", 1),
    Route("GET", "/accounts/globex/things", "things:view", "account:globex", 1),
)
PROBE_ROUTE = 2  # PUT /things/{id}: what the declared change lets its principal do


@dataclass(frozen=True)
class Mode:
    name: str
    principals: int
    rate: float  # requests per second over both regions
    sidecars_per_region: int
    controllers: int
    workers: int  # connections per region's load generator
    interval: str  # the plan's analysis interval
    tick: float  # the controller's
    min_evaluations: int  # per interval in the step's region
    warmup: float  # seconds of traffic before anything changes
    dark_launch: float  # seconds the accident is observed only, before its canary
    settle: float  # seconds of traffic after each phase ends
    phase_timeout: float
    probe_every: int  # one request in this many is the declared change's synthetic check

    def describe(self) -> str:
        return (
            f"{self.name}: {self.principals} principals, {self.rate:g} req/s asked, "
            f"{self.sidecars_per_region} sidecar(s) per region, {self.controllers} controllers, "
            f"plan interval {self.interval}, controller tick {self.tick:g}s"
        )


QUICK = Mode(
    name="quick",
    principals=120,
    rate=100,
    sidecars_per_region=1,
    controllers=2,
    workers=4,
    interval="1s",
    tick=0.5,
    min_evaluations=20,
    warmup=2.0,
    dark_launch=1.0,
    settle=1.5,
    phase_timeout=60.0,
    probe_every=25,
)
FULL = Mode(
    name="full",
    principals=600,
    rate=500,
    sidecars_per_region=2,
    controllers=2,
    workers=12,
    interval="10s",
    tick=1.0,
    min_evaluations=200,
    warmup=5.0,
    dark_launch=5.0,
    settle=3.0,
    phase_timeout=240.0,
    probe_every=50,
)


class ScenarioError(Exception):
    """The scenario could not be run to its end (as opposed to an assertion that failed)."""


# --- the permission sets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """Who is in the active set, and the change made to it."""

    principals: list[str]  # everyone who sends traffic, strangers (no grant) included
    grants: list[dict[str, Any]]
    declared: str  # the viewer the change makes an editor
    viewers: int

    @staticmethod
    def make(size: int, seed: int = 16) -> Population:
        """`size` principals with a grant (65% viewers, a tenth of them also editors of account:acme;
        25% editors; 10% owners), and 2% more with a valid token but no grant at all."""
        rng = random.Random(seed)  # noqa: S311 - a reproducible population, not a secret
        principals: list[str] = []
        grants: list[dict[str, Any]] = []
        declared = ""
        viewers = 0
        for i in range(size):
            name = f"user-{i:04d}"
            principals.append(name)
            draw = rng.random()
            if draw < 0.65:
                viewers += 1
                grants.append({"principal": name, "roles": ["viewer"]})
                if rng.random() < 0.1:
                    grants.append({"principal": name, "roles": ["editor"], "scope": "account:acme"})
                elif not declared:
                    declared = name
            elif draw < 0.9:
                grants.append({"principal": name, "roles": ["editor"]})
            else:
                grants.append({"principal": name, "roles": ["owner"]})
        principals += [f"stranger-{i:03d}" for i in range(max(1, size // 50))]
        return Population(principals, grants, declared, viewers)

    def active(self) -> dict[str, Any]:
        return {
            "version": "v1",
            "request_id": "CR-200",
            "author": "scenario",
            "reason": "the scenario's starting set",
            "roles": ROLES,
            "grants": self.grants,
        }

    def accident(self) -> dict[str, Any]:
        """Declares that `declared` becomes an editor; also, by mistake, empties the viewer role."""
        return {
            "version": "v2",
            "parent": "v1",
            "request_id": "CR-201",
            "author": "scenario",
            "reason": f"{self.declared} edits things",
            "roles": {**ROLES, "viewer": []},
            "grants": [*self.grants, {"principal": self.declared, "roles": ["editor"]}],
            "changes": [{"principal": self.declared, "grant": ["editor"]}],
        }

    def intended(self) -> dict[str, Any]:
        """The declared part alone, as a change file."""
        return {
            "version": "v3",
            "request_id": "CR-202",
            "author": "scenario",
            "reason": f"{self.declared} edits things (the intended part of CR-201 alone)",
            "changes": [{"principal": self.declared, "grant": ["editor"]}],
        }


# --- the processes ------------------------------------------------------------------------------


@dataclass
class SidecarProcess:
    name: str
    region: str
    grpc_port: int
    http_port: int
    process: Process

    def status(self) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.http_port}/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]


@dataclass
class RegionProcesses:
    name: str
    envoy_port: int
    sidecars: list[SidecarProcess] = field(default_factory=list)


class Stack:
    """Every process of the scenario; :meth:`stop` stops each by its pid, whatever was started."""

    def __init__(self, workdir: Path, mode: Mode) -> None:
        self.workdir = workdir
        self.mode = mode
        self.processes: list[Process] = []
        self.etcd: EtcdCluster | None = None
        self.regions: dict[str, RegionProcesses] = {}
        self.loadgens: dict[str, tuple[Process, Path]] = {}
        self.issuer = DemoIssuer()

    @property
    def endpoints(self) -> str:
        if self.etcd is None:
            raise ScenarioError("etcd is not started")
        return self.etcd.endpoints

    @property
    def sidecars(self) -> list[SidecarProcess]:
        return [s for r in self.regions.values() for s in r.sidecars]

    def ctl(self, *args: str) -> dict[str, Any]:
        return interruptibly(lambda: run_ctl(self.endpoints, *args))

    def spawn(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.workdir, env={"PYTHONUNBUFFERED": "1"})
        self.processes.append(process)
        return process

    def start(self, population: Population) -> None:
        self.etcd = EtcdCluster(self.workdir / "etcd")  # assigned first: stop() stops a half-started one
        self.etcd.start()
        catalog = EXAMPLE_POLICY / "catalog.yaml"
        self.ctl("registry", "put", "--file", str(catalog))
        active = write_json(self.workdir / "v1.json", population.active())
        self.ctl("init", "--file", str(active))
        jwks = self.issuer.write_jwks(self.workdir / "jwks.json")
        upstreams: dict[str, tuple[int, Process]] = {}
        for region in REGIONS:
            port = free_port()
            upstreams[region] = (port, self.spawn(f"upstream-{region}", upstream_argv(port)))
            self.regions[region] = RegionProcesses(region, free_port())
            for n in range(1, self.mode.sidecars_per_region + 1):
                name = f"sidecar-{region}-{n}"
                grpc_port, http_port = free_port(), free_port()
                argv = sidecar_argv(
                    grpc_port=grpc_port,
                    http_port=http_port,
                    etcd=self.endpoints,
                    catalog=catalog,
                    cache_file=self.workdir / f"{name}-cache.json",
                    region=region,
                    extra=("--report-interval", "0.5", "--log-decisions", "0"),
                )
                self.regions[region].sidecars.append(
                    SidecarProcess(name, region, grpc_port, http_port, self.spawn(name, argv))
                )
        for port, process in upstreams.values():
            wait_for_port(port, process)
        for side in self.sidecars:  # started together above; each is ready within seconds
            wait_for_http(f"http://{LOOPBACK}:{side.http_port}/readyz", side.process, timeout=60)
        for region, processes in self.regions.items():
            admin = free_port()
            config = render_envoy(
                self.workdir / f"envoy-{region}.yaml",
                listen_port=processes.envoy_port,
                admin_port=admin,
                authz_ports=[s.grpc_port for s in processes.sidecars],
                upstream_port=upstreams[region][0],
                jwks=jwks,
            )
            proxy = envoy.start(config, self.workdir, name=f"envoy-{region}")
            self.processes.append(proxy)
            wait_for_http(f"http://{LOOPBACK}:{admin}/ready", proxy, timeout=60)
        for n in range(self.mode.controllers):
            name = f"controller-{'abcdefgh'[n]}"
            self.spawn(
                name,
                [
                    sys.executable, "-m", "authz_sidecar", "controller", "--etcd", self.endpoints,
                    "--controller-id", name, "--tick", str(self.mode.tick), "--lease-ttl", "2",
                    "--dlq-file", str(self.workdir / f"{name}-dlq.json"),
                ],
            )  # fmt: skip

    def start_traffic(self, population: Population) -> None:
        tokens = [self.issuer.token(p, ttl=4 * 3600) for p in population.principals]
        probe = (population.principals.index(population.declared), PROBE_ROUTE)
        for n, region in enumerate(REGIONS):
            config = LoadConfig(
                port=self.regions[region].envoy_port,
                region=region,
                rate=self.mode.rate / len(REGIONS),
                workers=self.mode.workers,
                seed=n + 1,
                max_seconds=900.0,
                principals=population.principals,
                tokens=tokens,
                routes=[(r.method, r.path) for r in ROUTES],
                route_weights=[r.weight for r in ROUTES],
                probe=probe,
                probe_every=self.mode.probe_every,
            )
            path = write_json(self.workdir / f"load-{region}.json", config.__dict__)
            out = self.workdir / f"records-{region}.json"
            argv = [sys.executable, "-m", "authz_sidecar.local.loadgen", "--config", str(path), "--out", str(out)]
            self.loadgens[region] = (self.spawn(f"loadgen-{region}", argv), out)

    def check_alive(self) -> None:
        dead = [p.name for p in self.processes if not p.alive()]
        if dead:
            raise ScenarioError(f"{', '.join(dead)} exited; see {self.workdir}/*.log")

    def stop_traffic(self) -> dict[str, dict[str, Any]]:
        """Stop the load generators (SIGTERM: each writes its records and exits) and read them."""
        results = {}
        for region, (process, out) in self.loadgens.items():
            code = process.stop(timeout=30)
            if code != 0 or not out.exists():
                raise ScenarioError(f"the {region} load generator exited {code}:\n{process.log_tail()}")
            results[region] = json.loads(out.read_text())
        return results

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        if self.etcd is not None:
            self.etcd.stop()


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, indent=1))
    return path


# --- watching a phase ---------------------------------------------------------------------------


class Watcher:
    """Polls every sidecar's /status, the shadow's reports and its plan in the background."""

    def __init__(self, stack: Stack, version: str) -> None:
        self.stack = stack
        self.observed = Observed(version)
        self._pids = {s.process.pid: s.name for s in stack.sidecars}
        self._task: asyncio.Task[None] | None = None
        self._etcd: Etcd | None = None
        self.error: BaseException | None = None

    async def __aenter__(self) -> Watcher:
        self._etcd = Etcd(EtcdOptions(endpoints=(self.stack.endpoints,), timeout=2.0))
        await self._etcd.__aenter__()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._etcd is not None:
            await self._etcd.__aexit__(None, None, None)

    def _name(self, ident: str) -> str:
        """Ours for a report's sidecar id (``<service>@<host>:<pid>:<nonce>``), found by its pid."""
        for part in ident.split(":"):
            if part.isdigit() and int(part) in self._pids:
                return self._pids[int(part)]
        return ident

    async def _poll(self) -> None:
        assert self._etcd is not None  # noqa: S101 - set in __aenter__
        plans = PlanStore(PolicyStore(self._etcd))
        version = self.observed.version
        failures = 0
        while True:
            try:
                statuses = await asyncio.gather(*(asyncio.to_thread(s.status) for s in self.stack.sidecars))
                polled = time.time()
                for side, status in zip(self.stack.sidecars, statuses, strict=True):
                    shadow = next((s for s in status["shadows"] if s["version"] == version), None)
                    view = SidecarView(
                        polled,
                        float(status["installed_at"] or 0),
                        str(status["active_version"]),
                        None if shadow is None else float(shadow["weight_here"]),
                    )
                    seen = self.observed.views.setdefault(side.name, [])
                    if not seen or (seen[-1].active, seen[-1].weight) != (view.active, view.weight):
                        seen.append(view)
                for report in await plans.reports(version):
                    name = self._name(report.sidecar)
                    points = self.observed.reports.setdefault(name, [])
                    if not points or points[-1].at != report.at:
                        c = report.counters
                        points.append(ReportPoint(report.at, report.region, c.evaluations, c.unexpected))
                stored = await plans.get(version)
                if stored is not None:
                    row = (time.time(), stored.progress.state.value, stored.progress.step + 1, stored.progress.message)
                    if not self.observed.plan or self.observed.plan[-1][1:] != row[1:]:
                        self.observed.plan.append(row)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A sidecar or etcd slow to answer one poll on a busy machine is not a finding (the
                # times that matter come from the sidecars' own clocks); three seconds of it is.
                failures += 1
                if failures >= 30:
                    self.error = exc
                    return
            await asyncio.sleep(0.1)

    async def until(self, done: Callable[[Observed], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not done(self.observed):
            if self.error is not None:
                raise ScenarioError(f"watching {self.observed.version} failed: {self.error!r}")
            self.stack.check_alive()
            if time.monotonic() > deadline:
                moves = " | ".join(f"{state} {step}: {message}" for _t, state, step, message in self.observed.plan[-6:])
                raise ScenarioError(f"{what} did not happen within {within:.0f}s; the plan went: {moves}")
            await asyncio.sleep(0.1)

    async def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        await self.until(lambda _o: time.monotonic() >= end, seconds + 5, f"{seconds}s of traffic")


async def ctl(stack: Stack, *args: str) -> dict[str, Any]:
    return await asyncio.to_thread(run_ctl, stack.endpoints, *args)


def plan_flags(mode: Mode) -> list[str]:
    """The same plan for both changes. Inconclusive analyses (a step's first interval without a
    fresh report from every sidecar, on a busy machine) may come 20 times before it pauses, not 5:
    a pause would be a false failure of the scenario, not a finding."""
    return [
        "--plan", PLAN[0], "--then", PLAN[1], "--interval", mode.interval,
        "--min-evaluations", str(mode.min_evaluations), "--inconclusive-limit", "20",
    ]  # fmt: skip


@dataclass
class Phase:
    version: str
    proposed_at: float
    canary_at: float  # t=0 of the phase's timeline
    observed: Observed
    ended_at: float = 0.0
    audit: list[dict[str, Any]] = field(default_factory=list)


FINISHED = ("promoted", "rolled_back", "aborted", "dead_letter", "ended")


async def accident_phase(stack: Stack, population: Population) -> Phase:
    mode = stack.mode
    async with Watcher(stack, "v2") as watch:
        path = write_json(stack.workdir / "v2.json", population.accident())
        proposed_at = time.time()
        await ctl(stack, "propose", "--file", str(path), "--accept-undeclared")
        await watch.run_for(mode.dark_launch)
        canary_at = time.time()
        await ctl(stack, "canary", "v2", *plan_flags(mode), "--request-id", "CANARY-201")

        def over(o: Observed) -> bool:
            return o.state in FINISHED and o.everywhere(lambda v: v.weight is None)

        await watch.until(over, mode.phase_timeout, "v2's plan finishing and every sidecar dropping v2")
        ended_at = time.time()
        await watch.run_for(mode.settle)
    return Phase("v2", proposed_at, canary_at, watch.observed, ended_at)


async def intended_phase(stack: Stack, population: Population) -> Phase:
    mode = stack.mode
    async with Watcher(stack, "v3") as watch:
        path = write_json(stack.workdir / "v3.json", population.intended())
        proposed_at = time.time()
        await ctl(stack, "propose", "--file", str(path))
        canary_at = time.time()
        await ctl(stack, "canary", "v3", *plan_flags(mode), "--request-id", "CANARY-202")

        def over(o: Observed) -> bool:
            if o.state in FINISHED and o.state != "promoted":
                raise ScenarioError(f"v3's plan ended {o.state}: {o.plan[-1][3]}")
            return o.state == "promoted" and o.everywhere(lambda v: v.active == "v3")

        await watch.until(over, mode.phase_timeout, "v3's promotion reaching every sidecar")
        ended_at = time.time()
        await watch.run_for(mode.settle)
    return Phase("v3", proposed_at, canary_at, watch.observed, ended_at)


# --- judging ------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Outcome:
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def say(self, line: str = "") -> None:
        self.lines.append(line)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, passed, detail))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def requests_of(results: dict[str, dict[str, Any]], population: Population) -> list[Request]:
    requests = []
    for region, result in results.items():
        for sent, answered, principal, route, status, version, reason in result["records"]:
            who = population.principals[principal]
            requests.append(Request(sent, answered, region, who, ROUTES[route], status, version, reason))
    requests.sort(key=lambda r: r.sent)
    return requests


def mismatch_log(sidecars: Sequence[SidecarProcess]) -> list[LoggedMismatch]:
    """Every mismatch the sidecars logged: which set each enforced, for the denials a client
    cannot see the set of (a 403 names no set)."""
    found: list[LoggedMismatch] = []
    for side in sidecars:
        with contextlib.suppress(OSError), side.process.log_path.open() as lines:
            for line in lines:
                if '"mismatch"' in line:
                    entry = LoggedMismatch.parse(line, side.name)
                    if entry is not None:
                        found.append(entry)
    return found


def at(t: float, zero: float) -> str:
    return f"{t - zero:+8.2f}"


def describe(v: Verdict) -> str:
    r = v.request
    answer = f"{r.status} {r.reason or r.version}".strip()
    return f"{r.principal} {r.route} in {r.region}: {answer}"


def of_version(records: Sequence[dict[str, Any]], version: str) -> list[dict[str, Any]]:
    return [r for r in records if (r.get("version") or str(r.get("subject", "")).split(":")[0]) == version]


def say_timeline(out: Outcome, events: list[tuple[float, str]], zero: float) -> None:
    out.say("  t (s)     event")
    for t, text in sorted(events, key=lambda e: _nan_last(e[0])):
        out.say(f"  {at(t, zero)}  {text}")


@dataclass(frozen=True)
class Incident:
    """The times phase 1 is judged on (NaN when it never happened)."""

    applied: float  # the first step's audit record
    first_mismatch: float  # the earlier of: a report since the step showing new ones, a wrong denial's answer
    rollback: float  # the rollback's audit record
    stopped: float  # the last sidecar installed a snapshot without v2


def accident_timeline(out: Outcome, phase: Phase, verdicts: list[Verdict], mode: Mode) -> Incident:
    records = of_version(phase.audit, "v2")
    steps = [r for r in records if r["action"] == "canary"]
    rollback = next((r for r in records if r["action"] == "rollback"), None)
    obs = phase.observed
    applied = steps[0]["at"] if steps else math.nan
    events = [(phase.proposed_at, "v2 proposed: observed beside v1 everywhere, decides nothing")]
    dark = [p for points in obs.reports.values() for p in points if p.unexpected > 0]
    if dark:
        first = min(dark, key=lambda p: p.at)
        events.append((first.at, f"first unexpected mismatch in a report ({first.region}; observed, not enforced)"))
    events.append((phase.canary_at, f"ctl canary v2 --plan {PLAN[0]} --then {PLAN[1]} --interval {mode.interval}"))
    events += [(s["at"], f"step applied (audit, {s.get('who')}): {s.get('weights')}") for s in steps]
    enforcing = [(v.installed_at, n) for n, views in obs.views.items() for v in views if v.weight]
    if enforcing:
        events.append((min(enforcing)[0], f"first sidecar enforcing v2 ({min(enforcing)[1]})"))
    rises = [
        rise
        for points in obs.reports.values()
        if points and points[0].region == CANARY_REGION
        for rise in [first_rise(points, applied)]
        if rise is not None
    ]
    first_report = min((point.at for point, _base in rises), default=math.nan)
    if rises:
        point, base = min(rises, key=lambda r: r[0].at)
        events.append(
            (point.at, f"first report since the step with unexpected mismatches (+{point.unexpected - base})")
        )
    by_v2 = [v for v in verdicts if v.decided_by == "v2"]
    wrong = [v for v in verdicts if v.wrongly_denied and v.request.sent <= phase.ended_at + SLACK]
    # Answers, not requests, are what traffic shows: a request sent before the step may be decided
    # after it.
    if by_v2:
        first_v2 = min(by_v2, key=lambda v: v.request.answered)
        events.append((first_v2.request.answered, f"first answer decided by v2 ({describe(first_v2)})"))
        events.append((max(v.request.answered for v in by_v2), "last answer decided by v2"))
    first_wrong = min((v.request.answered for v in wrong), default=math.nan)
    if wrong:
        hurt = min(wrong, key=lambda v: v.request.answered)
        events.append((hurt.request.answered, f"first answer wrongly denying ({describe(hurt)})"))
    if rollback is not None:
        reason = (rollback.get("analysis") or {}).get("reason") or rollback.get("reason")
        events.append((rollback["at"], f"rollback (audit, {rollback.get('who')}): {reason}"))
    stopped = max(
        (
            next((v.installed_at for v in views if v.weight is None and v.polled > phase.canary_at), math.nan)
            for views in obs.views.values()
        ),
        default=math.nan,
        key=_nan_last,
    )
    events.append((stopped, "every sidecar has stopped enforcing v2 (installed a snapshot without it)"))
    say_timeline(out, events, phase.canary_at)
    return Incident(
        applied=applied,
        first_mismatch=min(first_report, first_wrong, key=_nan_last),
        rollback=rollback["at"] if rollback is not None else math.nan,
        stopped=stopped,
    )


def judge_accident(out: Outcome, phase: Phase, verdicts: list[Verdict], population: Population, mode: Mode) -> None:
    out.say(f"phase 1: an accident accepted at propose time, canaried at {FIRST_WEIGHT}% in {CANARY_REGION}")
    out.say(
        f"  v2 declares: {population.declared} gains editor; accepted, undeclared: the viewer role loses "
        f"things:view ({population.viewers} viewers)"
    )
    incident = accident_timeline(out, phase, verdicts, mode)
    records = of_version(phase.audit, "v2")
    steps = [r.get("weights") for r in records if r["action"] == "canary"]
    rollback = next((r for r in records if r["action"] == "rollback"), {})
    here = [v for v in verdicts if v.request.region == CANARY_REGION]
    window = [v for v in here if incident.applied <= v.request.sent <= incident.stopped]
    cohort = {p for p in population.principals if in_cohort(p, "v2", FIRST_WEIGHT)}
    wrong_here = [v for v in here if v.wrongly_denied and v.request.sent <= phase.ended_at + SLACK]
    wrong_elsewhere = [v for v in verdicts if v.wrongly_denied and v.request.region != CANARY_REGION]
    bound = share_bound(FIRST_WEIGHT, len(population.principals), len(window))
    out.say(
        f"  counts: {len(window)} {CANARY_REGION} requests from the step until the last sidecar stopped; the "
        f"{FIRST_WEIGHT}% cohort is {len(cohort)}/{len(population.principals)} principals, who sent "
        f"{sum(v.request.principal in cohort for v in window)} of them; decided by v2: "
        f"{sum(v.decided_by == 'v2' for v in verdicts)}; wrongly denied: {len(wrong_here)} in {CANARY_REGION} "
        f"(bound {bound}), {len(wrong_elsewhere)} elsewhere"
    )
    rolled = incident.rollback - incident.first_mismatch
    out.check(
        "the controller rolled v2 back unaided",
        phase.observed.state == "rolled_back" and str(rollback.get("who", "")).startswith("controller"),
        f"plan {phase.observed.state}; rollback by {rollback.get('who')}",
    )
    out.check(
        f"rollback within {ROLLBACK_BOUND:.0f} s of the first unexpected mismatch",
        rolled <= ROLLBACK_BOUND,
        f"{rolled:.2f} s (first mismatch at t={at(incident.first_mismatch, phase.canary_at).strip()} s)",
    )
    out.check("only the plan's first step was applied", steps == [PLAN_WEIGHTS[0]], f"steps: {steps}")
    out.check(
        f"wrongly denied in {CANARY_REGION} within the canary's share of its traffic",
        len(wrong_here) <= bound and all(v.request.principal in cohort for v in wrong_here),
        f"{len(wrong_here)} <= {bound} ({FIRST_WEIGHT}% of {len(window)} requests + 3 sd), each from the cohort",
    )
    out.check("none wrongly denied outside the canary region", not wrong_elsewhere, str(len(wrong_elsewhere)))
    # Strict, no slack: the audit's time is taken before the step's transaction, and a sidecar's
    # installed_at after its swap, on the clock the load generators use.
    outside = [
        v
        for v in verdicts
        if v.decided_by == "v2" and not (incident.applied <= v.request.answered and v.request.sent <= incident.stopped)
    ]
    out.check(
        "v2 decided only between its step's record and the last sidecar dropping it",
        not outside,
        f"{len(outside)} outside" + (f", e.g. {_sample(outside)}" if outside else ""),
    )


def judge_intended(out: Outcome, phase: Phase, verdicts: list[Verdict], status: dict[str, Any]) -> None:
    records = of_version(phase.audit, "v3")
    steps = [r for r in records if r["action"] == "canary"]
    promotions = [r for r in records if r["action"] == "promote"]
    out.say()
    out.say("phase 2: the intended part alone, through every step of the same plan")
    events = [
        (phase.proposed_at, "v3 proposed (a change file: the declared grant only)"),
        (phase.canary_at, f"ctl canary v3 --plan {PLAN[0]} --then {PLAN[1]}"),
    ]
    events += [(s["at"], f"{s.get('subject')} applied (audit, {s.get('who')}): {s.get('weights')}") for s in steps]
    events += [(p["at"], f"promoted (audit, {p.get('who')}): {p.get('reason')}") for p in promotions]
    installed = [
        next((v.installed_at for v in views if v.active == "v3"), math.nan) for views in phase.observed.views.values()
    ]
    events.append((max(installed, default=math.nan, key=_nan_last), "every sidecar decides with v3 as the active set"))
    say_timeline(out, events, phase.canary_at)
    in_phase = [v for v in verdicts if phase.proposed_at <= v.request.sent]
    by_v3 = Counter(v.request.region for v in in_phase if v.request.version == "v3")
    wrong = [v for v in in_phase if v.wrongly_denied]
    out.say(
        f"  counts: {len(in_phase)} requests; allowed with v3 deciding: {dict(sorted(by_v3.items()))}; "
        f"wrongly denied: {len(wrong)}"
    )
    subjects = Counter(s.get("subject") for s in steps)
    out.check(
        "each step of v3's plan appears once in the audit, in order",
        [s.get("weights") for s in steps] == PLAN_WEIGHTS
        and all(subjects[f"v3:step{i}"] == 1 for i in range(1, len(PLAN_WEIGHTS) + 1)),
        ", ".join(str(s.get("subject")) for s in steps),
    )
    out.check(
        "v3 promoted once, by a controller",
        len(promotions) == 1 and str(promotions[0].get("who", "")).startswith("controller"),
        f"{len(promotions)} promotion(s)",
    )
    out.check(
        "the active set is v3",
        status.get("active") == "v3" and "v3" not in status.get("shadows", {}),
        f"active {status.get('active')}",
    )
    out.check("nothing wrongly denied while v3 went out", not wrong, str(len(wrong)))


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def judge_traffic(
    out: Outcome, verdicts: list[Verdict], results: dict[str, dict[str, Any]], logged: Sequence[LoggedMismatch]
) -> None:
    out.say()
    rates = []
    for region, result in sorted(results.items()):
        seconds = result["stopped_at"] - result["started_at"]
        rates.append((region, len(result["records"]) / seconds, result["rate"], result["late_p99_ms"]))
    latencies = sorted(v.request.answered - v.request.sent for v in verdicts)
    p50 = latencies[len(latencies) // 2] * 1e3 if latencies else math.nan
    p99 = latencies[int(len(latencies) * 0.99)] * 1e3 if latencies else math.nan
    errors = [v for v in verdicts if v.error]
    unexplained = [v for v in verdicts if v.unexplained]
    decided = Counter(v.decided_by or "either" for v in verdicts if not v.error)
    denied_by_v2 = [v for v in verdicts if v.decided_by == "v2" and v.request.status == 403]
    confirmed = confirmed_by_log(denied_by_v2, logged)
    out.say(
        f"traffic: {len(verdicts)} requests; "
        + "; ".join(f"{r} {got:.1f}/s of {asked:g}/s asked (late p99 {late:.1f} ms)" for r, got, asked, late in rates)
        + f"; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    out.say(
        f"  answers: {dict(sorted(Counter(v.request.status for v in verdicts).items()))}; decided by: "
        f"{dict(sorted(decided.items()))} (either: the live sets agreed); errors: {len(errors)}"
    )
    out.say(f"  v2's denials its deciding sidecar logged as enforced by v2: {len(confirmed)}/{len(denied_by_v2)}")
    for region, got, asked, _late in rates:
        out.check(f"{region} got the rate asked", got >= 0.95 * asked, f"{got:.1f}/s of {asked:g}/s")
    out.check(
        "every request was answered by a sidecar's decision",
        not errors,
        f"{len(errors)} not" + (f", e.g. {_sample(errors)}" if errors else ""),
    )
    out.check(
        "every answer is one a live set gives for that principal then (no half-written set)",
        not unexplained,
        f"{len(unexplained)} unexplained" + (f", e.g. {_sample(unexplained)}" if unexplained else ""),
    )
    out.check(
        "each denial by v2 is in its deciding sidecar's mismatch log as enforced by v2",
        len(confirmed) == len(denied_by_v2),
        f"{len(confirmed)}/{len(denied_by_v2)}",
    )


def _sample(verdicts: Sequence[Verdict]) -> str:
    return "; ".join(f"{describe(v)} (could decide: {', '.join(v.candidates)})" for v in verdicts[:3])


# --- the run ------------------------------------------------------------------------------------


def run(mode: Mode, workdir: Path) -> Outcome:
    out = Outcome()
    population = Population.make(mode.principals)
    stack = Stack(workdir, mode)
    # ctl runs in this process and logs each audit record: to a file, not over the timeline.
    log_file = (workdir / "ctl.log").open("a")
    logs.configure("info")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=log_file))
    try:
        print(f"scenario ({mode.describe()}); workdir {workdir}", flush=True)
        started = time.monotonic()
        stack.start(population)
        print(f"  started {len(stack.processes)} processes in {time.monotonic() - started:.1f}s", flush=True)
        stack.start_traffic(population)
        time.sleep(mode.warmup)
        stack.check_alive()
        print("  phase 1: the accident, canaried ...", flush=True)
        accident = interruptibly(lambda: asyncio.run(accident_phase(stack, population)))
        print(f"  phase 1 over: v2 {accident.observed.state}; phase 2: the intended part ...", flush=True)
        intended = interruptibly(lambda: asyncio.run(intended_phase(stack, population)))
        print(f"  phase 2 over: v3 {intended.observed.state}; judging every answer ...", flush=True)
        results = stack.stop_traffic()
        audit = stack.ctl("audit", "--last", "1000")["records"]
        status = stack.ctl("status")
        sets = interruptibly(lambda: asyncio.run(stored_sets(stack.endpoints, ("v1", "v2", "v3"))))
        logged = mismatch_log(stack.sidecars)
    finally:
        stack.stop()
        log_file.close()
    accident.audit = intended.audit = audit
    verdicts = judge_all(requests_of(results, population), sets, timeline_of(audit), SLACK)
    write_verdicts(workdir / "requests.csv", verdicts)
    judge_accident(out, accident, verdicts, population, mode)
    judge_intended(out, intended, verdicts, status)
    judge_traffic(out, verdicts, results, logged)
    return out


def write_verdicts(path: Path, verdicts: Sequence[Verdict]) -> None:
    """Every request and its verdict, one row each, for a person to dig into (kept with the work
    directory when a run fails, or with --workdir)."""
    with path.open("w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(
            ["sent", "answered", "region", "principal", "request", "expected", "status", "set_version", "reason",
             "decided_by", "could_decide", "wrongly_denied", "unexplained", "error"]
        )  # fmt: skip
        for v in verdicts:
            r = v.request
            rows.writerow(
                [f"{r.sent:.6f}", f"{r.answered:.6f}", r.region, r.principal, str(r.route),
                 "allow" if v.expected_allow else "deny", r.status, r.version, r.reason, v.decided_by or "",
                 " ".join(v.candidates), int(v.wrongly_denied), int(v.unexplained), int(v.error)]
            )  # fmt: skip


async def stored_sets(endpoints: str, versions: Sequence[str]) -> dict[str, CompiledSet]:
    """The sets exactly as etcd holds them (what every sidecar compiled)."""
    async with Etcd(EtcdOptions(endpoints=(endpoints,))) as etcd:
        store = PolicyStore(etcd)
        return {v: compile_set(parse_permission_set(load_document(await store.document(v), v), v)) for v in versions}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="the controller's scenario: an accident rolled back, a change promoted"
    )
    parser.add_argument("--quick", action="store_true", help="CI's version: 100 req/s, 1 s intervals")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs, configs and records go (kept)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    owned = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="authz-scenario-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop_on_signals()
    started = time.monotonic()
    failed = True
    stopped = False
    try:
        outcome = run(mode, workdir)
        failed = not outcome.passed
        show(outcome, f"scenario ({mode.name})", time.monotonic() - started)
    except StoppedError:
        failed, stopped = False, True
        print("scenario: stopped before its end", file=sys.stderr)
    except ScenarioError as exc:
        print(f"scenario: {exc}", file=sys.stderr)
    finally:
        ignore_stop_signals()
        stop_unrecorded_children()
        if failed:  # kept, whoever made it: the logs say why
            print(f"(logs, configs and records in {workdir})", file=sys.stderr)
        elif owned:
            shutil.rmtree(workdir, ignore_errors=True)
    return 130 if stopped else int(failed)


def show(outcome: Outcome, title: str, seconds: float) -> None:
    print()
    for line in outcome.lines:
        print(line)
    print()
    for check in outcome.checks:
        print(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    passed = sum(c.passed for c in outcome.checks)
    print(f"\n{title}: {passed} passed, {len(outcome.checks) - passed} failed in {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
