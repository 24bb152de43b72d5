"""How fast ``ctl replay`` gets through a decision log (goal: 1,000,000 recorded decisions in under 10 s).

The log is written by the sidecar's own writer (:class:`DecisionLog`, rotated at its default size)
from traffic shaped like a service's: 10,000 principals holding one of three roles, a fifth of
the requests in the one account each principal works in, 1% from principals the set does not know.
The proposal takes a handle from one role, so part of the traffic flips. Timed: reading and parsing
every line with the distinct decisions counted, then the replay against both sets (compile, plan,
decide each distinct decision twice), which together are what ``ctl replay`` does after fetching
the two sets from etcd.

``python -m authz_sidecar.bench.replay [DECISIONS]``
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from authz_sidecar.control.replay import read_decisions, replay_sets
from authz_sidecar.documents import parse_permission_set
from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.evaluation import Evaluation
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import Selection
from authz_sidecar.telemetry.decisionlog import DecisionLog

PRINCIPALS = 10_000
ACCOUNTS = 50
HANDLES = ("things:view", "things:edit", "things:delete")
ROLES = {
    "viewer": ["things:view"],
    "editor": ["things:view", "things:edit"],
    "admin": ["things:view", "things:edit", "things:delete"],
}


def sets() -> tuple[Any, Any]:
    """The active set, and a proposal in which admins can no longer delete."""
    names = list(ROLES)
    grants: list[dict[str, Any]] = [{"principal": f"user-{i:05d}", "roles": [names[i % 3]]} for i in range(PRINCIPALS)]
    # Every tenth principal is an admin in its own account too.
    grants += [
        {"principal": f"user-{i:05d}", "roles": ["admin"], "scope": f"account:{i % ACCOUNTS}"}
        for i in range(0, PRINCIPALS, 10)
    ]
    active = parse_permission_set({"version": "v1", "roles": ROLES, "grants": grants}, "v1")
    roles = {**ROLES, "admin": ["things:view", "things:edit"]}
    proposal = parse_permission_set(
        {
            "version": "v2",
            "parent": "v1",
            "roles": roles,
            "grants": grants,
            "changes": [{"role": "admin", "remove": ["things:delete"]}],
        },
        "v2",
    )
    return active, proposal


def write_log(path: Path, decisions: int, seed: int = 7) -> dict[str, int]:
    """`decisions` lines through the sidecar's writer, each answered as the active set answers it."""
    active, _proposal = sets()
    compiled = compile_set(active)
    answers = {
        allowed: Evaluation(
            Reason.ALLOWED if allowed else Reason.MISSING_PERMISSION, compiled, "active", Selection.DEFAULT, (), False
        )
        for allowed in (True, False)
    }
    rng = random.Random(seed)  # noqa: S311 - a repeatable workload, not a secret
    writer = DecisionLog(path)
    writer.start()
    try:
        for i in range(decisions):
            n = rng.randrange(PRINCIPALS + PRINCIPALS // 100)
            principal = f"user-{n:05d}" if n < PRINCIPALS else f"stranger-{n}"
            handle = HANDLES[rng.randrange(3)]
            scope = f"account:{n % ACCOUNTS}" if rng.random() < 0.2 else None
            allowed = compiled.decide(principal, handle, scope) is Reason.ALLOWED
            writer.record(principal, handle, scope, answers[allowed])
            if i % 8192 == 0:
                while writer.queued > 16_384:  # the writer keeps up with a sidecar, not with this loop
                    time.sleep(0.001)
    finally:
        writer.stop(timeout=60)
    return {"written": writer.written, "dropped": writer.dropped, "rotations": writer.rotations}


def run(decisions: int = 1_000_000, rounds: int = 1) -> dict[str, Any]:
    """Median seconds of `rounds` replays of a log of `decisions` lines."""
    active, proposal = sets()
    with tempfile.TemporaryDirectory(prefix="authz-replay-") as tmp:
        path = Path(tmp) / "decisions.jsonl"
        written = write_log(path, decisions)
        files = sorted(Path(tmp).iterdir())
        size = sum(f.stat().st_size for f in files)
        reads, replays = [], []
        flipped = distinct = records = 0
        for _ in range(rounds):
            started = time.perf_counter()
            recorded = read_decisions(files)
            read = time.perf_counter() - started
            started = time.perf_counter()
            result = replay_sets(recorded, active, proposal)
            replays.append(time.perf_counter() - started)
            reads.append(read)
            flipped, distinct, records = result.flipped_requests, result.distinct, recorded.records
    read_s, replay_s = sorted(reads)[rounds // 2], sorted(replays)[rounds // 2]
    return {
        "decisions": records,
        "files": len(files),
        "megabytes": round(size / 1e6, 1),
        "distinct": distinct,
        "flipped_requests": flipped,
        "read_s": read_s,
        "replay_s": replay_s,
        "total_s": read_s + replay_s,
        "decisions_per_s": records / (read_s + replay_s),
        **written,
    }


def line(result: dict[str, Any]) -> str:
    return (
        f"replay of {result['decisions']:,} recorded decisions ({result['files']} files, {result['megabytes']} MB, "
        f"{result['distinct']:,} distinct, {result['flipped_requests']:,} flip): {result['total_s']:.2f} s "
        f"(read {result['read_s']:.2f} s, replay {result['replay_s']:.2f} s) = "
        f"{result['decisions_per_s']:,.0f} decisions/s (goal: 1,000,000 in under 10 s)"
    )


if __name__ == "__main__":
    print(line(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)))
