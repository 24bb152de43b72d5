"""Policy test cases: parsed with clear errors, run offline by ctl test (a failure says which grants
and roles gave the answer), run by validate on a policy directory, registered per service, and sent
through a real Envoy with the tester header, where the running sidecars must agree with ctl test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_sidecar.documents.cases import parse_cases
from authz_sidecar.errors import DocumentError
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.mesh import Mesh

from .helpers import CATALOG, ctl_captured, ctl_json, seed, shadow, unique_prefix, write_json, write_policy

CASES: dict[str, Any] = {
    "service": "things",
    "cases": [
        {"name": "alice edits", "principal": "alice", "permission": "things:edit", "expect": "allow"},
        {"name": "bob only views", "principal": "bob", "route": "PUT /things/42", "expect": "deny"},
        {"name": "bob views", "principal": "bob", "route": "GET /things/42", "expect": "allow"},
        {
            "name": "carol edits in acme",
            "principal": "carol",
            "permission": "things:edit",
            "scope": "account:acme",
            "expect": "allow",
        },
        {
            "name": "carol reads acme's list",
            "principal": "carol",
            "route": "GET /accounts/acme/things",
            "expect": "allow",
        },
        {"name": "nobody reaches /admin", "principal": "alice", "route": "GET /admin", "expect": "deny"},
    ],
}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ({"principal": "bob", "permission": "things:view", "expect": "allow"}, "name"),
        ({"name": "x", "principal": "bob", "permission": "things:view", "route": "GET /", "expect": "allow"}, "one of"),
        ({"name": "x", "principal": "bob", "permission": "things:view", "expect": "maybe"}, "allow or deny"),
        ({"name": "x", "principal": "bob", "route": "FETCH /things", "expect": "deny"}, "METHOD /path"),
        ({"name": "x", "principal": "bob", "route": "GET /t", "scope": "account:a", "expect": "deny"}, "catalog"),
        ({"name": "x", "principal": "bob", "permission": "*", "expect": "allow"}, "permission"),
        ({"name": "x", "principal": "bob", "permission": "things:view", "expect": "allow", "extra": 1}, "unknown"),
    ],
)
def test_a_bad_case_is_refused_with_a_reason(case: dict[str, Any], needle: str) -> None:
    with pytest.raises(DocumentError, match=needle):
        parse_cases({"cases": [case]}, "cases.yaml")


def test_case_names_are_unique() -> None:
    case = {"name": "same", "principal": "bob", "permission": "things:view", "expect": "allow"}
    with pytest.raises(DocumentError, match="twice"):
        parse_cases({"cases": [case, case]}, "cases.yaml")


def test_ctl_test_runs_cases_offline_and_a_failure_names_the_grants_and_roles(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    path = write_json(tmp_path / "cases.json", CASES)
    passed = ctl_json(etcd.endpoints, prefix, "test", "v1", "--cases", path)
    assert (passed["cases"], passed["failed"], passed["problems"]) == (6, 0, [])
    # v2 takes editing from alice (she becomes a viewer): the case fails and says why.
    change = {"version": "v2", "changes": [{"principal": "alice", "revoke": ["editor"], "grant": ["viewer"]}]}
    proposed = write_json(tmp_path / "v2.json", change)
    assert (
        ctl_captured(etcd.endpoints, prefix, "propose", "--file", proposed, "--request-id", "r", "--reason", "x")[0]
        == 0
    )
    code, out, err = ctl_captured(etcd.endpoints, prefix, "test", "v2", "--cases", path, "--json")
    assert code == 1 and "1 problem(s)" in err and "'alice edits'" in err
    failed = next(r for r in json.loads(out)["results"] if not r["passed"])
    assert failed["case"] == "alice edits" and failed["got"] == "deny"
    assert "no grant gives this handle" in failed["why"] and "alice holds viewer" in failed["why"]
    assert "roles with things:edit: editor" in failed["why"]
    # Without --cases: the registered ones; none registered yet is a clear error.
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "test", "v1")
    assert code == 1 and "no cases" in err
    put = ctl_json(etcd.endpoints, prefix, "cases", "put", "--file", path, "--reason", "the team's expectations")
    assert put["cases"] == 6
    assert ctl_json(etcd.endpoints, prefix, "cases", "get")["services"]["things"][0] == "alice edits"
    assert ctl_captured(etcd.endpoints, prefix, "test", "v2")[0] == 1
    assert ctl_json(etcd.endpoints, prefix, "test", "v1")["failed"] == 0
    other = write_json(tmp_path / "other.json", {**CASES, "service": "nobody"})
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "cases", "put", "--file", other)
    assert code == 1 and "no registered catalog" in err


def test_validate_runs_a_policy_directorys_cases_on_each_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from authz_sidecar import cli

    policy = write_policy(tmp_path / "policy", shadows=[shadow("v2")])
    (policy / "cases.yaml").write_text(yaml.safe_dump({k: v for k, v in CASES.items() if k != "service"}))
    # v2 makes bob an editor: the shared case "bob only views" fails on it ...
    assert cli.main(["validate", "--policy-dir", str(policy)]) == 1
    captured = capsys.readouterr()
    assert "v2: case 'bob only views' expected deny" in captured.err
    assert json.loads(captured.out)["cases"]["v1"]["passed"] == 6
    # ... until v2 has expectations of its own.
    (policy / "cases").mkdir()
    own = {"cases": [{"name": "bob edits", "principal": "bob", "route": "PUT /things/7", "expect": "allow"}]}
    (policy / "cases" / "v2.yaml").write_text(yaml.safe_dump(own))
    assert cli.main(["validate", "--policy-dir", str(policy)]) == 0
    assert json.loads(capsys.readouterr().out)["cases"]["v2"]["passed"] == 1


def test_cases_through_a_real_envoy_with_the_tester_header_agree_with_ctl_test(tmp_path: Path) -> None:
    testers = ["alice", "bob", "carol"]
    policy = write_policy(tmp_path / "policy", shadows=[shadow("v2", testers=testers)], catalog=CATALOG)
    mesh = Mesh(workdir=tmp_path, policy_dir=policy, region="us-east")
    mesh.start()
    try:
        tokens = write_json(tmp_path / "tokens.json", {p: mesh.issuer.token(p) for p in testers})
        path = write_json(tmp_path / "cases.json", CASES)
        args = ("--cases", path, "--live", mesh.url(""), "--tokens", tokens)
        for version in ("v1", "v2"):
            code, out, err = ctl_captured(mesh.etcd_endpoints, "/authz", "test", version, *args, "--json")
            report = json.loads(out)
            offline = {r["case"]: r["got"] for r in report["results"]}
            sent = [e for e in report["live"] if "skipped" not in e]
            assert {e["case"]: e["live"] for e in sent} == {e["case"]: offline[e["case"]] for e in sent}, sent
            assert all(e["status"] in (200, 403) for e in sent)
            # No route of the catalog asks things:edit in a scope: that case cannot be sent, and says so.
            assert [e["case"] for e in report["live"] if "skipped" in e] == ["carol edits in acme"]
            # v2 makes bob an editor: there, "bob only views" fails, live and offline alike.
            assert (code == 1) == (version == "v2"), err
        assert offline["bob only views"] == "allow"
        # A principal who is not v2's tester would be answered by the active set: refused up front.
        stranger = {"service": "things", "cases": [{**CASES["cases"][2], "principal": "qa-bot"}]}
        code, _out, err = ctl_captured(
            mesh.etcd_endpoints, "/authz", "test", "v2", "--cases", write_json(tmp_path / "q.json", stranger),
            "--live", mesh.url(""), "--tokens", tokens,
        )  # fmt: skip
        assert code == 1 and "not testers: qa-bot" in err
    finally:
        mesh.stop()
