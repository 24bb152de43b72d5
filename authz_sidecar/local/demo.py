"""``make demo`` (``authz-sidecar mesh demo``): the story of a change, told on the running mesh.

What the README says in words, done for real on ``make run``'s two regions and narrated with the
output of the commands an operator would type:

1. a change is proposed (a new hire becomes a viewer) and ``ctl propose`` prints its exact plan;
2. it is canaried in eu-west only, by the controller, with a rollout plan (``ctl canary --plan``)
   while traffic flows through both Envoys: eu-west's answers change for the new hire, us-east's
   do not change at all;
3. the evidence (``ctl report``, ``ctl analyze``) and the promotion by the controller, which a
   confirm-promotion webhook served here holds until that evidence has been shown (otherwise a
   short interval could promote before ``ctl report`` runs, and a report of a set no longer live
   cannot be read);
4. a mistaken change (the viewer role loses ``things:view``): canaried the same way, rolled back
   by the controller within seconds on its own, the reason read back from ``ctl status`` and the
   audit.

The mesh is found through ``mesh up``'s state file; with none running, one is started for the
demo's own duration (and stopped after it). Every wait is bounded: a step that does not happen in
time ends the demo with exit 1 and what the plan was doing. The changes are computed against
whatever set is active, with versions not yet stored, so the demo runs again on the same mesh.
``--quick`` is the same story with one-step plans and short intervals, for CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
import yaml

from authz_sidecar import cli
from authz_sidecar.local.answers import REQUESTS, Answer, Traffic, changed, describe_changes, usual_answers
from authz_sidecar.local.mesh import EXAMPLE_POLICY
from authz_sidecar.local.meshstate import read_state
from authz_sidecar.local.narration import Ctl, DemoError, Narrator, PlanWatch, until
from authz_sidecar.local.otlpprobe import Traces
from authz_sidecar.local.portplan import REGIONS, PortPlan
from authz_sidecar.local.processes import (
    LOOPBACK,
    StoppedError,
    ignore_stop_signals,
    interruptibly,
    stop_on_signals,
    stop_unrecorded_children,
)
from authz_sidecar.local.regions import RegionalMesh
from authz_sidecar.local.tokens import DEMO_PRINCIPALS, DemoIssuer
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.policy import PolicyStore
from authz_sidecar.telemetry import logs

CANARY_REGION = "eu-west"
STEADY_REGION = "us-east"
# The new hire is the first of these the active set does not know yet (the demo runs again).
NEW_HIRES = ("erin", "frank", "grace", "heidi", "ivan", "judy", "mallory-2", "niaj", "olivia", "peggy")


@dataclass(frozen=True)
class Pace:
    """How fast the story goes."""

    name: str
    rate: float  # requests per second through each Envoy
    rounds: int  # rounds of every (principal, request) before anything changes
    interval: str  # the rollout plans' analysis interval
    good_plan: str
    bad_plan: str
    min_evaluations: int  # per interval, in the step's region
    step_timeout: float  # seconds any one thing the controller does may take
    analyze: bool  # also show `ctl analyze`


FULL = Pace("full", 20.0, 2, "5s", "eu-west=50,100", "eu-west=10,50,100", 20, 60.0, analyze=True)
QUICK = Pace("quick", 20.0, 1, "2s", "eu-west=100", "eu-west=10,100", 10, 30.0, analyze=False)
# The denial budget both plans get: small enough that a change taking a permission from a few
# people fails its first analysis, as it would with a real budget and real traffic.
MAX_DENIED_REQUESTS = 5
MAX_DENIED_PRINCIPALS = 2


@dataclass(frozen=True)
class DemoOptions:
    """``authz-sidecar mesh demo``'s flags."""

    state: Path
    quick: bool = False


# --- the mesh it drives -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The running mesh, as far as the demo needs it."""

    etcd: str
    envoys: Mapping[str, str]  # region -> Envoy's base URL
    issuer: DemoIssuer
    origin: str
    owned: bool = False  # started by the demo, and stopped when it ends

    @staticmethod
    def from_state(path: Path, state: Mapping[str, Any]) -> Target:
        envoys = {region: str(state["regions"][region]["envoy_url"]) for region in REGIONS}
        issuer = DemoIssuer.from_key(Path(state["issuer_key"]))
        return Target(str(state["etcd"]), envoys, issuer, f"the mesh of 'mesh up' (pid {state['pid']}, state {path})")

    @staticmethod
    def of(mesh: RegionalMesh) -> Target:
        envoys = {region: mesh.envoy_url(region) for region in REGIONS}
        return Target(mesh.endpoints, envoys, mesh.issuer, "a mesh started for this demo", owned=True)


async def _survey(endpoints: str, count: int) -> tuple[str, set[str], list[str]]:
    """The active version, the principals its grants name, and `count` versions ``vN`` not
    stored yet (the next after the highest stored, so a rerun never reuses one)."""
    async with Etcd(EtcdOptions(endpoints=(endpoints,))) as etcd:
        store = PolicyStore(etcd)
        pointers = await store.pointers()
        if pointers.active is None:
            raise DemoError("the mesh has no active set (was it seeded?)")
        active = await store.permission_set(pointers.active)
        free: list[str] = []
        for n in itertools.count(3):
            if await etcd.get(store.layout.head(f"v{n}")) is None:
                free.append(f"v{n}")
                if len(free) == count:
                    break
            else:
                free.clear()
        return pointers.active, {g.principal for g in active.grants}, free


# --- the promotion's gate ---------------------------------------------------------------------


class PromotionGate:
    """The confirm-promotion webhook, served on loopback: 409 until the demo has shown the
    evidence, then 2xx. A real release gate does the same with a person's approval."""

    def __init__(self) -> None:
        self.open = threading.Event()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if gate.open.is_set():
                    self.send_response(200)
                    body = b"confirmed by make demo\n"
                else:
                    self.send_response(409)
                    body = b"make demo has not shown the evidence yet\n"
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/confirm"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PromotionGate:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the story ----------------------------------------------------------------------------------


@dataclass
class Story:
    target: Target
    pace: Pace
    workdir: Path
    narrator: Narrator = field(default_factory=Narrator)

    def __post_init__(self) -> None:
        self.ctl = Ctl(self.target.etcd, self.narrator)
        # Request ids are the idempotency keys of the changes: a rerun's must differ.
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.live: set[str] = set()  # the shadows live (not stale) when the demo began

    def change_file(self, name: str, document: dict[str, Any]) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=200))
        self.narrator.note(f"{path}:")
        for line in path.read_text().splitlines():
            self.narrator.note(f"  {line}")
        return path

    def plan_flags(self, plan: str) -> list[str]:
        return [
            "--plan", plan, "--interval", self.pace.interval, "--min-evaluations", str(self.pace.min_evaluations),
            "--max-denied-requests", str(MAX_DENIED_REQUESTS), "--max-denied-principals", str(MAX_DENIED_PRINCIPALS),
            "--inconclusive-limit", "20",
        ]  # fmt: skip

    def run(self) -> None:
        say, note, pace = self.narrator.say, self.narrator.note, self.pace
        active, principals, (good, bad) = interruptibly(lambda: asyncio.run(_survey(self.target.etcd, 2)))
        hire = next((p for p in NEW_HIRES if p not in principals), None)
        if hire is None:
            raise DemoError(f"every name the demo hires ({', '.join(NEW_HIRES)}) is in {active} already")
        say(f"make demo ({pace.name}): a change's way out, on {self.target.origin}")
        say("  " + ", ".join(f"{r} Envoy {u}" for r, u in self.target.envoys.items()) + f"; etcd {self.target.etcd}")

        self.narrator.step(1, "Where things stand")
        before = self.ctl.show("status", keys=("active", "shadows", "locks", "controller"))
        self.live = {str(v) for v, s in (before.get("shadows") or {}).items() if s.get("state") != "stale"}
        who = [*DEMO_PRINCIPALS, hire]
        note(
            f"Traffic starts through both Envoys: {', '.join(who)} ({hire} is not in {active}), each sending "
            f"{', '.join(f'{m} {p}' for m, p in REQUESTS)}, {pace.rate:g} requests/s per region."
        )
        with Traffic(self.target.envoys, self.target.issuer, who, pace.rate) as traffic, PromotionGate() as gate:
            traffic.wait_rounds(pace.rounds, 30)
            promoted_at = self.good_change(traffic, gate, active, good, hire)
            self.mistake(traffic, good, bad, settled=promoted_at + 0.5)
        say()
        say(f"demo: done in {self.narrator.elapsed():.1f}s")
        note(
            f"{good} went out in {CANARY_REGION} first and was promoted by the controller on evidence; {bad}, "
            f"which took things:view from viewers, was rolled back by it alone."
        )
        if not self.target.owned:
            note(f"The mesh runs on with {good} active: ctl status, ctl history and ctl audit --verify show it all.")

    def good_change(self, traffic: Traffic, gate: PromotionGate, active: str, version: str, hire: str) -> float:
        """Propose, canary in eu-west, show the evidence, let the controller promote; when it did."""
        note, pace = self.narrator.note, self.pace
        self.narrator.step(2, f"A change is proposed: {hire} joins the team as a viewer")
        path = self.change_file(
            version,
            {
                "version": version,
                "request_id": f"DEMO-{self.stamp}-{version}",
                "reason": f"{hire} joins the team and reads things",
                "author": "make-demo",
                "changes": [{"principal": hire, "grant": ["viewer"]}],
            },
        )
        proposed = self.ctl.show("propose", "--file", str(path))
        listed = (proposed.get("plan") or {}).get("listed") or []
        note(f"The plan is computed from {active} and {version}, never sampled: {', '.join(listed) or 'nothing'}.")
        note(f"{version} is live: every sidecar evaluates it beside {active} (dark launch); it decides for nobody.")

        self.narrator.step(3, f"Its rollout: {CANARY_REGION} only, run by the controller on evidence")
        canary_at = time.time()
        self.ctl.show(
            "canary", version, *self.plan_flags(pace.good_plan), "--confirm-promotion-url", gate.url,
        )  # fmt: skip
        note(
            f"The promotion waits for a confirm-promotion webhook ({gate.url}, served by this demo) until the "
            "evidence below has been shown."
        )
        watch = PlanWatch(self.ctl, self.narrator, version, canary_at)
        watch.until(lambda p: bool(p.get("moves")), pace.step_timeout, f"the controller's first step of {version}")
        until(
            lambda: any(a.decided == version for a in traffic.answers(CANARY_REGION, since=canary_at)),
            pace.step_timeout,
            f"an answer decided by {version} in {CANARY_REGION}",
        )
        watch.until(lambda p: p.get("step") == p.get("steps"), pace.step_timeout * 3, f"{version}'s last step")
        until(
            lambda: float(self.ctl.json("report", version).get("coverage") or 0) >= 1.0,
            pace.step_timeout,
            f"the sidecars' reports showing {version}'s whole impact exercised",
            poll=0.3,
        )

        if pace.analyze:  # shown once it says what the controller will find at the interval's end
            until(
                lambda: self.ctl.json("analyze", version).get("outcome") == "Successful",
                pace.step_timeout,
                f"an analysis of {version}'s last step that passes every gate",
                poll=0.3,
            )
        self.narrator.step(4, "The evidence the controller judges")
        self.ctl.show("report", version)
        if pace.analyze:
            self.ctl.show("analyze", version)
        gate.open.set()
        note("Confirmed: the next Successful analysis promotes.")
        watch.until(lambda p: p.get("state") == "promoted", pace.step_timeout * 2, f"{version}'s promotion")
        promotion = self.audited(version, "promote")
        promoted_at = float(promotion["at"])

        self.narrator.step(5, f"What each region answered while {version} was canaried (against the answers before)")
        self.compare(traffic, canary_at, promoted_at, version, hire, expect_changed=hire)
        self.narrator.step(6, f"{version} promoted by the controller")
        self.ctl.show("status", keys=("active", "shadows", "locks", "plans"), plan_of=version)
        traffic.wait_round_since(promoted_at + 0.5, 30)
        after = [a for a in traffic.answers(since=promoted_at + 0.5) if a.principal == hire]
        for region in REGIONS:
            note(f"{hire} now, in {region}: {usual_answers([a for a in after if a.region == region], hire)}", hang=4)
        reads = [a for a in after if a.request == "GET /things/{id}"]
        if not reads or any(a.shown() != f"200 {version}" for a in reads):
            raise DemoError(f"{hire} should read things in both regions now, by {version}: {reads[:4]}")
        stale = [str(v) for v in promotion.get("made_stale") or [] if v in self.live]
        if stale:
            note(
                f"{', '.join(stale)} was proposed against {active}: the promotion made it stale (no weight, never "
                f"enforced again); 'ctl propose --rebase {stale[0]}' would carry its change onto {version}."
            )
        return promoted_at

    def mistake(self, traffic: Traffic, parent: str, version: str, *, settled: float) -> None:
        """Propose a change that takes a permission people use, canary it the same way, and watch
        the controller roll it back alone; `settled`: answers from then on are `parent`'s."""
        note, pace = self.narrator.note, self.pace
        self.narrator.step(7, "A mistaken change: the viewer role loses things:view")
        path = self.change_file(
            version,
            {
                "version": version,
                "request_id": f"DEMO-{self.stamp}-{version}",
                "reason": "viewers only list things",
                "author": "make-demo",
                "changes": [{"role": "viewer", "remove": ["things:view"]}],
            },
        )
        before_at = time.time()
        proposed = self.ctl.show("propose", "--file", str(path))
        plan = proposed.get("plan") or {}
        note(f"The plan says it plainly ({plan.get('principals')} principals lose things:view). Out it goes anyway:")
        canary_at = time.time()
        self.ctl.show("canary", version, *self.plan_flags(pace.bad_plan))
        watch = PlanWatch(self.ctl, self.narrator, version, canary_at)
        watch.until(
            lambda p: p.get("state") == "rolled_back", pace.step_timeout, f"the controller rolling {version} back"
        )
        rolled_at = float(self.audited(version, "rollback")["at"])
        note(f"Rolled back by the controller {rolled_at - canary_at:.1f}s after the canary started.")
        self.narrator.step(8, f"Why, from ctl status and the audit; and what {version} did meanwhile")
        self.ctl.show("status", keys=("active", "shadows", "plans"), plan_of=version)
        self.show_audit(4)
        baseline = traffic.answers(since=settled, until=before_at)
        hurt = self.compare_regions(baseline, canary_at, rolled_at, traffic)
        share = pace.bad_plan.split("=")[1].split(",")[0]
        decided = (
            f"it decided for {' and '.join(sorted(hurt))} (their bucket is in its share: the answers above)"
            if hurt
            else "it decided for nobody here: none of these principals falls in its share"
        )
        note(
            f"At {share}% of {CANARY_REGION}, {decided}. The controller judged more than that: every sidecar there "
            f"evaluates {version} beside {parent} on each request (the dark launch), and what {version} would have "
            f"denied went over the plan's budget ({MAX_DENIED_REQUESTS} requests, {MAX_DENIED_PRINCIPALS} principals)."
        )
        traffic.wait_round_since(rolled_at + 1.0, 30)
        back = changed(
            [a for a in baseline if a.region == CANARY_REGION],
            traffic.answers(CANARY_REGION, since=rolled_at + 1.0),
        )
        if back:
            raise DemoError(f"{CANARY_REGION} still answers otherwise after the rollback: {describe_changes(back)}")
        note(f"After the rollback {CANARY_REGION} answers as before it.")

    def audited(self, version: str, action: str) -> dict[str, Any]:
        """The audit record of `action` on `version`, which a controller must have written."""
        records = self.ctl.json("audit", "--last", "20").get("records") or []
        found = [r for r in records if r.get("action") == action and r.get("version") == version]
        if not found:
            raise DemoError(f"no {action} of {version} in the audit")
        record = found[-1]
        if not str(record.get("who", "")).startswith("controller"):
            raise DemoError(f"{version}'s {action} was recorded by {record.get('who')}, not a controller")
        return dict(record)

    def show_audit(self, last: int) -> None:
        """``ctl audit --last N``, one line a record (its records hold whole analyses)."""
        argv = f"ctl audit --last {last} --etcd {self.target.etcd}"
        self.narrator.say(f"$ authz-sidecar {argv}   (one line a record: seq, who, action, subject: reason)")
        for record in self.ctl.json("audit", "--last", str(last)).get("records") or []:
            self.narrator.say(
                f"  #{record.get('seq')} {record.get('who')} {record.get('action')} {record.get('subject')}: "
                f"{record.get('reason')}"
            )

    def compare(
        self, traffic: Traffic, start: float, end: float, version: str, hire: str, *, expect_changed: str
    ) -> None:
        """During [start, end): us-east as before; eu-west changed for `expect_changed` only, and
        to answers `version` decided."""
        note = self.narrator.note
        before = {r: traffic.answers(r, until=start) for r in REGIONS}
        during = {r: traffic.answers(r, since=start, until=end) for r in REGIONS}
        steady = changed(before[STEADY_REGION], during[STEADY_REGION])
        moved = changed(before[CANARY_REGION], during[CANARY_REGION])
        note(
            f"{STEADY_REGION}: {len(during[STEADY_REGION])} answers, "
            + ("none changed" if not steady else f"CHANGED: {'; '.join(describe_changes(steady))}")
        )
        note(f"  e.g. {hire}: {usual_answers(during[STEADY_REGION], hire)}", hang=4)
        note(f"{CANARY_REGION}: {len(during[CANARY_REGION])} answers; changed:")
        for line in describe_changes(moved) or ["nothing"]:
            note(f"  {line}")
        note("  every other answer as before")
        if steady:
            raise DemoError(f"{STEADY_REGION}'s answers changed during a canary in {CANARY_REGION} only")
        strays = [k for k in moved if k[0] != expect_changed]
        by_it = [a for a in during[CANARY_REGION] if a.principal == expect_changed and a.decided == version]
        if strays or not by_it:
            raise DemoError(
                f"{CANARY_REGION} should have changed for {expect_changed} alone, decided by {version}: "
                f"{describe_changes(moved) or 'nothing changed'}"
            )

    def compare_regions(self, before: Sequence[Answer], start: float, end: float, traffic: Traffic) -> set[str]:
        """The mistake's canary: what changed in each region against the answers before it; the
        principals whose answers changed in the canary's region."""
        note = self.narrator.note
        hurt: set[str] = set()
        for region in REGIONS:
            during = traffic.answers(region, since=start, until=end)
            found = changed([a for a in before if a.region == region], during)
            lines = describe_changes(found)
            note(f"{region}: {len(during)} answers during the canary; " + ("none changed" if not lines else "changed:"))
            for line in lines:
                note(f"  {line}")
            if region == STEADY_REGION and found:
                raise DemoError(f"{STEADY_REGION}'s answers changed during a canary in {CANARY_REGION} only")
            if region == CANARY_REGION:
                hurt = {principal for principal, _request in found}
        return hurt


# --- the command --------------------------------------------------------------------------------


@contextlib.contextmanager
def _mesh_for(options: DemoOptions, narrator: Narrator) -> Iterator[Target]:
    """The running mesh the state file names; else one started here, stopped on the way out."""
    state = read_state(options.state)
    if state is not None:
        yield Target.from_state(options.state, state)
        return
    narrator.say(
        f"no mesh is running (no live 'mesh up' state at {options.state}): starting one for this demo's own "
        "duration; it stops when the demo ends ('make run' keeps one up)"
    )
    workdir = Path(tempfile.mkdtemp(prefix="authz-demo-mesh-"))
    mesh = RegionalMesh(workdir=workdir, ports=PortPlan.free(), traces=Traces("", None, "traces: off"))
    failed = True
    try:
        policy = workdir / "policy"
        shutil.copytree(EXAMPLE_POLICY, policy)
        mesh.policy_dir = policy
        mesh.start()
        narrator.say(f"  up in {narrator.elapsed():.1f}s")
        yield Target.of(mesh)
        failed = False
    finally:
        mesh.stop()
        if failed:
            print(f"(the demo's mesh kept its logs in {workdir})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(options: DemoOptions) -> int:
    """0 when the story ran to its end as told; 1 when a step did not happen (in time); 130 when
    stopped by Ctrl-C or SIGTERM."""
    stop_on_signals()
    narrator = Narrator()
    workdir = Path(tempfile.mkdtemp(prefix="authz-demo-"))
    log_file = (workdir / "ctl.log").open("a")
    # ctl runs in this process and logs each audit record: to a file, not over the story.
    logs.configure("info")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=log_file))
    failed = True
    try:
        with _mesh_for(options, narrator) as target:
            Story(target, QUICK if options.quick else FULL, workdir, narrator).run()
        failed = False
        return 0
    except StoppedError:
        failed = False
        print("demo: stopped before its end", file=sys.stderr)
        return 130
    except (DemoError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        ignore_stop_signals()
        stop_unrecorded_children()
        log_file.close()
        if failed:
            print(f"(the demo's change files and ctl log are in {workdir})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m authz_sidecar.local.demo [--quick] [--state FILE]``, as ``authz-sidecar mesh demo``."""
    return cli.main(["mesh", "demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
