"""Scale: decision latency, memory per grant and snapshot rebuild time at 100 to 1,000,000 grants.

Each size runs in its own process so memory and timings of one size do not leak into the next.
Memory is what the built snapshot holds once the documents it was built from are gone, measured
with tracemalloc in a separate pass (tracing slows building, so rebuild time is measured untraced).

Run as ``python -m authz_sidecar.bench.scale [--sizes 100,10000,1000000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from authz_sidecar.documents import load_document, parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.model.evaluation import evaluate
from authz_sidecar.model.snapshot import CompileCache, Snapshot, build_snapshot, paused_gc

HANDLES = [f"svc{s}:{a}" for s in range(10) for a in ("view", "edit", "delete")]
ROLES = {f"role{r}": HANDLES[r * 3 : r * 3 + 3] for r in range(10)}
SAMPLES = 200_000


def documents(grants: int) -> tuple[str, str, dict[str, Any]]:
    """The active set and a shadow as JSON text, as a generator of large sets would write them."""
    rows = [{"principal": f"user-{i}", "roles": [f"role{i % 10}", f"role{(i * 7) % 10}"]} for i in range(grants)]
    for i in range(0, grants, 10):  # one grant in ten is scoped
        rows[i]["scope"] = f"account:a{i % 1000}"
    active = json.dumps({"version": "v1", "roles": ROLES, "grants": rows})
    rows[0] = {"principal": "user-0", "roles": ["role9"]}
    shadow = json.dumps({"version": "v2", "parent": "v1", "roles": ROLES, "grants": rows, "weights": {"here": 10}})
    catalog = {"service": "svc0", "permissions": [{"handle": h} for h in HANDLES]}
    return active, shadow, catalog


def build(active_text: str, shadow_text: str, catalog: dict[str, Any]) -> Snapshot:
    with paused_gc():  # as the policy sources build
        active = parse_permission_set(load_document(active_text, "active"), "active")
        shadow = parse_shadow(load_document(shadow_text, "shadow"), "shadow")
        return build_snapshot(active, [shadow], [parse_catalog(catalog, "catalog")], region="here")


def change_shadow(active_text: str, shadow_text: str, catalog: dict[str, Any]) -> float:
    """Seconds to rebuild when only the shadow changed: what a source does on a proposed change.
    The active set comes from the cache (parsed and compiled before); the new shadow is read from
    its text, compiled, and its impact computed."""
    cache = CompileCache()
    with paused_gc():
        active = parse_permission_set(load_document(active_text, "active"), "active")
        catalogs = [parse_catalog(catalog, "catalog")]
        build_snapshot(active, [], catalogs, region="here", cache=cache)
        changed = shadow_text.replace('"version": "v2"', '"version": "v3"', 1)
        started = time.perf_counter()
        shadow = parse_shadow(load_document(changed, "shadow"), "shadow")
        build_snapshot(active, [shadow], catalogs, region="here", cache=cache)
        return time.perf_counter() - started


def measure(grants: int) -> dict[str, float]:
    texts = documents(grants)
    gc.collect()
    started = time.perf_counter()
    snapshot = build(*texts)
    rebuild = time.perf_counter() - started
    change = change_shadow(*texts)
    rng = random.Random(7)  # noqa: S311 - sampling principals for a benchmark, not a secret
    principals = [f"user-{rng.randrange(grants)}" for _ in range(SAMPLES)]
    handles = [rng.choice(HANDLES) for _ in range(SAMPLES)]
    decide = snapshot.active.decide
    started = time.perf_counter()
    for principal, handle in zip(principals, handles, strict=True):
        decide(principal, handle, None)
    decide_ns = (time.perf_counter() - started) / SAMPLES * 1e9
    started = time.perf_counter()
    for principal, handle in zip(principals, handles, strict=True):
        evaluate(snapshot, principal, handle, "account:a1", stickiness_key=principal)
    evaluate_ns = (time.perf_counter() - started) / SAMPLES * 1e9
    del snapshot, principals, handles
    gc.collect()
    tracemalloc.start()
    snapshot = build(*texts)
    del texts
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # Two sets (active and one shadow) of `grants` grants each are held.
    return {
        "grants": grants,
        "rebuild_s": rebuild,
        "change_s": change,
        "decide_ns": decide_ns,
        "evaluate_ns": evaluate_ns,
        "bytes_per_grant": held / (2 * grants),
        "snapshot_mib": held / 2**20,
        "sets": len(snapshot.shadows) + 1,
    }


def run(sizes: list[int]) -> list[dict[str, float]]:
    results = []
    for size in sizes:
        out = subprocess.run(  # noqa: S603 - this module, with a number
            [sys.executable, "-m", "authz_sidecar.bench.scale", "--one", str(size)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
        results.append(json.loads(out.stdout))
    return results


def table(results: list[dict[str, float]]) -> str:
    base = results[0]
    lines = [
        f"{'grants':>10} {'rebuild s':>10} {'change s':>9} {'decide ns':>10} {'evaluate ns':>12} {'bytes/grant':>12} "
        f"{'MiB':>7}  decide vs smallest"
    ]
    for r in results:
        lines.append(
            f"{int(r['grants']):>10,} {r['rebuild_s']:>10.3f} {r.get('change_s', 0):>9.3f} "
            f"{r['decide_ns']:>10.0f} {r['evaluate_ns']:>12.0f} "
            f"{r['bytes_per_grant']:>12.0f} {r['snapshot_mib']:>7.1f}  {r['decide_ns'] / base['decide_ns']:.2f}x"
        )
    lines.append(
        "(each size: an active set and a canaried shadow of that many grants; rebuild = both read, "
        "checked and compiled from JSON text; change = a new shadow version arrives, the active set is "
        "reused; evaluate = select + decide + observe the other set)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,10000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(table(run([int(s) for s in args.sizes.split(",")])))


if __name__ == "__main__":
    main()
