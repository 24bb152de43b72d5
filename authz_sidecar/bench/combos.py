"""How long `ctl roles combos` takes at scale (goal: 1,000,000 principals in under 5 s).

Twelve roles with disjoint handles; each principal holds one or two of them (78 combinations), one
in twenty also a scoped grant; two planted redundant roles. Timed: the combinations and their
candidates from the parsed set, and the same from the JSON text ``ctl`` reads from etcd.
"""

from __future__ import annotations

import json
import time
from itertools import combinations
from typing import Any

from authz_sidecar.documents import load_document, parse_permission_set
from authz_sidecar.model.combos import combos

BASE = [f"r{i}" for i in range(12)]


def document(principals: int) -> str:
    roles: dict[str, list[str]] = {r: [f"gen:{r}-{j}" for j in range(3)] for r in BASE}
    roles["r0-copy"] = list(roles["r0"])
    roles["r1-part"] = roles["r1"][:2]
    held = [[r] for r in [*BASE, "r0-copy", "r1-part"]] + [list(p) for p in combinations(BASE, 2)]
    grants: list[dict[str, Any]] = [
        {"principal": f"user-{i:07d}", "roles": held[i % len(held)]} for i in range(principals)
    ]
    grants += [
        {"principal": f"user-{i:07d}", "roles": ["r5"], "scope": f"account:a{i % 50}"} for i in range(0, principals, 20)
    ]
    return json.dumps({"version": "v1", "roles": roles, "grants": grants})


def run(principals: int, rounds: int = 3) -> dict[str, float]:
    text = document(principals)
    parsed = parse_permission_set(load_document(text, "v1"), "v1")
    timed, from_text = [], []
    found = 0
    for _ in range(rounds):
        started = time.perf_counter()
        result = combos(parsed)
        timed.append(time.perf_counter() - started)
        started = time.perf_counter()
        combos(parse_permission_set(load_document(text, "v1"), "v1"))
        from_text.append(time.perf_counter() - started)
        found = len(result.combos)
    return {
        "principals": principals,
        "combos_s": sorted(timed)[rounds // 2],
        "combos_from_json_s": sorted(from_text)[rounds // 2],
        "combinations": found,
    }


def line(result: dict[str, float]) -> str:
    return (
        f"role combinations of {result['principals']:,.0f} principals: {result['combos_s']:.3f} s from the parsed set, "
        f"{result['combos_from_json_s']:.3f} s from its JSON ({result['combinations']:,.0f} combinations)"
    )


if __name__ == "__main__":
    print(line(run(1_000_000)))
