"""The controller over a real etcd, with real sidecars in two regions publishing real reports from
real Checks: plans advance region by region and promote, harm rolls back unaided, coverage holds
the promotion until traffic or a named waiver covers it, webhooks gate, and controllers take over
from each other without a step taken twice."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz_sidecar.control.controller import Controller
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import LOOPBACK, Process, free_port
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.plans import PlanStore
from authz_sidecar.store.policy import FencedError

from .helpers import ROLES_WITH_ADMIN as ROLES
from .helpers import (
    RunningSidecar,
    ctl,
    ctl_captured,
    ctl_json,
    decision,
    etcd_sidecar,
    seed,
    unique_prefix,
    wait_for,
    write_json,
)

ACTIVE: dict[str, Any] = {
    "version": "v1",
    "roles": ROLES,
    "grants": [
        {"principal": "alice", "roles": ["editor"]},
        {"principal": "bob", "roles": ["viewer"]},
        {"principal": "vic", "roles": ["viewer"]},
        {"principal": "qa-bot", "roles": ["viewer"]},
    ],
}
# Every sidecar sees these, round and round: reads by everyone, edits by bob and qa-bot.
REQUESTS = [
    ("alice", "GET"),
    ("alice", "PUT"),
    ("bob", "GET"),
    ("bob", "PUT"),
    ("vic", "GET"),
    ("qa-bot", "GET"),
    ("qa-bot", "PUT"),
]
# Fast plans for tests: an analysis a second, a few evaluations enough.
FAST = ["--interval", "1s", "--min-evaluations", "3"]


class RunningController:
    """A Controller on its own event loop in a thread."""

    def __init__(self, endpoints: str, prefix: str, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        values: dict[str, Any] = {"tick": 0.2, "lease_ttl": 2, "retries": 2}
        user, password = kw.pop("user", ""), kw.pop("password", "")
        values.update(kw)
        options = EtcdOptions(endpoints=tuple(endpoints.split(",")), timeout=2.0, user=user, password=password)
        self.etcd, self.controller, self.stop_event = self.call(self._make(options, prefix, values))
        self.running: Future[None] = asyncio.run_coroutine_threadsafe(self.controller.run(self.stop_event), self.loop)

    @staticmethod
    async def _make(
        options: EtcdOptions, prefix: str, values: dict[str, Any]
    ) -> tuple[Etcd, Controller, asyncio.Event]:
        etcd = Etcd(options)
        return etcd, Controller(etcd, prefix, **values), asyncio.Event()

    def call(self, coro: Any, timeout: float = 15) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.stop_event.set)
        try:
            self.running.result(15)
        finally:
            self.call(self.etcd.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


class Traffic:
    """Checks from many principals against sidecars, in a thread, until stopped; every answer kept."""

    def __init__(self, sides: dict[str, RunningSidecar], requests: list[tuple[str, str]] = REQUESTS) -> None:
        self.sides = sides
        self.requests = requests
        self.answers: list[tuple[float, str, str, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for region, side in self.sides.items():
                for principal, method in self.requests:
                    try:
                        status = decision(side, principal, method)
                    except grpc.RpcError:  # the sidecar is closing under a failed test
                        return
                    self.answers.append((time.time(), region, principal, method, status))
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """What a test starts is stopped at its end, in reverse order, whether it passed or not."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def mesh(etcd: EtcdCluster, tmp_path: Path) -> Iterator[tuple[str, dict[str, RunningSidecar]]]:
    """A prefix seeded with ACTIVE and a sidecar in each of two regions, reporting every 0.3 s."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    sides: dict[str, RunningSidecar] = {}
    try:
        for region in ("eu-west", "us-east"):
            sides[region] = etcd_sidecar(etcd.endpoints, prefix, tmp_path / region, region=region, report_interval=0.3)
            sides[region].wait_ready()
        yield prefix, sides
    finally:
        for side in sides.values():
            side.close()


def propose(endpoints: str, prefix: str, tmp: Path, document: dict[str, Any], *extra: str) -> None:
    path = write_json(tmp / f"{document['version']}.json", document)
    code, _out, err = ctl_captured(
        endpoints, prefix, "propose", "--file", path, "--request-id", f"CR-{document['version']}",
        "--reason", "test", *extra,
    )  # fmt: skip
    assert code == 0, err


def change(version: str, *changes: dict[str, Any]) -> dict[str, Any]:
    return {"version": version, "changes": list(changes)}


def plan_of(endpoints: str, prefix: str, version: str) -> dict[str, Any]:
    """The plan as `ctl status` shows it (status exits 1 when it lists a problem, and still prints)."""
    _code, out, _err = ctl_captured(endpoints, prefix, "status", "--json")
    plans: dict[str, Any] = json.loads(out)["plans"]
    return plans.get(version, {})  # type: ignore[no-any-return]


def wait_state(endpoints: str, prefix: str, version: str, state: str, timeout: float = 30) -> dict[str, Any]:
    seen: list[str] = []

    def reached() -> bool:
        plan = plan_of(endpoints, prefix, version)
        line = f"{plan.get('state')} {plan.get('step')} {plan.get('at')}: {plan.get('message')}"
        if not seen or seen[-1] != line:
            seen.append(line)
        return plan.get("state") == state

    try:
        wait_for(reached, timeout=timeout, what=f"plan of {version} {state}")
    except TimeoutError:
        raise AssertionError(f"plan of {version} never {state}; it went: " + " | ".join(seen)) from None
    return plan_of(endpoints, prefix, version)


def audit_records(endpoints: str, prefix: str) -> list[dict[str, Any]]:
    return ctl_json(endpoints, prefix, "audit", "--last", "1000")["records"]  # type: ignore[no-any-return]


def test_a_plan_over_two_regions_advances_step_by_step_and_promotes(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    propose(etcd.endpoints, prefix, tmp_path, change("v2", {"principal": "bob", "grant": ["editor"]}))
    started = ctl_json(
        etcd.endpoints, prefix, "canary", "v2", "--plan", "eu-west=50,100", "--then", "us-east=100", *FAST
    )
    assert started["plan"] == "eu-west=50,100 then us-east=100 every 1s"
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)
    steps_seen: list[tuple[int, str]] = []

    def promoted() -> bool:
        plan = plan_of(etcd.endpoints, prefix, "v2")
        if (plan.get("step"), plan.get("at")) not in steps_seen:
            steps_seen.append((plan.get("step"), plan.get("at")))  # type: ignore[arg-type]
        return plan.get("state") == "promoted"

    wait_for(promoted, timeout=40, what="v2 promoted by its plan")
    status = ctl_json(etcd.endpoints, prefix, "status")
    assert status["active"] == "v2" and "v2" not in status["shadows"]
    # ctl status showed each step as the plan went through it.
    for step, at in ((1, "eu-west 50%"), (2, "eu-west 100%"), (3, "us-east 100%")):
        assert (step, at) in steps_seen, steps_seen
    # The audit says what was done, in order, and by whom: each step once, then the promotion.
    records = [r for r in audit_records(etcd.endpoints, prefix) if r.get("version") == "v2"]
    canaries = [r["weights"] for r in records if r["action"] == "canary"]
    assert canaries == [{"eu-west": 50}, {"eu-west": 100}, {"eu-west": 100, "us-east": 100}]
    promotion = next(r for r in records if r["action"] == "promote")
    assert promotion["request_id"].startswith("plan-v2-") and promotion["who"].startswith("controller@")
    assert promotion["analysis"]["outcome"] == "Successful"
    # The sidecars follow: bob edits everywhere now.
    wait_for(lambda: all(decision(s, "bob", "PUT") == 200 for s in sides.values()), what="bob edits")


def test_a_plan_whose_step_is_a_cohort_moves_that_regions_cohort_and_promotes(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    cohort_step = {"region": "eu-west", "cohort": {"principals": ["bob"]}}
    plan = {"steps": [cohort_step], "interval": "1s", "gates": {"min_evaluations": 3}}
    propose(etcd.endpoints, prefix, tmp_path, {**change("v8", {"principal": "bob", "grant": ["editor"]}), "plan": plan})
    assert plan_of(etcd.endpoints, prefix, "v8")["plan"] == "eu-west=cohort every 1s"
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)
    wait_state(etcd.endpoints, prefix, "v8", "promoted", timeout=40)
    records = [r for r in audit_records(etcd.endpoints, prefix) if r.get("version") == "v8"]
    (step,) = [r for r in records if r["action"] == "canary"]
    assert step["weights"] == {} and step["cohorts"] == {"eu-west": {"principals": ["bob"], "role_sets": []}}
    promoted_at = next(r["at"] for r in records if r["action"] == "promote")
    before = {(region, principal, status) for at, region, principal, method, status in traffic.answers if
              at < promoted_at and method == "PUT"}  # fmt: skip
    # Until the promotion, the cohort step moved bob in eu-west alone: not in us-east, not vic.
    assert ("eu-west", "bob", 200) in before
    assert ("us-east", "bob", 200) not in before and ("eu-west", "vic", 200) not in before


def test_unexpected_mismatches_in_the_canary_region_roll_back_and_the_other_region_is_never_touched(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    # Declared: bob becomes an editor. By accident, viewers lose things:view too (accepted at propose).
    accident = {
        **ACTIVE,
        "version": "v3",
        "parent": "v1",
        "roles": {**ROLES, "viewer": []},
        "grants": [*ACTIVE["grants"][:1], {"principal": "bob", "roles": ["editor"]}, *ACTIVE["grants"][2:]],
        "changes": [{"principal": "bob", "grant": ["editor"]}],
    }
    propose(etcd.endpoints, prefix, tmp_path, accident, "--accept-undeclared")
    ctl_json(etcd.endpoints, prefix, "canary", "v3", "--plan", "eu-west=10,100", "--then", "us-east=100", *FAST)
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)
    plan = wait_state(etcd.endpoints, prefix, "v3", "rolled_back", timeout=30)
    assert "unexpected_mismatches" in plan["message"] and "eu-west" in plan["message"]
    status = ctl_json(etcd.endpoints, prefix, "status")
    assert status["active"] == "v1" and "v3" not in status["shadows"] and status["locks"] == {}
    records = [r for r in audit_records(etcd.endpoints, prefix) if r.get("version") == "v3"]
    assert [r["weights"] for r in records if r["action"] == "canary"] == [{"eu-west": 10}]
    rollback = next(r for r in records if r["action"] == "rollback")
    assert rollback["analysis"]["outcome"] == "Failed" and rollback["request_id"].startswith("plan-v3-")
    # us-east was never given a weight, so nobody there was decided by v3.
    assert not any(r for r in traffic.answers if r[1] == "us-east" and r[2] == "vic" and r[4] != 200)


def test_a_deny_budget_exceeded_by_a_declared_change_stops_it(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    # Declared and planned: viewers stop viewing. It hurts bob, vic and qa-bot: over a budget of 1.
    propose(etcd.endpoints, prefix, tmp_path, change("v4", {"role": "viewer", "remove": ["things:view"]}))
    ctl_json(etcd.endpoints, prefix, "canary", "v4", "--plan", "eu-west=10,100", *FAST, "--max-denied-principals", "1")
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)
    plan = wait_state(etcd.endpoints, prefix, "v4", "rolled_back", timeout=30)
    assert "denied_principals" in plan["message"]
    assert "v4" not in ctl_json(etcd.endpoints, prefix, "status")["shadows"]


def test_a_changed_handle_nobody_exercised_holds_the_promotion_until_waived_by_name(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    # bob becomes an editor (exercised by his edits) and qa-bot an admin: things:delete, which no
    # route of this service reaches, changes for qa-bot and no request will ever show it.
    propose(
        etcd.endpoints, prefix, tmp_path,
        change("v5", {"principal": "bob", "grant": ["editor"]}, {"principal": "qa-bot", "grant": ["admin"]}),
    )  # fmt: skip
    ctl_json(etcd.endpoints, prefix, "canary", "v5", "--plan", "eu-west=100", *FAST, "--inconclusive-limit", "1000")
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)

    def held() -> bool:
        last = plan_of(etcd.endpoints, prefix, "v5").get("last_analysis") or {}
        return "unexercised_handles [things:delete]" in (last.get("reason") or "")

    wait_for(held, timeout=30, what="the promotion held on things:delete")
    analysed = ctl_json(etcd.endpoints, prefix, "analyze", "v5")
    gate = next(g for g in analysed["gates"] if g["gate"] == "unexercised_handles")
    assert gate["value"] == ["things:delete"] and gate["passed"] is False
    assert ctl_json(etcd.endpoints, prefix, "status")["active"] == "v1"
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "resume", "v5", "--accept-unexercised", "things:delete")
    assert code == 2 and "--reason" in err
    waived = ctl_json(
        etcd.endpoints, prefix, "resume", "v5", "--accept-unexercised", "things:delete",
        "--reason", "only the nightly purge deletes; checked by hand",
    )  # fmt: skip
    assert waived["waived"] == ["things:delete"]
    wait_state(etcd.endpoints, prefix, "v5", "promoted", timeout=30)
    records = audit_records(etcd.endpoints, prefix)
    assert any(r["action"] == "plan_resume" and "nightly purge" in r["reason"] for r in records)


class Hook(http.server.ThreadingHTTPServer):
    """A webhook receiver on loopback whose answer the test sets; it keeps every request's payload."""

    def __init__(self) -> None:
        self.answer = 500
        self.received: list[dict[str, Any]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append(json.loads(body))
                self.send_response(hook.answer)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__((LOOPBACK, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}/confirm"


def test_a_confirm_webhook_holds_the_promotion_until_it_answers_2xx_and_a_dead_event_hook_never_blocks(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    hook = Hook()
    cleanup.callback(hook.server_close)
    cleanup.callback(hook.shutdown)
    dead = f"http://{LOOPBACK}:{free_port()}/events"  # nothing listens there
    propose(etcd.endpoints, prefix, tmp_path, change("v6", {"principal": "bob", "grant": ["editor"]}))
    ctl_json(
        etcd.endpoints, prefix, "canary", "v6", "--plan", "eu-west=100", *FAST,
        "--confirm-promotion-url", hook.url, "--event-url", dead, "--webhook-timeout", "0.5", "--webhook-retries", "0",
    )  # fmt: skip
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)
    started = time.monotonic()

    def held() -> bool:
        return "held by the confirm-promotion webhook" in plan_of(etcd.endpoints, prefix, "v6").get("message", "")

    wait_for(held, timeout=30, what="the promotion held by the webhook")
    # The dead event hook did not slow the plan: the first analysis came within its interval.
    assert time.monotonic() - started < 15
    assert "answered 500" in plan_of(etcd.endpoints, prefix, "v6")["message"]
    assert ctl_json(etcd.endpoints, prefix, "status")["active"] == "v1"
    payload = hook.received[-1]
    assert payload["version"] == "v6" and payload["type"] == "confirm_promotion"
    assert payload["outcome"] == "Successful" and payload["gates"]
    hook.answer = 200
    wait_state(etcd.endpoints, prefix, "v6", "promoted", timeout=30)
    failed = controller.controller._hooks  # the event feed counted its failures, never raised
    assert sum(h.events_failed for h in failed.values()) >= 1


def test_a_deposed_leaders_write_is_refused(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    propose(etcd.endpoints, prefix, tmp_path, change("v7", {"principal": "bob", "grant": ["editor"]}))
    ctl_json(etcd.endpoints, prefix, "canary", "v7", "--plan", "eu-west=10,100", *FAST)

    async def scenario() -> None:
        options = EtcdOptions(endpoints=(etcd.endpoints,), timeout=2.0)
        async with Etcd(options) as one, Etcd(options) as other:
            first = Controller(one, prefix, ident="first", lease_ttl=2)
            second = Controller(other, prefix, ident="second", lease_ttl=2)
            first.leadership = await first.election.try_lead()
            assert first.leadership is not None and await second.election.try_lead() is None
            stored = await PlanStore(first.policy).require("v7")
            # The first leader's term ends without it noticing (paused past its lease) ...
            await one.call(one.lease.revoke, first.leadership.lease)
            second.leadership = await second.election.try_lead()
            assert second.leadership is not None
            # ... and every write it still tries is refused: the progress alone, and a step.
            with pytest.raises(FencedError):
                await first._write(stored, replace(stored.progress, message="from a ghost"))
            with pytest.raises(FencedError):
                await first.apply(stored)
            after = await PlanStore(first.policy).require("v7")
            assert after.progress.message != "from a ghost" and not after.progress.applied
            # The new leader's write goes through.
            await second.apply(after)
            assert (await PlanStore(second.policy).require("v7")).progress.applied

    asyncio.run(scenario())
    assert ctl_json(etcd.endpoints, prefix, "status")["shadows"]["v7"]["weights"] == {"eu-west": 10}


def controller_process(endpoints: str, prefix: str, tmp: Path, name: str, metrics: int) -> Process:
    argv = [
        sys.executable, "-m", "authz_sidecar", "controller", "--etcd", endpoints, "--prefix", prefix,
        "--controller-id", name, "--tick", "0.2", "--lease-ttl", "2", "--dlq-file", str(tmp / f"{name}-dlq.json"),
        "--metrics", f"{LOOPBACK}:{metrics}",
    ]  # fmt: skip
    return Process(name, argv, tmp)


def controller_metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_killing_the_leader_mid_plan_the_other_controller_takes_over_and_no_step_is_taken_twice(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]]
) -> None:
    prefix, sides = mesh
    propose(etcd.endpoints, prefix, tmp_path, change("v8", {"principal": "bob", "grant": ["editor"]}))
    ctl_json(etcd.endpoints, prefix, "canary", "v8", "--plan", "eu-west=20,40,60,80,100", *FAST)
    traffic = Traffic(sides)
    ports = {name: free_port() for name in ("ctl-a", "ctl-b")}
    controllers = {name: controller_process(etcd.endpoints, prefix, tmp_path, name, ports[name]) for name in ports}
    try:
        wait_for(lambda: (plan_of(etcd.endpoints, prefix, "v8").get("step") or 0) >= 2, timeout=30, what="step 2")
        leader = ctl_json(etcd.endpoints, prefix, "status")["controller"]["leader"]
        controllers[leader].kill()
        other = next(name for name in controllers if name != leader)
        wait_state(etcd.endpoints, prefix, "v8", "promoted", timeout=40)
        assert ctl_json(etcd.endpoints, prefix, "status")["controller"]["leader"] == other
        metrics = controller_metrics(ports[other])
        assert metrics["authz_controller_leader"] == 1
        assert metrics["authz_controller_moves_total{move=promote}"] == 1
        assert metrics["authz_controller_analyses_total{outcome=Successful}"] >= 1
    finally:
        for process in controllers.values():
            process.stop()
        traffic.stop()
    records = [r for r in audit_records(etcd.endpoints, prefix) if r.get("version") == "v8"]
    steps = Counter(r["subject"] for r in records if r["action"] == "canary")
    assert steps == Counter({f"v8:step{i}": 1 for i in range(1, 6)}), steps
    assert {r["who"] for r in records if r["action"] == "canary"} == {"ctl-a", "ctl-b"}
    assert [r["action"] for r in records].count("promote") == 1


def test_plan_usage_errors_are_one_line(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    propose(etcd.endpoints, prefix, tmp_path, change("v9", {"principal": "bob", "grant": ["editor"]}))
    for args, needle in (
        (["canary", "v9", "--plan", "eu-west=0"], "1..100"),
        (["canary", "v9", "--plan", "eu-west=5", "--interval", "forever"], "duration"),
        (["canary", "v9", "--plan", "eu-west=5", "--weight", "eu-west=5"], "not both"),
        (["canary", "v9", "--plan", "eu-west=5", "--event-url", "ftp://x"], "event"),
        (["canary", "v9", "--plan", "eu-west=5", "--accept-unexercised", "things:edit"], "--reason"),
        (["pause", "v9"], "--reason"),
    ):
        code, out, err = ctl_captured(etcd.endpoints, prefix, *args)
        assert (code, out) == (2, ""), (args, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    assert ctl(etcd.endpoints, prefix, "pause", "v9", "--reason", "x") == 1  # no plan: one line, exit 1
    ctl_json(etcd.endpoints, prefix, "canary", "v9", "--plan", "eu-west=5")
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "canary", "v9", "--weight", "eu-west=50")
    assert code == 1 and "abort it first" in err
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "canary", "v9", "--plan", "eu-west=5")
    assert code == 1 and "already has a running plan" in err
    assert ctl_json(etcd.endpoints, prefix, "pause", "v9", "--reason", "lunch")["state"] == "paused"
    assert ctl_json(etcd.endpoints, prefix, "resume", "v9", "--reason", "back")["state"] == "running"
    assert ctl_json(etcd.endpoints, prefix, "abort", "v9", "--reason", "wrong day")["state"] == "aborted"
    assert "v9" in ctl_json(etcd.endpoints, prefix, "status")["shadows"]  # still observed
    actions = [r["action"] for r in audit_records(etcd.endpoints, prefix) if r.get("version") == "v9"]
    assert actions[-4:] == ["plan_start", "plan_pause", "plan_resume", "plan_abort"]


def _grant(endpoint: str, prefix: str, *, writable: tuple[str, ...] | None) -> None:
    """As etcd's root: the controller's role may write everything under `prefix` (None), or only
    under `writable` (and read the rest)."""
    from etcd3aio.auth import AuthService, PermissionType
    from etcd3aio.kv import prefix_range_end

    async def grant() -> None:
        options = EtcdOptions(endpoints=(endpoint,), user="root", password="root-pw")
        async with Etcd(options) as etcd:
            await etcd.authenticate()
            auth = AuthService(etcd._channel)
            auth.set_token(etcd._token)
            root = f"{prefix}/".encode()
            roles = await auth.role_list()
            if "controller" not in roles.roles:
                await auth.role_add("controller")
                await auth.user_add("controller", "controller-pw")
                await auth.user_grant_role("controller", "controller")
            else:
                await auth.role_revoke_permission("controller", root, prefix_range_end(root))
            if writable is None:
                await auth.role_grant_permission(
                    "controller", root, prefix_range_end(root), perm_type=PermissionType.READWRITE
                )
                return
            await auth.role_grant_permission("controller", root, prefix_range_end(root), perm_type=PermissionType.READ)
            for part in writable:
                key = f"{prefix}/{part}/".encode()
                await auth.role_grant_permission(
                    "controller", key, prefix_range_end(key), perm_type=PermissionType.READWRITE
                )

    asyncio.run(grant())


def test_a_rollback_whose_etcd_write_fails_lands_in_the_dead_letter_queue_and_the_plan_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleanup: contextlib.ExitStack
) -> None:
    from .test_etcd_security import _enable_auth

    cluster = EtcdCluster(tmp_path / "etcd").start()
    cleanup.callback(cluster.stop)
    sides: dict[str, RunningSidecar] = {}
    _enable_auth(cluster.endpoints, "root-pw")
    prefix = unique_prefix()
    monkeypatch.setenv("AUTHZ_ETCD_USER", "root")
    monkeypatch.setenv("AUTHZ_ETCD_PASSWORD", "root-pw")
    seed(cluster.endpoints, prefix, tmp_path, active=ACTIVE)
    accident = {
        **ACTIVE, "version": "v3", "parent": "v1", "roles": {**ROLES, "viewer": []},
        "changes": [{"role": "admin", "remove": ["things:delete"]}],
    }  # fmt: skip
    propose(cluster.endpoints, prefix, tmp_path, accident, "--accept-undeclared")
    ctl_json(cluster.endpoints, prefix, "canary", "v3", "--plan", "eu-west=10", *FAST, "--inconclusive-limit", "1000")
    sides["eu-west"] = etcd_sidecar(
        cluster.endpoints, prefix, tmp_path / "eu", region="eu-west", report_interval=0.3,
        etcd_user="root", etcd_password="root-pw",
    )  # fmt: skip
    cleanup.callback(sides["eu-west"].close)
    _grant(cluster.endpoints, prefix, writable=None)
    controller = RunningController(
        cluster.endpoints,
        prefix,
        retries=3,
        dlq_file=tmp_path / "dlq.json",
        user="controller",
        password="controller-pw",
    )
    cleanup.callback(controller.close)
    wait_for(lambda: "eu-west at 10%" in plan_of(cluster.endpoints, prefix, "v3").get("message", ""), what="step 1")
    # Someone narrows the controller's etcd role: it may still read, and write its plans and the
    # dead-letter queue, but no longer the live pointers. Then the evidence turns.
    _grant(cluster.endpoints, prefix, writable=("plans", "dlq"))
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    plan = wait_state(cluster.endpoints, prefix, "v3", "dead_letter", timeout=40)
    request_id = next(w.strip(":'") for w in plan["message"].split() if w.startswith("plan-v3-"))
    assert "dead-letter queue (etcd)" in plan["message"] and "unexpected_mismatches" in plan["message"]
    letters = ctl_json(cluster.endpoints, prefix, "dlq", "list", "--dlq-file", str(tmp_path / "none.json"))
    assert letters["etcd"][request_id]["action"] == "rollback" and letters["etcd"][request_id]["attempts"] == 3
    assert "v3" in ctl_json(cluster.endpoints, prefix, "status")["shadows"]  # not rolled back: it could not be
    # An operator with the rights completes it, under the same request id: done once.
    done = ctl_json(cluster.endpoints, prefix, "dlq", "retry", request_id, "--dlq-file", str(tmp_path / "none.json"))
    assert done["retried"][0]["request_id"] == request_id
    assert "v3" not in ctl_json(cluster.endpoints, prefix, "status")["shadows"]


def test_the_controller_survives_an_etcd_restart_and_its_own_restart_mid_plan(
    tmp_path: Path, cleanup: contextlib.ExitStack
) -> None:
    """The plan's progress lives in etcd: etcd killed and started again mid-plan, then the controller
    itself replaced by a new one, and the plan goes on from where it was, each step taken once. The
    plan here comes from the shadow file itself."""
    cluster = EtcdCluster(tmp_path / "etcd").start()
    cleanup.callback(cluster.stop)
    sides: dict[str, RunningSidecar] = {}
    prefix = unique_prefix()
    seed(cluster.endpoints, prefix, tmp_path, active=ACTIVE)
    plan = {"steps": [{"region": "eu-west", "weight": w} for w in (10, 30, 60, 100)], "interval": "1s"}
    shadow = {
        **change("v2", {"principal": "bob", "grant": ["editor"]}),
        "plan": {**plan, "gates": {"min_evaluations": 3}},
    }
    propose(cluster.endpoints, prefix, tmp_path, shadow)
    assert plan_of(cluster.endpoints, prefix, "v2")["plan"] == "eu-west=10,30,60,100 every 1s"
    sides["eu-west"] = etcd_sidecar(cluster.endpoints, prefix, tmp_path / "eu", region="eu-west", report_interval=0.3)
    cleanup.callback(sides["eu-west"].close)
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(cluster.endpoints, prefix)
    cleanup.callback(controller.close)
    wait_for(lambda: plan_of(cluster.endpoints, prefix, "v2").get("step", 0) >= 2, timeout=30, what="step 2")
    member = cluster.members[0]
    member.kill()
    time.sleep(2)  # the controller's passes fail meanwhile; it must not give up
    cluster.restart(member)
    wait_for(lambda: plan_of(cluster.endpoints, prefix, "v2").get("step", 0) >= 3, timeout=30, what="step 3")
    controller.close()
    controller = RunningController(cluster.endpoints, prefix)  # a new process, as far as etcd can tell
    cleanup.callback(controller.close)
    wait_state(cluster.endpoints, prefix, "v2", "promoted", timeout=40)
    records = [r for r in audit_records(cluster.endpoints, prefix) if r.get("version") == "v2"]
    steps = Counter(r["subject"] for r in records if r["action"] == "canary")
    assert steps == Counter({f"v2:step{i}": 1 for i in range(1, 5)}), steps


def test_an_unreadable_plan_is_shown_as_a_problem_and_never_stops_the_others(
    etcd: EtcdCluster, tmp_path: Path, cleanup: contextlib.ExitStack
) -> None:
    from .helpers import raw_put

    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    propose(etcd.endpoints, prefix, tmp_path, change("v2", {"principal": "bob", "grant": ["editor"]}))
    ctl_json(etcd.endpoints, prefix, "canary", "v2", "--plan", "eu-west=10", *FAST)
    raw_put(etcd.endpoints, f"{prefix}/plans/broken", b"{not json")
    raw_put(etcd.endpoints, f"{prefix}/reports/v2/liar", b'{"sidecar": "liar", "evaluations": "many"}')
    code, out, err = ctl_captured(etcd.endpoints, prefix, "status", "--json")
    assert code == 1 and f"plan {prefix}/plans/broken" in err and len(err.strip().splitlines()) == 1
    assert json.loads(out)["plans"]["v2"]["state"] == "running"
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)
    wait_for(lambda: "eu-west at 10%" in plan_of(etcd.endpoints, prefix, "v2").get("message", ""), what="step 1")


def test_a_shadow_failing_a_registered_case_is_held_with_the_cases_name_until_the_case_is_fixed(
    etcd: EtcdCluster, tmp_path: Path, mesh: tuple[str, dict[str, RunningSidecar]], cleanup: contextlib.ExitStack
) -> None:
    prefix, sides = mesh
    cases: dict[str, Any] = {
        "service": "things",
        "cases": [{"name": "bob never edits", "principal": "bob", "route": "PUT /things/1", "expect": "deny"}],
    }
    ctl_json(etcd.endpoints, prefix, "cases", "put", "--file", write_json(tmp_path / "cases.json", cases))
    propose(etcd.endpoints, prefix, tmp_path, change("v2", {"principal": "bob", "grant": ["editor"]}))
    ctl_json(etcd.endpoints, prefix, "canary", "v2", "--plan", "eu-west=100", *FAST, "--inconclusive-limit", "1000")
    traffic = Traffic(sides)
    cleanup.callback(traffic.stop)
    controller = RunningController(etcd.endpoints, prefix)
    cleanup.callback(controller.close)

    def held() -> bool:
        last = plan_of(etcd.endpoints, prefix, "v2").get("last_analysis") or {}
        return "cases 1" in (last.get("reason") or "")

    wait_for(held, timeout=30, what="the plan held by the failing case")
    reason = plan_of(etcd.endpoints, prefix, "v2")["last_analysis"]["reason"]
    assert "'bob never edits' expected deny" in reason and "role editor has it" in reason
    assert ctl_json(etcd.endpoints, prefix, "status")["active"] == "v1"
    # The expectation was out of date: the team fixes the case, and the plan goes on by itself.
    fixed = {"service": "things", "cases": [{**cases["cases"][0], "name": "bob edits now", "expect": "allow"}]}
    ctl_json(etcd.endpoints, prefix, "cases", "put", "--file", write_json(tmp_path / "fixed.json", fixed))
    wait_state(etcd.endpoints, prefix, "v2", "promoted", timeout=30)
