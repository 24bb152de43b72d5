"""How long the plan of a change takes at scale (goal: 100,000 principals in under a second).

The active set gives each principal one of a few role combinations; the proposal takes a handle
from one role as it declares, and by mistake from a second, so the plan has both declared and
undeclared flips to list. Timed: the plan from two parsed sets (compile both, diff, list and sort
every flip, the undeclared part), and the same from the JSON text ``ctl`` reads from etcd.
"""

from __future__ import annotations

import json
import time
from typing import Any

from authz_sidecar.documents import load_document, parse_permission_set
from authz_sidecar.model.plan import plan

ROLES = {
    "viewer": ["things:view"],
    "editor": ["things:view", "things:edit"],
    "admin": ["things:view", "things:edit", "things:delete"],
}


def documents(principals: int) -> tuple[str, str]:
    names = list(ROLES)
    grants = [{"principal": f"user-{i:07d}", "roles": [names[i % 3]]} for i in range(principals)]
    active: dict[str, Any] = {"version": "v1", "roles": ROLES, "grants": grants}
    roles = {**ROLES, "admin": ["things:view", "things:edit"], "editor": ["things:view"]}
    proposal = {**active, "version": "v2", "roles": roles, "changes": [{"role": "admin", "remove": ["things:delete"]}]}
    return json.dumps(active), json.dumps(proposal)


def run(principals: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds of `rounds` plans, from parsed sets and from JSON text, and the plan's size."""
    active_text, proposal_text = documents(principals)
    active = parse_permission_set(load_document(active_text, "v1"), "v1")
    proposal = parse_permission_set(load_document(proposal_text, "v2"), "v2")
    parsed, from_text = [], []
    flips = undeclared = 0
    for _ in range(rounds):
        started = time.perf_counter()
        change = plan(active, proposal)
        parsed.append(time.perf_counter() - started)
        started = time.perf_counter()
        plan(
            parse_permission_set(load_document(active_text, "v1"), "v1"),
            parse_permission_set(load_document(proposal_text, "v2"), "v2"),
        )
        from_text.append(time.perf_counter() - started)
        flips, undeclared = len(change.flips), len(change.undeclared)
    return {
        "principals": principals,
        "plan_s": sorted(parsed)[rounds // 2],
        "plan_from_json_s": sorted(from_text)[rounds // 2],
        "flips": flips,
        "undeclared": undeclared,
    }


def line(result: dict[str, float]) -> str:
    return (
        f"plan of a change over {result['principals']:,.0f} principals: {result['plan_s']:.3f} s from parsed sets, "
        f"{result['plan_from_json_s']:.3f} s from their JSON ({result['flips']:,.0f} flips, "
        f"{result['undeclared']:,.0f} undeclared)"
    )


if __name__ == "__main__":
    print(line(run(100_000)))
