"""ctl explain: the grant and role behind an allow, "no grant gives this handle" behind a deny, what
every live set answers, and which set decides the principal in each region."""

from __future__ import annotations

from pathlib import Path

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.model.selection import stable_bucket

from .helpers import ctl_captured, ctl_json, seed, unique_prefix, write_json


def test_explain_names_the_grant_and_role_that_allow_and_says_none_does_for_a_deny(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    why = ctl_json(etcd.endpoints, prefix, "explain", "alice", "things:edit")
    assert why["answer"] == "allow" and why["version"] == "v1"
    assert why["grants"] == [{"principal": "alice", "roles": ["editor"], "scope": None, "role": "editor"}]
    assert "role editor has it" in why["why"]
    denied = ctl_json(etcd.endpoints, prefix, "explain", "bob", "things:edit")
    assert denied["answer"] == "deny" and denied["why"].startswith("no grant gives this handle")
    assert "bob holds viewer here" in denied["why"] and "roles with things:edit: editor" in denied["why"]
    # carol edits in acme only: asked elsewhere, the answer says where she would.
    elsewhere = ctl_json(etcd.endpoints, prefix, "explain", "carol", "things:edit", "--scope", "account:other")
    assert elsewhere["answer"] == "deny" and "it would in account:acme" in elsewhere["why"]
    scoped = ctl_json(etcd.endpoints, prefix, "explain", "carol", "things:edit", "--scope", "account:acme")
    assert scoped["answer"] == "allow" and scoped["grants"][0]["scope"] == "account:acme"
    stranger = ctl_json(etcd.endpoints, prefix, "explain", "mallory", "things:view")
    assert "mallory holds no grant" in stranger["why"]


def test_explain_shows_every_live_sets_answer_and_who_decides_in_each_region(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    change = {"version": "v2", "changes": [{"principal": "bob", "grant": ["editor"]}]}
    path = write_json(tmp_path / "v2.json", change)
    assert ctl_captured(etcd.endpoints, prefix, "propose", "--file", path, "--request-id", "r", "--reason", "x")[0] == 0
    # A weight that takes bob in eu-west and not in us-east, from his own bucket for v2.
    bucket = stable_bucket("bob", "v2") // 100  # the percent his bucket falls in
    ctl_json(
        etcd.endpoints, prefix, "canary", "v2", "--weight", f"eu-west={bucket + 1}", "--weight", f"us-east={bucket}"
    )
    why = ctl_json(etcd.endpoints, prefix, "explain", "bob", "things:edit")
    assert why["live_answers"] == {"v1": "deny", "v2": "allow"}
    assert why["decided_by_region"] == {"eu-west": "v2", "us-east": "v1", "(any other region)": "v1"}
    assert ctl_json(etcd.endpoints, prefix, "explain", "bob", "things:edit", "--set", "v2")["answer"] == "allow"
    code, out, err = ctl_captured(etcd.endpoints, prefix, "explain", "bob", "things edit")
    assert (code, out) == (2, "") and "PERMISSION" in err
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "explain", "bob", "things:edit", "--set", "v9")
    assert code == 1 and "v9" in err and len(err.strip().splitlines()) == 1
