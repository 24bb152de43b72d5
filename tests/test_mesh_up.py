"""``authz-sidecar mesh up`` (make run) and ``mesh demo`` (make demo), run as a person runs them: a
subprocess on loopback, found through its state file, stopped with a signal. Each region answers
through its own Envoy, a canary in one region changes that region's answers and never the other's,
the demo's story runs to its end on a running mesh, a taken port stops everything before it starts,
and a stop leaves no process behind.

The tests sharing one mesh run in the file's order: the canary test needs v2 live, and the demo
promotes a change over it (v2 goes stale); the last stops the mesh."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar.local.mesh import run_ctl, send
from authz_sidecar.local.meshstate import read_state
from authz_sidecar.local.meshstate import running as alive
from authz_sidecar.local.otlpprobe import Traces
from authz_sidecar.local.portplan import PortPlan
from authz_sidecar.local.processes import LOOPBACK
from authz_sidecar.local.regions import PROBES, RegionalMesh
from authz_sidecar.local.tokens import token_variable

from .helpers import processes_of

pytestmark = pytest.mark.envoy

MESH = [sys.executable, "-m", "authz_sidecar", "mesh"]


class Output:
    """A subprocess's output, read line by line in a thread, so a test can wait for a line with a
    deadline instead of blocking on a pipe."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        self._stream = stream = process.stdout

        def read() -> None:
            for line in stream:
                self._queue.put(line)
            self._queue.put(None)

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Once the process is gone: the reader has met the end of its output."""
        self._thread.join(10)
        self._stream.close()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def _read(self, timeout: float, needle: str | None = None) -> str | None:
        """Lines until one holds `needle` (returned), the output ends, or `timeout` passes (None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if needle is not None and needle in line:
                return line
        return None

    def wait_for(self, needle: str, timeout: float) -> str:
        line = self._read(timeout, needle)
        if line is None:
            raise AssertionError(f"no line with {needle!r} within {timeout}s:\n{self.text}")
        return line

    def rest(self, timeout: float = 5) -> str:
        self._read(timeout)
        return self.text


def start(tmp: Path, *args: str) -> tuple[subprocess.Popen[str], Output]:
    """`authz-sidecar mesh ARGS` with its work directory under `tmp` (TMPDIR)."""
    process = subprocess.Popen(
        [*MESH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    return process, Output(process)


def cleanup(process: subprocess.Popen[str], output: Output, pids: list[int]) -> None:
    """Whatever a failed test left running, killed by pid; the output's pipe closed."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    output.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Running:
    process: subprocess.Popen[str]
    output: Output
    state_file: Path
    state: dict[str, Any]
    tokens: dict[str, str] = field(default_factory=dict)

    def url(self, region: str, path: str) -> str:
        return str(self.state["regions"][region]["envoy_url"]) + path

    def ask(self, region: str, method: str, path: str, principal: str) -> tuple[int, str]:
        """Status, and the set version that allowed or the reason that denied."""
        headers = {"authorization": f"Bearer {self.tokens[token_variable(principal)]}"}
        status, response_headers, body = send(method, self.url(region, path), headers)
        if status == 200:
            return status, str(json.loads(body)["set_version"])
        return status, response_headers.get("x-authz-reason", "")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("mesh-up")
    state_file = tmp / "state" / "state.json"
    process, output = start(tmp, "up", "--free-ports", "--state", str(state_file))
    pids: list[int] = []
    try:
        output.wait_for("The mesh is up", timeout=90)
        state = json.loads(state_file.read_text())
        pids = list(state["processes"].values())
        tokens = dict(line.split("=", 1) for line in Path(state["tokens"]).read_text().splitlines())
        yield Running(process, output, state_file, state, tokens)
    finally:
        cleanup(process, output, pids)


def test_each_region_allows_and_denies_through_its_own_envoy(running: Running) -> None:
    assert set(running.state["regions"]) == {"us-east", "eu-west"}
    for region in ("us-east", "eu-west"):
        assert running.ask(region, "GET", "/things/1", "alice") == (200, "v1")
        assert running.ask(region, "PUT", "/things/1", "dave") == (403, "missing_permission")
    # The canary make run seeds is us-east's only: bob is in v2's 10% there, not in eu-west.
    assert running.ask("us-east", "PUT", "/things/1", "bob") == (200, "v2")
    assert running.ask("eu-west", "PUT", "/things/1", "bob") == (403, "missing_permission")


def _weight_here(running: Running, region: str, version: str) -> float | None:
    port = running.state["regions"][region]["sidecar_http_port"]
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/status", timeout=2) as response:
        status = json.loads(response.read())
    shadow = next((s for s in status["shadows"] if s["version"] == version), None)
    return None if shadow is None else float(shadow["weight_here"])


def _until_weight(running: Running, region: str, weight: float) -> None:
    deadline = time.monotonic() + 15
    while _weight_here(running, region, "v2") != weight:
        assert time.monotonic() < deadline, f"{region}'s sidecar never saw v2 at {weight}%"
        time.sleep(0.05)


Answers = dict[tuple[str, str, str], set[tuple[int, str]]]


def answers(running: Running, rounds: int = 3) -> Answers:
    """(region, principal, method) -> every answer `rounds` requests got, the same people asking
    the same things in both regions."""
    seen: Answers = {}
    for _ in range(rounds):
        for region in ("us-east", "eu-west"):
            for principal in ("alice", "bob", "carol", "dave", "qa-bot"):
                for method in ("GET", "PUT", "DELETE"):
                    seen.setdefault((region, principal, method), set()).add(
                        running.ask(region, method, "/things/7", principal)
                    )
    return seen


def test_a_canary_in_eu_west_changes_eu_wests_answers_and_never_us_easts(running: Running) -> None:
    endpoints = str(running.state["etcd"])
    before = answers(running)
    run_ctl(endpoints, "canary", "v2", "--weight", "eu-west=100")
    try:
        _until_weight(running, "eu-west", 100)
        during = answers(running)
    finally:
        run_ctl(endpoints, "canary", "v2", "--weight", "eu-west=0")
        _until_weight(running, "eu-west", 0)
    for key, got in during.items():
        region, principal, method = key
        assert len(got) == 1, f"{key}: answers differ between requests: {got}"
        if region == "us-east":  # not one answer moved, nor the set that gave it
            assert got == before[key], f"{key}: {before[key]} -> {got}"
        elif principal not in ("bob", "dave") or method != "PUT":  # v2 decides now, the same way as v1
            assert {s for s, _ in got} == {s for s, _ in before[key]}, f"{key}: {before[key]} -> {got}"
            assert all(by == "v2" for s, by in got if s == 200), f"{key}: {got}"
    # v2 makes bob and dave editors: in eu-west it now decides for them; in us-east nothing moved
    # (bob was in v2's 10% there before, and still is; dave was not, and still is not).
    for principal in ("bob", "dave"):
        assert before[("eu-west", principal, "PUT")] == {(403, "missing_permission")}
        assert during[("eu-west", principal, "PUT")] == {(200, "v2")}
    assert during[("us-east", "bob", "PUT")] == {(200, "v2")}
    assert during[("us-east", "dave", "PUT")] == {(403, "missing_permission")}
    assert answers(running, rounds=1) == {k: {next(iter(v))} for k, v in before.items()}  # taken back


def test_the_quick_demo_tells_the_whole_story_on_the_running_mesh(running: Running, tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*MESH, "demo", "--quick", "--state", str(running.state_file)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert time.monotonic() - started < 60, out
    assert f"pid {running.process.pid}" in out  # it drove the running mesh, not one of its own
    for needle in (
        "[2] A change is proposed: erin joins the team as a viewer",
        "proposed: v3",
        '"listed": ["erin gains things:view"]',
        "$ authz-sidecar ctl canary v3 --plan eu-west=100",
        "$ authz-sidecar ctl report v3",
        "plan: step 1/1 Successful (1 of 1): promote",
        "erin GET /things/{id}: 403 -> 200 v3",
        "every other answer as before",
        "active: v3",
        "v2 was proposed against v1: the promotion made it stale",
        '"listed": ["bob loses things:view", "dave loses things:view", "erin loses things:view", "qa-bot loses',
        "controller-1 rollback v4: step 1/2 Failed: eu-west: denied",
        "After the rollback eu-west answers as before it.",
    ):
        assert needle in out, out
    assert re.search(r"us-east: \d+ answers, none changed", out), out
    assert re.search(r"Rolled back by the controller [\d.]+s after the canary started", out), out
    assert re.search(r"demo: done in [\d.]+s", out), out
    assert "Traceback" not in out, out
    # The story left the mesh as it says: v3 active, v4 gone, the audit chain whole.
    status = run_ctl(str(running.state["etcd"]), "status")
    assert status["active"] == "v3" and "v4" not in status["shadows"]
    assert run_ctl(str(running.state["etcd"]), "audit", "--verify", "--last", "0")["verified"] is True


def test_a_second_mesh_on_a_running_ones_state_file_is_refused(running: Running, tmp_path: Path) -> None:
    result = subprocess.run(
        [*MESH, "up", "--free-ports", "--state", str(running.state_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"a mesh is already running (pid {running.process.pid}" in result.stderr
    assert list(tmp_path.iterdir()) == [] and json.loads(running.state_file.read_text()) == running.state


def test_sigint_stops_every_process_and_removes_the_state_and_workdir(running: Running) -> None:
    pids = list(running.state["processes"].values())
    workdir = Path(running.state["workdir"])
    assert pids and all(alive(pid) for pid in pids)
    os.kill(running.process.pid, signal.SIGINT)
    assert running.process.wait(timeout=60) == 0, running.output.rest()
    out = running.output.rest()
    assert "Traceback" not in out, out
    left = [pid for pid in pids if alive(pid)] + processes_of(workdir)
    assert left == [], f"left running: {left}"
    assert not running.state_file.exists() and not running.state_file.parent.exists()
    assert not workdir.exists()


def test_the_default_port_plan_is_the_documented_one() -> None:
    roles = {role: port for port, role in PortPlan.fixed().roles()}
    assert roles["us-east Envoy"] == 8080 and roles["eu-west Envoy"] == 8090
    assert roles["etcd clients"] == 8100 and roles["controller metrics"] == 8102
    shifted = {role: port for port, role in PortPlan.fixed(20000).roles()}
    assert all(shifted[role] == port - 8080 + 20000 for role, port in roles.items())
    assert len(set(roles.values())) == len(roles)


def test_a_taken_port_is_one_line_naming_it_and_exit_2_with_nothing_started(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [*MESH, "up", "--base-port", str(port), "--state", str(tmp_path / "state.json")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} (us-east Envoy) is taken" in lines[0], result.stderr
    assert lines[0].startswith("authz-sidecar: mesh up: ")
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no work directory, no state file


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["up", "--free-ports", "--base-port", "9000"], "contradict"),
        (["up", "--base-port", "80"], "--base-port: 80 is not between"),
        (["up", "--base-port", "many"], "invalid int value"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    result = subprocess.run([*MESH, *args], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_check_shows_what_each_region_answers_then_stops(tmp_path: Path) -> None:
    process, output = start(tmp_path, "up", "--free-ports", "--check", "--state", str(tmp_path / "s.json"))
    workdir: Path | None = None
    try:
        line = output.wait_for("(workdir ", timeout=30)
        workdir = Path(re.search(r"\(workdir (\S+)\)", line).group(1))  # type: ignore[union-attr]
        assert process.wait(timeout=120) == 0, output.rest()
        out = output.rest()
        assert out.count("[ok ]") == len(PROBES) and "[BAD]" not in out, out
        assert "us-east 200 v2 | eu-west 403 missing_permission" in out, out  # the one-region canary
        assert processes_of(workdir) == [] and not workdir.exists()
        assert not (tmp_path / "s.json").exists()
    finally:
        cleanup(process, output, processes_of(workdir) if workdir is not None else [])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_starting_leaves_nothing_behind(tmp_path: Path, signum: int) -> None:
    """SIGHUP is the terminal closing under `make run`: its processes, each in a session of its
    own, would never hear of it."""
    process, output = start(tmp_path, "up", "--free-ports", "--state", str(tmp_path / "s.json"))
    workdir: Path | None = None
    try:
        line = output.wait_for("(workdir ", timeout=30)
        workdir = Path(re.search(r"\(workdir (\S+)\)", line).group(1))  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while not processes_of(workdir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes_of(workdir), "etcd did not start"
        os.kill(process.pid, signum)
        assert process.wait(timeout=60) == 0, output.rest()
        assert "Traceback" not in output.rest()
        assert processes_of(workdir) == [] and not workdir.exists()
    finally:
        cleanup(process, output, processes_of(workdir) if workdir is not None else [])


def test_the_state_of_a_mesh_that_is_gone_is_not_a_running_mesh(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    (tmp_path / "state.json").write_text(json.dumps({"pid": int(dead.stdout), "processes": {}}))
    assert read_state(tmp_path / "state.json") is None
    (tmp_path / "state.json").write_text(json.dumps({"pid": os.getpid()}))
    assert read_state(tmp_path / "state.json") == {"pid": os.getpid()}


def test_a_failure_while_starting_stops_what_was_started(tmp_path: Path) -> None:
    """The controller cannot bind its metrics port, the last thing waited for: etcd, both regions'
    services, sidecars and Envoys are running by then, and every one of them is stopped."""
    ports = PortPlan.free()
    mesh = RegionalMesh(workdir=tmp_path, ports=ports, traces=Traces("", None, "traces: off"))
    with socket.socket() as holder:
        holder.bind((LOOPBACK, ports.controller_metrics))
        holder.listen()
        with pytest.raises(RuntimeError, match="controller exited"):
            mesh.start()
    pids = mesh.pids()  # etcd's is forgotten once it is stopped: its data directory names it below
    assert {"controller", "envoy-us-east", "envoy-eu-west", "sidecar-eu-west", "upstream-us-east"} <= set(pids)
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert processes_of(tmp_path) == []


def test_a_mesh_whose_supervisor_was_killed_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    """SIGKILL gives `mesh up` no chance to stop what it started; the next `mesh up` on the same
    state file stops those leftovers (each still the process that was recorded, by its start time)
    before it starts its own."""
    state_file = tmp_path / "state" / "state.json"
    first, output = start(tmp_path, "up", "--free-ports", "--state", str(state_file))
    pids: list[int] = []
    try:
        output.wait_for("The mesh is up", timeout=90)
        pids = list(json.loads(state_file.read_text())["processes"].values())
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert pids and all(alive(pid) for pid in pids)
        second = subprocess.run(
            [*MESH, "up", "--free-ports", "--check", "--state", str(state_file)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"stopped {len(pids)} processes left running by a mesh up that was killed" in second.stdout
        assert [pid for pid in pids if alive(pid)] == []
        assert not state_file.exists()
    finally:
        cleanup(first, output, pids)
