"""The change lifecycle over a real etcd: propose (with its plan and locks), promote in one
transaction, roll back, every write audited in a hash chain, each request id done once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions

from .helpers import ROLES_WITH_ADMIN as ROLES
from .helpers import (
    ctl,
    ctl_captured,
    ctl_json,
    decision,
    etcd_sidecar,
    raw_put,
    seed,
    unique_prefix,
    wait_for,
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
    ],
}


def no_edit_for_editors(version: str = "v2", request_id: str = "CR-2") -> dict[str, Any]:
    """Editors stop editing: a declared change of one role."""
    return {
        **ACTIVE,
        "version": version,
        "parent": "v1",
        "request_id": request_id,
        "reason": "editors only view now",
        "roles": {**ROLES, "editor": ["things:view"]},
        "changes": [{"role": "editor", "remove": ["things:edit"]}],
    }


def no_delete_for_admins(version: str = "v3", request_id: str = "CR-3") -> dict[str, Any]:
    return {
        **ACTIVE,
        "version": version,
        "parent": "v1",
        "request_id": request_id,
        "reason": "nobody deletes",
        "roles": {**ROLES, "admin": ["things:view", "things:edit"]},
        "changes": [{"role": "admin", "remove": ["things:delete"]}],
    }


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("authz-sidecar:")]


def test_the_whole_story_propose_plan_promote_and_the_sidecars_follow(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side")
    try:
        side.wait_ready()
        assert decision(side, "ed", "PUT") == 200
        proposed = ctl_json(
            etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", no_edit_for_editors())
        )
        plan = proposed["plan"]
        assert plan["listed"] == ["ed loses things:edit", "eli loses things:edit"] and plan["undeclared"] == 0
        assert ctl_json(etcd.endpoints, prefix, "status")["locks"] == {
            "things:edit": {"version": "v2", "request_id": "CR-2"}
        }
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        monkeypatch.setenv("TRACEPARENT", f"00-{trace_id}-00f067aa0ba902b7-01")  # ctl run inside a trace
        why = ("--request-id", "PR-2", "--reason", "reviewed", "--author", "ops")
        promoted = ctl_json(etcd.endpoints, prefix, "promote", "v2", *why)
        monkeypatch.delenv("TRACEPARENT")
        assert promoted["active"] == "v2" and not promoted["repeated"]
        wait_for(lambda: decision(side, "ed", "PUT") == 403, what="the sidecar to decide with v2")
        assert decision(side, "ann", "PUT") == 200
        status = ctl_json(etcd.endpoints, prefix, "status")
        assert status["active"] == "v2" and status["shadows"] == {} and status["locks"] == {}
        chain = ctl_json(etcd.endpoints, prefix, "audit", "--verify")
        assert chain["verified"] and [r["action"] for r in chain["records"]] == ["init", "propose", "promote"]
        promote = chain["records"][-1]
        assert (promote["before"], promote["after"], promote["who"], promote["request_id"]) == (
            "v1",
            "v2",
            "ops",
            "PR-2",
        )
        assert promote["impact"] == {"flips": 2, "principals": 2} and promote["trace_id"] == trace_id
        assert status["dead_letters"] == 0
        assert status["audit_head"] == {"seq": 3, "hash": promote["hash"]}
    finally:
        side.close()


def test_two_promotions_of_one_parent_at_once_exactly_one_wins(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Two ctl processes promote two shadows of v1 at the same moment: one becomes active, the
    other is refused as stale and its weights are zero; the audit chain holds."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    v2 = write_json(tmp_path / "v2.json", {**no_edit_for_editors(), "weights": {"us-east": 10}})
    v3 = write_json(tmp_path / "v3.json", {**no_delete_for_admins(), "weights": {"us-east": 20}})
    for path in (v2, v3):
        assert ctl(etcd.endpoints, prefix, "propose", "--file", path) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "authz_sidecar",
                "ctl",
                "promote",
                version,
                "--request-id",
                f"PR-{version}",
                "--reason",
                "race",
                "--etcd",
                etcd.endpoints,
                "--prefix",
                prefix,
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for version in ("v2", "v3")
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        results.append((process.returncode, out, err))
    winners = [json.loads(out)["active"] for code, out, _err in results if code == 0]
    losers = [errors(err) for code, _out, err in results if code != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "stale" in losers[0][0] and "--rebase" in losers[0][0]
    loser = "v3" if winners[0] == "v2" else "v2"
    status = ctl_json(etcd.endpoints, prefix, "status")
    assert status["active"] == winners[0]
    assert status["shadows"] == {loser: {"state": "stale", "testers": [], "weights": {}}}
    assert ctl_json(etcd.endpoints, prefix, "audit", "--verify")["verified"]
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "canary", loser, "--weight", "us-east=5")
    assert code == 1 and "stale" in errors(err)[0]


def test_a_locked_handle_refuses_a_second_proposal_until_the_first_is_rolled_back(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    assert (
        ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", no_edit_for_editors())) == 0
    )
    second = write_json(tmp_path / "v4.json", no_edit_for_editors("v4", "CR-4"))
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "propose", "--file", second)
    assert code == 1 and "'things:edit' is locked by 'v2' (request 'CR-2')" in errors(err)[0]
    rolled = ctl_json(etcd.endpoints, prefix, "rollback", "v2", "--request-id", "RB-2", "--reason", "not now")
    assert rolled["rolled_back"] == "v2"
    assert ctl_json(etcd.endpoints, prefix, "status")["locks"] == {}
    assert ctl(etcd.endpoints, prefix, "propose", "--file", second) == 0


def test_each_request_id_has_one_effect_and_one_record(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    v2 = write_json(tmp_path / "v2.json", no_edit_for_editors())
    assert not ctl_json(etcd.endpoints, prefix, "propose", "--file", v2)["repeated"]
    assert ctl_json(etcd.endpoints, prefix, "propose", "--file", v2)["repeated"]
    other = write_json(tmp_path / "v2b.json", {**no_edit_for_editors(), "reason": "other content", "grants": []})
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "propose", "--file", other)
    assert code == 1 and "request id 'CR-2' was already used" in errors(err)[0]
    step = ("canary", "v2", "--weight", "us-east=10", "--request-id", "CN-2")
    assert not ctl_json(etcd.endpoints, prefix, *step)["repeated"]
    assert ctl_json(etcd.endpoints, prefix, *step)["repeated"]
    why = ("--request-id", "PR-2", "--reason", "go")
    assert not ctl_json(etcd.endpoints, prefix, "promote", "v2", *why)["repeated"]
    assert ctl_json(etcd.endpoints, prefix, "promote", "v2", *why)["repeated"]
    chain = ctl_json(etcd.endpoints, prefix, "audit", "--verify")
    assert [r["action"] for r in chain["records"]] == ["init", "propose", "canary", "promote"] and chain["verified"]


def test_an_edited_and_a_removed_audit_record_are_named(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    assert (
        ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", no_edit_for_editors())) == 0
    )
    assert ctl(etcd.endpoints, prefix, "rollback", "v2", "--request-id", "RB-2", "--reason", "r") == 0
    assert (
        ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v3.json", no_delete_for_admins())) == 0
    )
    lay = layout.Layout(prefix)
    records = {r["seq"]: r for r in ctl_json(etcd.endpoints, prefix, "audit")["records"]}
    assert sorted(records) == [1, 2, 3, 4]
    edited = {**records[2], "reason": "nothing to see here"}
    raw_put(etcd.endpoints, lay.audit_record(2), json.dumps(edited).encode())
    code, out, err = ctl_captured(etcd.endpoints, prefix, "audit", "--verify", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and problems == [f"{lay.audit_record(2)}: its content does not match its hash (edited)"]
    assert "1 problem(s)" in errors(err)[0]

    async def remove() -> None:
        async with Etcd(EtcdOptions(endpoints=tuple(etcd.endpoints.split(",")))) as client:
            await client.call(client.kv.delete, lay.audit_record(3))

    asyncio.run(remove())
    problems = ctl_json_failing(etcd.endpoints, prefix, "audit", "--verify")["problems"]
    assert f"{lay.audit_record(4)}: record(s) 3 missing before it (removed)" in problems


def ctl_json_failing(endpoints: str, prefix: str, *args: str) -> Any:
    """`ctl ... --json` for a command that reports problems (exit 1) and still prints its result."""
    code, out, _err = ctl_captured(endpoints, prefix, *args, "--json")
    assert code == 1
    return json.loads(out)


def test_a_rollback_while_etcd_is_down_is_queued_locally_and_retried_exactly_once(tmp_path: Path) -> None:
    """etcd is stopped when a rollback is asked for: after its retries it lands in the local
    dead-letter file (one line says so); once etcd is back, `dlq retry` completes it, once."""
    member = EtcdCluster(tmp_path / "etcd")
    try:
        member.start()
        prefix = unique_prefix()
        seed(member.endpoints, prefix, tmp_path, active=ACTIVE)
        assert (
            ctl(member.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", no_edit_for_editors()))
            == 0
        )
        dlq = tmp_path / "dlq.json"
        member.members[0].kill()
        args = (
            "rollback",
            "v2",
            "--request-id",
            "RB-9",
            "--reason",
            "bad change",
            "--retries",
            "2",
            "--dlq-file",
            str(dlq),
        )
        code, _out, err = ctl_captured(member.endpoints, prefix, *args)
        assert code == 1 and len(errors(err)) == 1
        assert f"queued in the dead-letter queue (local file {dlq})" in errors(err)[0]
        assert json.loads(dlq.read_text())["RB-9"]["version"] == "v2"

        member.restart(member.members[0])
        listed = ctl_json(member.endpoints, prefix, "dlq", "list", "--dlq-file", str(dlq))
        assert list(listed["local"]) == ["RB-9"] and listed["etcd"] == {}
        retried = ctl_json(member.endpoints, prefix, "dlq", "retry", "--dlq-file", str(dlq))
        assert retried["retried"] == [{"request_id": "RB-9", "version": "v2", "repeated": False, "from": "local"}]
        assert json.loads(dlq.read_text()) == {}
        assert ctl_json(member.endpoints, prefix, "status")["shadows"] == {}
        # Nothing is left to retry, and the rollback is in the audit chain once.
        assert ctl_json(member.endpoints, prefix, "dlq", "retry", "--dlq-file", str(dlq))["retried"] == []
        chain = ctl_json(member.endpoints, prefix, "audit", "--verify")
        assert [r["action"] for r in chain["records"]].count("rollback") == 1 and chain["verified"]
    finally:
        member.stop()


def test_history_lists_the_active_sets_and_old_ones_are_pruned_keeping_their_digest(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Three active sets in turn with --keep 1: the oldest document is deleted from etcd, its place
    in the history (who, why, digest) stays."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    assert (
        ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", no_edit_for_editors())) == 0
    )
    first = ctl_json(etcd.endpoints, prefix, "promote", "v2", "--request-id", "PR-2", "--reason", "a", "--keep", "1")
    assert first["pruned"] == []
    v3 = {
        **no_delete_for_admins(),
        "parent": "v2",
        "roles": {**ROLES, "editor": ["things:view"], "admin": ["things:view", "things:edit"]},
    }
    assert ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v3.json", v3)) == 0
    second = ctl_json(etcd.endpoints, prefix, "promote", "v3", "--request-id", "PR-3", "--reason", "b", "--keep", "1")
    assert second["pruned"] == ["v1"]
    history = ctl_json(etcd.endpoints, prefix, "history")["history"]
    assert [(h["version"], h["action"], h["stored"]) for h in history] == [
        ("v1", "init", False),
        ("v2", "promote", True),
        ("v3", "promote", True),
    ]
    assert len(history[0]["sha256"]) == 64 and history[2]["reason"] == "b" and history[2]["before"] == "v2"
    assert ctl_json(etcd.endpoints, prefix, "status")["problems"] == []


def test_rollback_to_an_earlier_active_set_restores_it_as_a_new_version_and_shows_its_plan(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """A promoted change turns out wrong: `rollback --to v1` makes v1's content active again as a new
    version whose plan names who gets back what; live shadows become stale; done once per request id."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side")
    try:
        side.wait_ready()
        assert (
            ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", no_edit_for_editors()))
            == 0
        )
        assert ctl(etcd.endpoints, prefix, "promote", "v2", "--request-id", "PR-2", "--reason", "go") == 0
        wait_for(lambda: decision(side, "ed", "PUT") == 403, what="v2 to decide")
        why = ("--to", "v1", "--request-id", "RS-1", "--reason", "editors need to edit after all")
        restored = ctl_json(etcd.endpoints, prefix, "rollback", *why)
        assert restored["active"] == "v1-r4" and not restored["repeated"]
        assert restored["plan"]["listed"] == ["ed gains things:edit", "eli gains things:edit"]
        wait_for(lambda: decision(side, "ed", "PUT") == 200, what="the restored set to decide")
        assert ctl_json(etcd.endpoints, prefix, "rollback", *why)["repeated"]
        history = ctl_json(etcd.endpoints, prefix, "history")["history"]
        assert [(h["version"], h["action"]) for h in history][-1] == ("v1-r4", "restore")
        assert ctl_json(etcd.endpoints, prefix, "audit", "--verify")["verified"]
        code, _out, err = ctl_captured(
            etcd.endpoints, prefix, "rollback", "--to", "v9", "--request-id", "RS-2", "--reason", "x"
        )
        assert code == 1 and "'v9' is not stored" in errors(err)[0]
    finally:
        side.close()


def test_a_stale_shadow_is_rebased_by_re_applying_its_declared_changes(etcd: EtcdCluster, tmp_path: Path) -> None:
    """v2 and v3 both start from v1; v2 is promoted, so v3 is stale. Rebasing v3 re-applies its
    declared change onto v2 as a new version (v2's change kept), which replaces v3 and its locks."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    for name, document in (("v2", no_edit_for_editors()), ("v3", no_delete_for_admins())):
        assert ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / f"{name}.json", document)) == 0
    assert ctl(etcd.endpoints, prefix, "promote", "v2", "--request-id", "PR-2", "--reason", "go") == 0
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "promote", "v3", "--request-id", "PR-3", "--reason", "go")
    assert code == 1 and "ctl propose --rebase v3" in errors(err)[0]

    rebased = ctl_json(
        etcd.endpoints, prefix, "propose", "--rebase", "v3", "--request-id", "CR-3b", "--reason", "rebase"
    )
    version = rebased["proposed"]
    assert version.startswith("v3-r") and rebased["parent"] == "v2"
    assert rebased["plan"]["listed"] == ["ann loses things:delete"] and rebased["plan"]["undeclared"] == 0
    status = ctl_json(etcd.endpoints, prefix, "status")
    assert list(status["shadows"]) == [version]
    assert status["locks"] == {"things:delete": {"request_id": "CR-3b", "version": version}}
    assert ctl(etcd.endpoints, prefix, "promote", version, "--request-id", "PR-3b", "--reason", "go") == 0
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side")
    try:
        side.wait_ready()
        assert decision(side, "ed", "PUT") == 403  # v2's change kept
        assert decision(side, "ann", "PUT") == 200
    finally:
        side.close()


def test_a_promotion_killed_midway_is_wholly_before_or_after_and_a_rerun_finishes_it(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """ctl promote killed with SIGKILL at several moments: each time the pointers show v1 with v2
    live, or v2 active, never a mix; running the same request id again completes it, once."""
    import signal
    import time

    for attempt, delay in enumerate((0.05, 0.2, 0.4, 0.8)):
        prefix = unique_prefix()
        seed(etcd.endpoints, prefix, tmp_path / f"a{attempt}", active=ACTIVE)
        v2 = write_json(tmp_path / f"v2-{attempt}.json", no_edit_for_editors())
        assert ctl(etcd.endpoints, prefix, "propose", "--file", v2) == 0
        argv = [sys.executable, "-m", "authz_sidecar", "ctl", "promote", "v2", "--request-id", "PR-K", "--reason", "k",
                "--etcd", etcd.endpoints, "--prefix", prefix]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        status = ctl_json(etcd.endpoints, prefix, "status")
        before = status["active"] == "v1" and list(status["shadows"]) == ["v2"] and status["locks"]
        after = status["active"] == "v2" and status["shadows"] == {} and not status["locks"]
        assert before or after, status
        assert ctl(etcd.endpoints, prefix, "promote", "v2", "--request-id", "PR-K", "--reason", "k") == 0
        chain = ctl_json(etcd.endpoints, prefix, "audit", "--verify")
        assert chain["verified"] and [r["action"] for r in chain["records"]].count("promote") == 1
        assert ctl_json(etcd.endpoints, prefix, "status")["active"] == "v2"


def test_a_change_file_is_applied_to_the_active_set_with_a_version_assigned(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Operations against the active set: a role created and granted, a role's handle removed, a
    grant's scope moved; the version is assigned; the same request id and file again is the same
    shadow, and the plan is exact."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    change = {
        "request_id": "CR-50",
        "reason": "auditors, and eli only edits acme's things",
        "changes": [
            {"role": "auditor", "create": ["things:view"]},
            {"principal": "vic", "grant": ["auditor"], "revoke": ["viewer"]},
            {"principal": "eli", "role": "editor", "to": "account:acme"},
            {"role": "admin", "remove": ["things:delete"]},
        ],
    }
    path = write_json(tmp_path / "change.json", change)
    proposed = ctl_json(etcd.endpoints, prefix, "propose", "--file", path)
    version = proposed["proposed"]
    assert version.startswith("v1-c") and proposed["parent"] == "v1" and not proposed["repeated"]
    assert proposed["plan"]["undeclared"] == 0
    # vic keeps viewing through the new role; eli keeps editing inside account:acme only.
    assert proposed["plan"]["listed"] == ["ann loses things:delete", "eli loses things:edit", "eli loses things:view"]
    again = ctl_json(etcd.endpoints, prefix, "propose", "--file", path)
    assert again["repeated"] and again["proposed"] == version
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "side")
    try:
        side.wait_ready()
        assert ctl(etcd.endpoints, prefix, "promote", version, "--request-id", "PR-50", "--reason", "go") == 0
        wait_for(lambda: decision(side, "eli", "PUT") == 403, what="the change to decide")
        assert decision(side, "eli", "GET", "/accounts/acme/things") == 200
        assert decision(side, "vic", "GET") == 200
    finally:
        side.close()


def test_a_dead_letter_dropped_with_a_reason_is_audited(etcd: EtcdCluster, tmp_path: Path) -> None:
    """An operator gives up on a dead letter: it leaves the queue and the audit chain says who and why."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path, active=ACTIVE)
    dlq = tmp_path / "dlq.json"
    letter = {"action": "rollback", "version": "v9", "request_id": "RB-X", "reason": "r", "who": "ops"}
    dlq.write_text(json.dumps({"RB-X": letter}))
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "dlq", "drop", "RB-X", "--dlq-file", str(dlq))
    assert code == 2 and "--reason" in errors(err)[0]
    dropped = ctl_json(etcd.endpoints, prefix, "dlq", "drop", "RB-X", "--reason", "v9 is gone", "--dlq-file", str(dlq))
    assert dropped["dropped"] == "RB-X" and json.loads(dlq.read_text()) == {}
    record = ctl_json(etcd.endpoints, prefix, "audit")["records"][-1]
    assert (record["action"], record["reason"], record["dropped"]["version"]) == ("dlq_drop", "v9 is gone", "v9")
