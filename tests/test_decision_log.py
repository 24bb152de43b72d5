"""The decision log (serve --decision-log): one JSON line per decision, written by a thread of its
own, rotated by size without losing or splitting a line; a full queue drops and counts, never waits;
a file that cannot be opened stops the sidecar before it starts, naming the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import parse_permission_set
from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.evaluation import Evaluation
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import Selection
from authz_sidecar.telemetry.decisionlog import DecisionLog
from authz_sidecar.telemetry.metrics import Metrics

from .helpers import (
    ACTIVE,
    RunningSidecar,
    check,
    request,
    scrape,
    shadow,
    sidecar_settings,
    status_of,
    wait_for,
    write_policy,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz_sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


FIELDS = {"principal", "handle", "scope", "answer", "version", "selection", "time"}


def lines_of(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


@pytest.fixture(params=["threads", "aio"])
def logged(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[RunningSidecar, Path]]:
    """A sidecar serving the test policy (v1 active, v2 a live shadow bob and qa-bot may pick by
    header) that logs every decision."""
    policy = write_policy(tmp_path / "p", shadows=[shadow("v2", testers=["bob", "qa-bot"])])
    path = tmp_path / "decisions.jsonl"
    side = RunningSidecar(
        sidecar_settings(
            policy,
            identity=("jwt_authn",),
            server_model=request.param,
            decision_log=path,
        )
    )
    try:
        side.wait_ready()
        yield side, path
    finally:
        side.close()


def test_every_check_through_grpc_is_one_line_with_its_fields(logged: tuple[RunningSidecar, Path]) -> None:
    side, path = logged
    started = time.time()
    asked = [
        (request("/things/1", sub="alice"), 200),
        (request("/things/1", "PUT", sub="bob"), 403),
        (request("/things/1", "PUT", sub="bob", headers={"x-authz-shadow-version": "v2"}), 200),
        (request("/accounts/acme/things", sub="carol"), 200),
        (request("/things/1", sub="dave"), 403),
        # Refused before any set was consulted: no principal, so nothing to replay.
        (request("/things/1"), 401),
    ]
    for req, want in asked:
        assert status_of(check(side, req)) == want
    # Written within a second or so of the Checks, without waiting for the sidecar to stop.
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 5, timeout=5, what="5 lines")
    metrics = scrape(side)
    assert metrics[("authz_decision_log_dropped_total", (("reason", "queue_full"),))] == 0
    records = lines_of(path)
    assert all(set(r) == FIELDS for r in records)
    assert all(started <= r["time"] <= time.time() for r in records)
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {"principal": "alice", "handle": "things:view", "scope": None, "answer": "allow", "version": "v1",
         "selection": "default"},
        {"principal": "bob", "handle": "things:edit", "scope": None, "answer": "deny", "version": "v1",
         "selection": "default"},
        {"principal": "bob", "handle": "things:edit", "scope": None, "answer": "allow", "version": "v2",
         "selection": "header"},
        {"principal": "carol", "handle": "things:view", "scope": "account:acme", "answer": "allow", "version": "v1",
         "selection": "default"},
        {"principal": "dave", "handle": "things:view", "scope": None, "answer": "deny", "version": "v1",
         "selection": "default"},
    ]  # fmt: skip


def test_a_burst_rotates_without_losing_or_splitting_a_line(tmp_path: Path) -> None:
    """Eight clients at once through the real gRPC front; each file ends on a whole line within the
    size bound, and every decision is in exactly one of them."""
    policy = write_policy(tmp_path / "p")
    path = tmp_path / "decisions.jsonl"
    side = RunningSidecar(
        sidecar_settings(
            policy, identity=("jwt_authn",), decision_log=path, decision_log_max_bytes=4096, decision_log_keep=100
        )
    )
    per_client, clients = 150, 8
    try:
        side.wait_ready()

        def client(number: int) -> None:
            for i in range(per_client):
                assert status_of(check(side, request("/things/1", sub=f"c{number}-{i:04d}"))) == 403

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        side.close()
    files = sorted(tmp_path.glob("decisions.jsonl*"))
    assert len(files) > 5  # it did rotate, several times
    assert not (tmp_path / f"decisions.jsonl.{len(files)}").exists()
    for file in files:
        data = file.read_bytes()
        assert len(data) <= 4096 and data.endswith(b"\n"), file
    principals = [r["principal"] for r in lines_of(*files)]
    assert sorted(principals) == sorted(f"c{n}-{i:04d}" for n in range(clients) for i in range(per_client))


def _evaluation(version: str = "v1", allowed: bool = True) -> Evaluation:
    compiled = compile_set(parse_permission_set({**ACTIVE, "version": version}, version))
    reason = Reason.ALLOWED if allowed else Reason.MISSING_PERMISSION
    return Evaluation(reason, compiled, "active", Selection.DEFAULT, (), False)


def test_rotation_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    writer = DecisionLog(path, max_bytes=1000, keep=3, batch=7)
    writer.start()
    evaluation = _evaluation()
    for i in range(400):
        writer.record(f"p{i:04d}", "things:view", None, evaluation)
    writer.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.log", "d.log.1", "d.log.2", "d.log.3"]
    kept = [
        r["principal"]
        for r in lines_of(path.with_name("d.log.3"), path.with_name("d.log.2"), path.with_name("d.log.1"), path)
    ]
    # The newest lines, in order, none missing between the oldest kept and the last.
    assert kept == [f"p{i:04d}" for i in range(400 - len(kept), 400)]
    assert writer.written == 400 and writer.dropped == 0


def test_keep_zero_truncates_and_a_restart_appends(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    evaluation = _evaluation(allowed=False)
    for round_ in range(2):
        writer = DecisionLog(path, max_bytes=10_000, keep=0)
        writer.start()
        writer.record(f"r{round_}", "things:edit", "account:acme", evaluation)
        writer.stop()
    assert [(r["principal"], r["scope"], r["answer"]) for r in lines_of(path)] == [
        ("r0", "account:acme", "deny"),
        ("r1", "account:acme", "deny"),
    ]
    writer = DecisionLog(path, max_bytes=200, keep=0)
    writer.start()
    for i in range(10):
        writer.record(f"x{i}", "things:edit", None, evaluation)
    writer.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.log"]
    assert lines_of(path)[-1]["principal"] == "x9"


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path: Path) -> None:
    """The writer is not draining (never started): the queue of 4 fills and every further decision
    is counted as dropped in the metric, each put returning at once."""
    metrics = Metrics(SnapshotStore())
    writer = DecisionLog(tmp_path / "d.log", max_queue=4, dropped=metrics.decision_log_dropped)
    evaluation = _evaluation()
    started = time.perf_counter()
    for i in range(1000):
        writer.record(f"p{i}", "things:view", None, evaluation)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    assert writer.queued == 4 and writer.drops == {"queue_full": 996, "write_failed": 0}
    assert 'authz_decision_log_dropped_total{reason="queue_full"} 996.0' in metrics.render().decode()
    writer.start()
    writer.stop()
    assert [r["principal"] for r in lines_of(tmp_path / "d.log")] == ["p0", "p1", "p2", "p3"]


@pytest.mark.parametrize("where", ["missing/dir/d.log", "."])
def test_a_log_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path, where: str) -> None:
    policy = write_policy(tmp_path / "p")
    target = tmp_path / where
    result = run_cli(
        "serve",
        "--policy-dir",
        str(policy),
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        env={"AUTHZ_DECISION_LOG": str(target)},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"authz-sidecar: --decision-log {target}: "), result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--decision-log-keep", "-1", "must be >= 0"), ("--decision-log-max-bytes", "0", "must be > 0")],
)
def test_bad_rotation_settings_are_usage_errors(tmp_path: Path, flag: str, value: str, needle: str) -> None:
    result = run_cli("serve", "--policy-dir", str(tmp_path), "--decision-log", str(tmp_path / "d"), flag, value)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and flag in result.stderr and needle in result.stderr


def test_a_new_snapshot_lets_the_writer_forget_the_old_sets(tmp_path: Path) -> None:
    """The writer caches each line's JSON by evaluation; once told of a new snapshot it drops those
    of the old one, so a replaced million-grant set is not kept alive by the log."""
    writer = DecisionLog(tmp_path / "d.log", interval=0.01)
    writer.start()
    try:
        old, new = _evaluation("v1"), _evaluation("v2")
        writer.record("ann", "things:view", None, old)
        wait_for(lambda: writer.written == 1, what="the first line")
        assert any(cached is old for cached, _prefix in writer._prefixes.values())
        writer.forget()
        writer.record("ann", "things:view", None, new)
        wait_for(lambda: writer.written == 2, what="the second line")
        assert [cached for cached, _prefix in writer._prefixes.values()] == [new]
    finally:
        writer.stop()
    assert [r["version"] for r in lines_of(tmp_path / "d.log")] == ["v1", "v2"]
