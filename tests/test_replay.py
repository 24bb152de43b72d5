"""ctl replay: a decision log recorded by a real sidecar serving from etcd, replayed against a
proposal, reports exactly the flips the plan predicts for the questions in the log; a bad line is
counted and skipped; a missing file or an unknown version is one line and a non-zero exit."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar.control.replay import decision_files, read_decisions
from authz_sidecar.documents import parse_permission_set
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.replay import HandleFlips, replay

from .helpers import ROLES_WITH_ADMIN as ROLES
from .helpers import (
    check,
    ctl,
    ctl_captured,
    ctl_json,
    etcd_sidecar,
    request,
    seed,
    status_of,
    unique_prefix,
    write_json,
)

ACTIVE: dict[str, Any] = {
    "version": "v1",
    "roles": ROLES,
    "grants": [
        {"principal": "ann", "roles": ["admin"]},
        {"principal": "ed", "roles": ["editor"]},
        {"principal": "eli", "roles": ["editor"]},
        {"principal": "vic", "roles": ["viewer"]},
        {"principal": "cat", "roles": ["editor"], "scope": "account:acme"},
    ],
}
# Editors stop editing and zed may view (both declared); admins stop deleting (by accident).
V2: dict[str, Any] = {
    **ACTIVE,
    "version": "v2",
    "parent": "v1",
    "request_id": "CR-2",
    "reason": "editors only view now; zed joins",
    "roles": {**ROLES, "editor": ["things:view"], "admin": ["things:view", "things:edit"]},
    "grants": [*ACTIVE["grants"], {"principal": "zed", "roles": ["viewer"]}],
    "changes": [{"role": "editor", "remove": ["things:edit"]}, {"principal": "zed", "grant": ["viewer"]}],
}
# Who asks for what, how often: (principal, method, path, times, expected status under v1).
TRAFFIC = [
    ("ann", "GET", "/things/1", 2, 200),
    ("ann", "PUT", "/things/1", 1, 200),
    ("ed", "PUT", "/things/1", 3, 200),
    ("ed", "GET", "/things/2", 1, 200),
    ("vic", "GET", "/things/1", 2, 200),
    ("vic", "PUT", "/things/1", 2, 403),
    ("zed", "GET", "/things/1", 2, 403),
    ("cat", "GET", "/accounts/acme/things", 1, 200),
]


@dataclass
class Recording:
    endpoints: str
    prefix: str
    directory: Path
    log: Path
    records: int


@pytest.fixture(scope="module")
def recording(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """v1 active in etcd, a sidecar serving it that logs every decision (rotating every few lines),
    the traffic above through its gRPC front, then v2 proposed."""
    tmp = tmp_path_factory.mktemp("replay")
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp / "seed", active=ACTIVE)
    log = tmp / "logs" / "decisions.jsonl"
    log.parent.mkdir()
    side = etcd_sidecar(
        etcd.endpoints, prefix, tmp / "side", decision_log=log, decision_log_max_bytes=600, decision_log_keep=20
    )
    try:
        side.wait_ready()
        for principal, method, path, times, want in TRAFFIC:
            for _ in range(times):
                assert status_of(check(side, request(path, method, headers={"x-user": principal}))) == want
    finally:
        side.close()
    v2 = write_json(tmp / "v2.json", V2)
    assert ctl(etcd.endpoints, prefix, "propose", "--file", v2, "--accept-undeclared") == 0
    yield Recording(etcd.endpoints, prefix, tmp, log, sum(t[3] for t in TRAFFIC))


def flips(lost: int, losing: int, gained: int, gaining: int) -> dict[str, dict[str, int]]:
    """A handle's entry in the replay: requests and principals each way."""
    return {
        "allow_to_deny": {"requests": lost, "principals": losing},
        "deny_to_allow": {"requests": gained, "principals": gaining},
    }


def lines(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def test_replay_reports_the_flips_the_plan_predicts_for_the_logged_questions(recording: Recording) -> None:
    files = sorted(recording.log.parent.iterdir())
    assert len(files) > 2  # the log rotated: the glob below takes the rotated files too
    logged = lines(*files)
    assert len(logged) == recording.records
    result = ctl_json(
        recording.endpoints, recording.prefix, "replay", "v2", "--decisions", f"{recording.log.parent}/decisions.jsonl*"
    )
    plan = ctl_json(recording.endpoints, recording.prefix, "diff", "v2", "--limit", "100")
    assert plan["flips"] == len(plan["listed"])
    asked = {(r["principal"], r["handle"]) for r in logged}
    # "ed loses things:edit" (and " in SCOPE" for a scoped flip): the plan's flips of logged questions
    predicted = {f for f in plan["listed"] if (f.split(" ")[0], f.split(" ")[2]) in asked}
    # "ed loses things:edit: 3 request(s)" -> "ed loses things:edit", as the plan lists it
    replayed = {flip.rsplit(": ", 1)[0] for flip in result["listed"]}
    assert replayed == predicted == {"ed loses things:edit", "zed gains things:view"}
    assert result["by_handle"] == {"things:edit": flips(3, 1, 0, 0), "things:view": flips(0, 0, 2, 1)}
    assert (result["flipped_requests"], result["flipped_principals"]) == (5, 2)
    assert (result["records"], result["malformed"], result["drift"]) == (recording.records, 0, 0)
    assert result["recorded_versions"] == {"v1": recording.records}
    assert len(result["files"]) == len(files)
    times = [r["time"] for r in logged]
    assert (result["first_time"], result["last_time"]) == (min(times), max(times))
    assert result["first_utc"].endswith("Z") and result["first_utc"] <= result["last_utc"]
    # Nobody asked to delete: the accidental part of the change is the part this log cannot see.
    assert result["changed_handles_not_requested"] == ["things:delete"]
    assert result["changed_handles_not_exercised"] == ["things:delete"]
    assert set(plan["by_handle"]) == {"things:edit", "things:view", "things:delete"}


def test_the_active_set_itself_flips_nothing(recording: Recording) -> None:
    result = ctl_json(recording.endpoints, recording.prefix, "replay", "v1", "--decisions", str(recording.log))
    assert result["flips"] == 0 and result["by_handle"] == {} and result["changed_handles_not_requested"] == []


def test_malformed_lines_are_counted_and_skipped(recording: Recording, tmp_path: Path) -> None:
    good = [line.encode() for path in sorted(recording.log.parent.iterdir()) for line in path.read_text().splitlines()]
    reordered = json.dumps(dict(reversed(list(json.loads(good[0]).items())))).encode()  # another writer's order
    head, _sep, number = good[1].rpartition(b',"time":')
    bad = [
        b"not json",
        b'{"principal": 1, "handle": "things:view", "scope": null, "answer": "allow", "version": "v1", "time": 1}',
        b'{"principal":"ed","handle":"things:edit","scope":null,"answer":"maybe","version":"v1","time":1.5}',
        head + b',"time":"' + number[:-1] + b'"}',  # a time that is a string
        b'\xff\xfe{"principal"',  # not UTF-8
    ]
    path = tmp_path / "edited.jsonl"
    # Five good lines, one with its fields in another order, five bad, an empty one (not a record,
    # nor an error), and a line torn in half by a crash, last in the file.
    path.write_bytes(b"\n".join([*good[:5], reordered, *bad]) + b"\n\n" + good[2][: len(good[2]) // 2])
    result = ctl_json(recording.endpoints, recording.prefix, "replay", "v2", "--decisions", str(path))
    assert (result["records"], result["malformed"]) == (6, 6)
    assert result["malformed_at"] == [f"{path}:{n}" for n in (7, 8, 9, 10, 11, 13)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["replay", "v2", "--decisions", "/nonexistent/decisions.jsonl"], "--decisions /nonexistent/decisions.jsonl: "),
        (["replay", "v2", "--decisions", "/nonexistent/*.jsonl"], "no file matches"),
        (["replay", "v9", "--decisions", "LOG"], "'v9' is not stored"),
    ],
)
def test_a_missing_file_or_version_is_one_line_and_exit_1(recording: Recording, args: list[str], needle: str) -> None:
    args = [str(recording.log) if a == "LOG" else a for a in args]
    code, out, err = ctl_captured(recording.endpoints, recording.prefix, *args)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("authz-sidecar: ") and needle in err, err


def test_a_file_named_twice_is_read_once(recording: Recording) -> None:
    relative = Path(os.path.relpath(recording.log))
    files = decision_files([str(recording.log), f"{recording.log}*", str(relative)])
    assert files.count(recording.log) == 1 and relative not in files
    assert read_decisions(files).records == recording.records


def test_replay_counts_directions_principals_and_drift() -> None:
    """The pure part, with scopes and a log from before a change (drift)."""
    active = compile_set(parse_permission_set(ACTIVE, "v1"))
    proposed = compile_set(parse_permission_set(V2, "v2"))
    decisions = {
        ("ed", "things:edit", None, True): 5,
        ("eli", "things:edit", "account:x", True): 1,
        ("eli", "things:edit", "account:x", False): 2,  # recorded as a deny: v1 allows it now (drift)
        ("cat", "things:edit", "account:acme", True): 4,  # a scoped editor: v2 takes that too
        ("cat", "things:edit", None, False): 1,  # cat outside acme: denied before and after
        ("zed", "things:view", None, False): 7,
        ("nobody", "things:view", None, False): 1,
    }
    result = replay(decisions, active, proposed, ["things:edit", "things:view", "things:delete"])
    assert result.requests == 21 and result.distinct == 7 and result.drift == 2
    assert result.by_handle == {
        "things:edit": HandleFlips(allow_to_deny_requests=12, allow_to_deny_principals=3, deny_to_allow_requests=0,
                                   deny_to_allow_principals=0),
        "things:view": HandleFlips(0, 0, 7, 1),
    }  # fmt: skip
    assert [f.describe() for f in result.flips] == [
        "cat loses things:edit in account:acme: 4 request(s)",
        "ed loses things:edit: 5 request(s)",
        "eli loses things:edit in account:x: 3 request(s)",
        "zed gains things:view: 7 request(s)",
    ]
    assert result.changed_not_requested == ("things:delete",)
    assert (result.flipped_requests, result.flipped_principals) == (19, 4)
