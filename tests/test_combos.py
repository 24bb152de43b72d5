"""ctl roles combos: the role combinations held, and exactly the consolidation candidates planted in
a generated set of 10,000 principals."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

from authz_sidecar.local.etcd import EtcdCluster

from .helpers import ctl_captured, ctl_json, seed, unique_prefix

BASE = [f"b{i}" for i in range(8)]


def generated() -> tuple[dict[str, Any], dict[str, Any]]:
    """Eight base roles with disjoint handles, every base combination of one or two held, and two
    planted redundancies: b0-copy (b0's handles again) and b1-part (some of b1's)."""
    roles: dict[str, list[str]] = {r: [f"gen:{r}-{j}" for j in range(3)] for r in BASE}
    roles["b0-copy"] = list(roles["b0"])
    roles["b1-part"] = roles["b1"][:2]
    held = [[r] for r in BASE] + [list(pair) for pair in combinations(BASE, 2)]
    planted = [["b0-copy"]] * 50 + [["b0-copy", "b2"]] * 30 + [["b1-part"]] * 40 + [["b1", "b1-part"]] * 20
    grants = [{"principal": f"p{i}", "roles": held[i % len(held)]} for i in range(10_000 - len(planted))]
    grants += [{"principal": f"planted{i}", "roles": r} for i, r in enumerate(planted)]
    grants.append({"principal": "p1", "roles": ["b3"], "scope": "account:acme"})  # p1 holds b1 + b3 there
    catalog = {"service": "gen", "permissions": [{"handle": h} for r in BASE for h in roles[r]]}
    return {"version": "v1", "roles": roles, "grants": grants}, catalog


def test_roles_combos_lists_exactly_the_planted_candidates(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    active, catalog = generated()
    seed(etcd.endpoints, prefix, tmp_path, active=active, catalogs=[catalog])
    log = tmp_path / "decisions.jsonl"
    log.write_text(
        "\n".join(
            json.dumps(
                {"principal": p, "handle": "gen:b0-0", "scope": None, "answer": "allow", "version": "v1", "time": 1}
            )
            for p in ("planted0", "planted1", "p0")
        )
        + "\n"
    )
    result = ctl_json(etcd.endpoints, prefix, "roles", "combos", "--decisions", str(log), "--limit", "1000")
    by_roles = {tuple(c["roles"]): c for c in result["listed"]}
    assert result["principals"] == 10_000 and result["active_principals"] == 3
    assert by_roles[("b0-copy",)]["holders"] == 50 and by_roles[("b0-copy",)]["active"] == 2
    assert by_roles[("b1", "b3")]["scopes"] == 2  # p1 holds it in account:acme, others unscoped
    same = {tuple(map(tuple, group)) for group in result["same_handles"]}
    assert same == {
        (("b0",), ("b0-copy",)),
        (("b0", "b2"), ("b0-copy", "b2")),
        (("b1",), ("b1", "b1-part")),
    }
    subsets = {(tuple(s["smaller"]), tuple(s["larger"])) for s in result["subsets"]}
    expected: set[tuple[tuple[str, ...], tuple[str, ...]]]
    expected = {(("b0-copy",), tuple(sorted(("b0", r)))) for r in BASE if r != "b0"}
    expected |= {(("b0",), ("b0-copy", "b2"))}
    with_b1 = [tuple(sorted(("b1", r))) for r in BASE if r != "b1"]
    expected |= {(("b1-part",), ("b1",))} | {(("b1-part",), c) for c in with_b1}
    expected |= {(("b1", "b1-part"), c) for c in with_b1}  # b1-part adds nothing to b1
    assert subsets == expected
    code, _out, err = ctl_captured(etcd.endpoints, prefix, "roles", "combos", "--decisions", str(tmp_path / "none"))
    assert code == 1 and "no such file" in err
