"""`authz-sidecar ctl` as an operator meets it: flags anywhere, one-line usage errors with exit 2,
pipes closed early, refusals that name the problem, and what status and report say.

Every test goes through the real command line (cli.main in this process, or the installed module in a
subprocess) against the session's real etcd.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_sidecar import cli
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.store import layout

from .helpers import (
    ACTIVE,
    CATALOG,
    ctl,
    ctl_json,
    decision,
    etcd_sidecar,
    raw_put,
    raw_set,
    seed,
    unique_prefix,
    wait_for,
    write_json,
)


def run_main(*argv: str) -> tuple[int, str, str]:
    """cli.main with its stdout and stderr captured; argparse's SystemExit counts as its exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # what argparse does on a usage error
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("authz-sidecar: "), err
    return lines[0]


def shadow_doc(version: str, **extra: Any) -> dict[str, Any]:
    grants = [*ACTIVE["grants"][:1], {"principal": "bob", "roles": ["editor"]}, *ACTIVE["grants"][2:]]
    return {"version": version, "parent": "v1", "roles": ACTIVE["roles"], "grants": grants, **extra}


# --- item 11: connection flags anywhere ------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after", "split"])
def test_connection_flags_work_before_and_after_every_verb(etcd: EtcdCluster, tmp_path: Path, where: str) -> None:
    """`ctl --etcd E status` and `ctl status --etcd E` alike, for every verb, as etcdctl and kubectl
    take them; --json too. 'split': some connection flags before the verb, the rest after it."""
    prefix = unique_prefix()
    conn = ["--etcd", etcd.endpoints, "--prefix", prefix, "--etcd-timeout", "3", "--json"]

    def run(*verb: str) -> Any:
        if where == "before":
            argv = ["ctl", *conn, *verb]
        elif where == "after":
            argv = ["ctl", *verb, *conn]
        else:
            argv = ["ctl", *conn[:2], *verb, *conn[2:]]
        code, out, err = run_main(*argv)
        assert code == 0, f"{argv}: {err}"
        return json.loads(out)

    catalog = write_json(tmp_path / "catalog.json", CATALOG)
    assert run("registry", "put", "--file", catalog)["service"] == "things"
    assert run("init", "--file", write_json(tmp_path / "a.json", ACTIVE))["active"] == "v1"
    why = ("--request-id", "CR-1", "--reason", "bob edits")
    assert run("propose", "--file", write_json(tmp_path / "v2.json", shadow_doc("v2")), *why)["proposed"] == "v2"
    assert run("canary", "v2", "--weight", "us-east=10")["weights"] == {"us-east": 10}
    status = run("status")
    assert status["active"] == "v1" and status["prefix"] == prefix and "v2" in status["shadows"]
    assert run("report", "v2")["version"] == "v2"
    assert run("registry", "get", "things:view")["permissions"][0]["service"] == "things"
    assert run("registry", "put", "--service", "things", "--handle", "things:archive")["service"] == "things"


def test_an_endpoint_may_be_written_as_a_url_as_etcdctl_takes_it(etcd: EtcdCluster) -> None:
    """`--etcd http://host:port` is how etcd's own tools spell an endpoint (and how compose files and
    manifests copy it); it names the same endpoint as host:port."""
    prefix = unique_prefix()
    urls = ",".join(f"http://{endpoint}/" for endpoint in etcd.endpoints.split(","))
    code, out, err = run_main("ctl", "status", "--etcd", urls, "--prefix", prefix, "--json")
    assert code == 0, err
    assert json.loads(out)["prefix"] == prefix


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--etcd-user", "someone"], "--etcd-user and --etcd-password go together"),
        (["--etcd-ca", "/nonexistent/ca.pem"], "--etcd-ca /nonexistent/ca.pem: not a file"),
        (["--etcd-cert", "/nonexistent/c.pem", "--etcd-key", "/nonexistent/k.pem"], "--etcd-cert needs --etcd-ca"),
        (["--etcd-timeout", "0"], "--etcd-timeout must be > 0"),
    ],
)
def test_tls_and_auth_flags_before_the_verb_take_effect(flags: list[str], needle: str) -> None:
    """The TLS and authentication flags given before the verb reach the connection (here: each is
    refused for what it says, which shows it was read)."""
    code, _out, err = run_main("ctl", *flags, "--etcd", "127.0.0.1:1", "status")
    assert code == 2
    assert needle in one_error_line(err)


# --- usage errors: one line, exit 2 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ctl", "status", "--bogus"], "unrecognized arguments: --bogus"),
        (["ctl"], "ctl"),
        (["ctl", "frobnicate", "--etcd", "127.0.0.1:1"], "frobnicate"),
        (["ctl", "canary", "--etcd", "127.0.0.1:1"], "version"),
        (["ctl", "status"], "--etcd"),  # no endpoint at all
        (["ctl", "--etcd", "nowhere", "status"], "--etcd: 'nowhere' is not host:port"),
        (["ctl", "--etcd", "ftp://etcd:2379", "status"], "--etcd: 'ftp://etcd:2379' is not host:port"),
        (["ctl", "--etcd", "https://etcd:2379", "status"], "https:// needs --etcd-ca"),
        (["ctl", "--etcd", "http://etcd:2379/v3", "status"], "is not host:port"),
        (["serve", "--etcd", "ftp://etcd:2379"], "--etcd: 'ftp://etcd:2379' is not host:port"),
        (["ctl", "canary", "v2", "--weight", "us-east=lots", "--etcd", "127.0.0.1:1"], "--weight"),
        (["ctl", "registry", "put", "--etcd", "127.0.0.1:1"], "--file CATALOG, or --service and --handle"),
        (["serve", "--no-such-flag"], "--no-such-flag"),
        (["serve"], "no policy source"),
        (["serve", "--policy-dir", ".", "--grace", "soon"], "not a number"),
        ([], "COMMAND"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(argv: list[str], needle: str) -> None:
    code, out, err = run_main(*argv)
    assert (code, out) == (2, "")
    assert needle in one_error_line(err)


def test_a_usage_error_exits_2_from_the_installed_command() -> None:
    """The same through a real process: what a shell script sees."""
    result = subprocess.run(
        [sys.executable, "-m", "authz_sidecar", "ctl", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "--etcd" in one_error_line(result.stderr)


# --- item 12: paper cuts ----------------------------------------------------------------------------


def test_output_into_a_closed_pipe_is_no_traceback(etcd: EtcdCluster, tmp_path: Path) -> None:
    """`ctl ... | head`: the reader has gone; the command stops quietly (exit 141, as after SIGPIPE)."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command prints anything
    try:
        result = subprocess.run(
            [sys.executable, "-m", "authz_sidecar", "ctl", "status", "--etcd", etcd.endpoints, "--prefix", prefix],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.stderr == ""
    assert result.returncode == 141


def test_registry_put_refuses_a_handle_another_service_owns(etcd: EtcdCluster, tmp_path: Path) -> None:
    """The same rule as the gRPC Registry's ALREADY_EXISTS: a service registers its own handles only,
    one at a time or in a catalog file; nothing is written."""
    prefix = unique_prefix()
    billing = write_json(tmp_path / "billing.json", {"service": "billing", "permissions": [{"handle": "billing:pay"}]})
    assert ctl(etcd.endpoints, prefix, "registry", "put", "--file", billing) == 0
    assert ctl(etcd.endpoints, prefix, "registry", "put", "--file", write_json(tmp_path / "c.json", CATALOG)) == 0

    conn = ("--etcd", etcd.endpoints, "--prefix", prefix)
    code, _out, err = run_main("ctl", "registry", "put", "--service", "things", "--handle", "billing:pay", *conn)
    assert code == 1
    assert "'billing:pay' is owned by service 'billing'" in one_error_line(err)

    claiming = {**CATALOG, "permissions": [*CATALOG["permissions"], {"handle": "billing:pay"}]}
    code, _out, err = run_main("ctl", "registry", "put", "--file", write_json(tmp_path / "c2.json", claiming), *conn)
    assert code == 1
    assert "'billing:pay' is owned by service 'billing'" in one_error_line(err)

    owners = ctl_json(etcd.endpoints, prefix, "registry", "get", "billing:pay")["permissions"]
    assert owners == [{"service": "billing", "handle": "billing:pay", "description": ""}]
    things = ctl_json(etcd.endpoints, prefix, "registry", "get", "--service", "things")["permissions"]
    assert "billing:pay" not in {p["handle"] for p in things}
    # Its own service may register it again (a description changes, say).
    assert ctl(etcd.endpoints, prefix, "registry", "put", "--service", "billing", "--handle", "billing:pay") == 0


def test_propose_takes_request_id_reason_and_author_from_the_file(etcd: EtcdCluster, tmp_path: Path) -> None:
    """The shadow file's own request_id, reason and author stand when the flags are absent; a flag
    given wins; with neither, a usage error says where to put it."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    meta = {"request_id": "CR-7", "reason": "bob edits things", "author": "platform-team"}
    v2 = tmp_path / "v2.yaml"
    v2.write_text(yaml.safe_dump(shadow_doc("v2", **meta)))
    proposed = ctl_json(etcd.endpoints, prefix, "propose", "--file", str(v2))
    assert (proposed["request_id"], proposed["reason"], proposed["author"]) == (
        "CR-7",
        "bob edits things",
        "platform-team",
    )

    # v3 changes the handle v2 holds a lock on: v2 is rolled back first.
    assert ctl(etcd.endpoints, prefix, "rollback", "v2", "--request-id", "RB-7", "--reason", "superseded") == 0
    v3 = write_json(tmp_path / "v3.json", shadow_doc("v3", **meta))
    proposed = ctl_json(etcd.endpoints, prefix, "propose", "--file", v3, "--request-id", "CR-8", "--author", "ops")
    assert (proposed["request_id"], proposed["reason"], proposed["author"]) == ("CR-8", "bob edits things", "ops")

    bare = write_json(tmp_path / "v4.json", shadow_doc("v4"))
    code, _out, err = run_main("ctl", "propose", "--file", bare, "--etcd", etcd.endpoints, "--prefix", prefix)
    assert code == 2
    assert "request_id" in one_error_line(err)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("version: v2\nparent: v1\nroles:\n  viewer: [things:view\ngrants: []\n", "line "),
        ("version: v2\nroles:\n\tviewer: [things:view]\n", "line 3, column 1"),
        ('{"version": "v2", "roles": {}, "grants": [}\n', "line 1, column 43"),
    ],
)
def test_a_syntax_error_is_one_line_naming_file_line_and_column(
    etcd: EtcdCluster, tmp_path: Path, body: str, needle: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    code, _out, err = run_main("ctl", "propose", "--file", str(path), "--request-id", "r", "--reason", "r",
                               "--etcd", etcd.endpoints, "--prefix", unique_prefix())  # fmt: skip
    assert code == 1
    line = one_error_line(err)
    assert str(path) in line and needle in line, line


def test_a_fractional_weight_is_called_what_it_is(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    path = write_json(tmp_path / "v2.json", shadow_doc("v2", weights={"us-east": 2.5}))
    code, _out, err = run_main("ctl", "propose", "--file", path, "--request-id", "r", "--reason", "r",
                               "--etcd", etcd.endpoints, "--prefix", prefix)  # fmt: skip
    line = one_error_line(err)
    assert code == 1 and "weights.us-east" in line and "whole number" in line, line
    assert "outside" not in line


def test_a_duplicate_key_names_its_path_once(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    path = tmp_path / "v2.yaml"
    path.write_text("version: v2\nroles:\n  viewer: [things:view]\n  viewer: [things:edit]\ngrants: []\n")
    code, _out, err = run_main("ctl", "init", "--file", str(path), "--etcd", etcd.endpoints, "--prefix", prefix)
    line = one_error_line(err)
    assert code == 1 and f"{path}: roles.viewer: duplicate key" in line and "line 4" in line, line
    assert line.count("viewer") == 1, line


def test_status_checks_what_the_pointers_point_at(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A pointer to a version that is not stored (or does not build) is a problem status names, with
    a non-zero exit; a healthy prefix says so with exit 0."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    why = ("--request-id", "CR-1", "--reason", "r")
    assert (
        ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", shadow_doc("v2")), *why) == 0
    )
    healthy = ctl_json(etcd.endpoints, prefix, "status")
    assert healthy["problems"] == [] and healthy["active"] == "v1"

    lay = layout.Layout(prefix)
    raw_put(etcd.endpoints, lay.active, layout.encode_active("v404"))
    code, out, err = run_main("ctl", "status", "--json", "--etcd", etcd.endpoints, "--prefix", prefix)
    assert code == 1
    shown = json.loads(out)
    assert shown["active"] == "v404"
    assert len(shown["problems"]) == 1 and "v404" in shown["problems"][0] and "not in etcd" in shown["problems"][0]
    assert "v404" in one_error_line(err)

    # A shadow whose stored document grants a handle no catalog has (written around ctl).
    raw_put(etcd.endpoints, lay.active, layout.encode_active("v1"))
    raw_set(etcd.endpoints, prefix, {"version": "v3", "roles": {"r": ["things:fly"]}, "grants": []})
    shadows = ctl_json(etcd.endpoints, prefix, "status")["shadows"]
    shadows["v3"] = {"weights": {}, "testers": [], "state": "proposed"}
    raw_put(etcd.endpoints, lay.shadows, json.dumps(shadows).encode())
    code, out, err = run_main("ctl", "status", "--etcd", etcd.endpoints, "--prefix", prefix)
    assert code == 1
    assert "things:fly" in one_error_line(err) and "v3" in one_error_line(err)
    assert "active: v1" in out


def test_report_names_the_principals_and_handles_behind_unexpected_mismatches(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """v2 declares one change (bob becomes an editor) but also makes qa-bot an editor and lets dave
    view: their requests are unexpected mismatches, and the report says whose and on what."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    grants = [
        {"principal": "alice", "roles": ["editor"]},
        {"principal": "bob", "roles": ["editor"]},
        {"principal": "carol", "roles": ["editor"], "scope": "account:acme"},
        {"principal": "qa-bot", "roles": ["editor"]},
        {"principal": "dave", "roles": ["viewer"]},
    ]
    v2 = {**shadow_doc("v2"), "grants": grants, "changes": [{"principal": "bob", "grant": ["editor"]}]}
    # qa-bot's and dave's flips are undeclared: propose refuses them unless they are accepted.
    why = ("--request-id", "CR-3", "--reason", "bob edits", "--accept-undeclared")
    assert ctl(etcd.endpoints, prefix, "propose", "--file", write_json(tmp_path / "v2.json", v2), *why) == 0
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path / "s", report_interval=0.3)
    try:
        side.wait_ready()
        assert decision(side, "bob") == 403  # expected: declared
        for _ in range(3):
            assert decision(side, "qa-bot") == 403  # unexpected: things:edit
        assert decision(side, "dave", "GET") == 403  # unexpected: things:view

        def report() -> Any:
            return ctl_json(etcd.endpoints, prefix, "report", "v2")

        wait_for(lambda: report()["evaluations"] == 5, what="the sidecar's report")
        summed = report()
        assert summed["mismatches"] == {"expected/deny_to_allow": 1, "unexpected/deny_to_allow": 4}
        assert summed["unexpected_principals"] == [
            {"principal": "qa-bot", "mismatches": 3},
            {"principal": "dave", "mismatches": 1},
        ]
        assert summed["unexpected_handles"] == [
            {"handle": "things:edit", "mismatches": 3},
            {"handle": "things:view", "mismatches": 1},
        ]
        assert summed["unexpected_unlisted"] == 0
    finally:
        side.close()


def test_an_audit_record_names_the_account_when_the_environment_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container or a CI job USER and LOGNAME are often unset; the record still names who ran
    the command (the account ctl runs as), never 'unknown' while the system knows."""
    import pwd

    from authz_sidecar.control import rollouts

    for name in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    account = pwd.getpwuid(os.getuid()).pw_name
    assert rollouts.who() == account  # the one rule for every record ctl and the rollout verbs write
