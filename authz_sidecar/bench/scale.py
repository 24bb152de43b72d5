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
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from authz_sidecar.bench.holds import GilWatch
from authz_sidecar.documents import load_document, parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.model.assembly import LastGood
from authz_sidecar.model.evaluation import evaluate
from authz_sidecar.model.snapshot import Snapshot, build_snapshot, paused_gc
from authz_sidecar.model.values import Rollout
from authz_sidecar.store import layout
from authz_sidecar.store.layout import Layout
from authz_sidecar.store.sources.etcd import SnapshotBuilder

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


LAYOUT = Layout("/authz")


def _canonical(text: str) -> bytes:
    return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":")).encode()


def _kv(catalog: dict[str, Any], active: bytes, shadows: dict[str, bytes], held: dict[str, bytes]) -> dict[str, bytes]:
    """The keys etcd holds for an active set v1 and these shadows (version -> document). A key
    seen before keeps its bytes object (`held`), as the etcd source's mirror keeps a value nobody
    wrote again: sets share chunks, and the builder knows a chunk it has checked by identity."""
    kv: dict[str, bytes] = {LAYOUT.catalog("svc0"): json.dumps(catalog).encode()}
    for version, document in {"v1": active, **shadows}.items():
        kv.update({key: held.setdefault(key, value) for key, value in LAYOUT.set_keys(version, document).items()})
    kv[LAYOUT.active] = layout.encode_active("v1")
    if shadows:
        rollouts = {v: Rollout(weights={"here": 10} if v == "v2" else {}, state="canary") for v in shadows}
        kv[LAYOUT.shadows] = layout.encode_shadows(rollouts)
    return kv


def _variant(active: bytes, version: str, edit: str) -> bytes:
    """A proposal against v1: `grants` changes three principals' grants, `role` edits a role held
    by a fifth of the principals (role3, which gains a handle)."""
    data = json.loads(active)
    data = {"version": version, "parent": "v1", **{k: v for k, v in data.items() if k not in ("version", "parent")}}
    grants = data["grants"]
    if edit == "grants":
        n = len(grants)
        grants[n // 2]["roles"] = ["role1"]
        grants.insert(n * 7 // 10, {"principal": "newcomer", "roles": ["role2"]})
        del grants[n * 9 // 10]
    else:
        data["roles"]["role3"] = [*data["roles"]["role3"], "svc9:view"]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _timed_build(builder: SnapshotBuilder, kv: dict[str, bytes], last: LastGood) -> tuple[float, float, LastGood]:
    """Seconds to build from `kv` through the etcd source's builder, and the longest GIL hold."""
    with GilWatch() as watch:
        started = time.perf_counter()
        assembly, _keys = builder.build(kv, 1, last)
        took = time.perf_counter() - started
    if assembly.snapshot is None or assembly.refusals:
        raise RuntimeError(f"bench: the build failed: {assembly.waiting} {assembly.refusals}")
    return took, watch.longest, assembly.last_good


def builds(grants: int) -> dict[str, float]:
    """Through the etcd source's own builder: one set cold; then a proposal changing a few
    principals' grants, and one editing a role, each arriving while v1 is active."""
    active_text, _shadow_text, catalog = documents(grants)
    active = _canonical(active_text)
    del active_text
    builder = SnapshotBuilder(LAYOUT, service="svc0", region="here", source="bench")
    held: dict[str, bytes] = {}
    one, one_gil, last = _timed_build(builder, _kv(catalog, active, {}, held), LastGood())
    proposal = _kv(catalog, active, {"v2": _variant(active, "v2", "grants")}, held)
    change, change_gil, _ = _timed_build(builder, proposal, last)
    role, role_gil, _ = _timed_build(builder, _kv(catalog, active, {"v3": _variant(active, "v3", "role")}, held), last)
    return {
        "one_set_s": one,
        "change_s": change,
        "role_edit_s": role,
        "gil_ms": max(one_gil, change_gil, role_gil) * 1000,
        "one_gil_ms": one_gil * 1000,
        "change_gil_ms": change_gil * 1000,
    }


def held(grants: int) -> dict[str, float]:
    """What the sidecar holds for one active set of `grants`, installed: the builder's parsed set
    and compiled set (tracemalloc), and the growth of resident memory in a process that only read
    etcd's keys from a file and built, against the etcd mirror's bytes of the set (which a sidecar
    holds too)."""
    active_text, _shadow_text, catalog = documents(grants)
    kv = _kv(catalog, _canonical(active_text), {}, {})
    del active_text
    with tempfile.NamedTemporaryFile(suffix=".pickle") as keys:
        pickle.dump(kv, keys)
        keys.flush()
        out = subprocess.run(  # noqa: S603 - this module, with a number and a path
            [sys.executable, "-m", "authz_sidecar.bench.scale", "--held", str(grants), keys.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
    return {**json.loads(out.stdout), "mirror_bytes_per_grant": sum(len(v) for v in kv.values()) / grants}


def _held(grants: int, path: str) -> dict[str, float]:
    with open(path, "rb") as keys:
        kv = pickle.load(keys)  # noqa: S301 - written by this module's parent process just now
    gc.collect()
    rss_before = _rss()
    builder = SnapshotBuilder(LAYOUT, service="svc0", region="here", source="bench")
    assembly, _keys = builder.build(kv, 1, LastGood())
    del _keys
    gc.collect()
    rss = _rss() - rss_before
    del assembly, builder
    gc.collect()
    tracemalloc.start()
    builder = SnapshotBuilder(LAYOUT, service="svc0", region="here", source="bench")
    assembly, _keys = builder.build(kv, 1, LastGood())
    del _keys
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if assembly.snapshot is None:
        raise RuntimeError(f"bench: the build failed: {assembly.waiting}")
    return {"held_bytes_per_grant": traced / grants, "rss_bytes_per_grant": rss / grants}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(grants: int) -> dict[str, float]:
    texts = documents(grants)
    gc.collect()
    started = time.perf_counter()
    snapshot = build(*texts)
    rebuild = time.perf_counter() - started
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
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del snapshot
    gc.collect()
    # Two sets (active and one shadow) of `grants` grants each are held.
    return {
        "grants": grants,
        "rebuild_s": rebuild,
        "decide_ns": decide_ns,
        "evaluate_ns": evaluate_ns,
        "bytes_per_grant": memory / (2 * grants),
        "snapshot_mib": memory / 2**20,
        **builds(grants),
        **held(grants),
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
        f"{'grants':>10} {'rebuild s':>10} {'decide ns':>10} {'evaluate ns':>12} {'bytes/grant':>12} "
        f"{'MiB':>7}  decide vs smallest",
    ]
    for r in results:
        lines.append(
            f"{int(r['grants']):>10,} {r['rebuild_s']:>10.3f} "
            f"{r['decide_ns']:>10.0f} {r['evaluate_ns']:>12.0f} "
            f"{r['bytes_per_grant']:>12.0f} {r['snapshot_mib']:>7.1f}  {r['decide_ns'] / base['decide_ns']:.2f}x"
        )
    lines.append(
        "(each size: an active set and a canaried shadow of that many grants; rebuild = both read, "
        "checked and compiled from JSON text; evaluate = select + decide + observe the other set; "
        "bytes/grant = the compiled snapshot alone)"
    )
    lines.append("")
    lines.append(
        f"{'grants':>10} {'one set s':>10} {'change s':>9} {'role edit s':>12} {'max GIL ms':>11} "
        f"{'held B/grant':>13} {'RSS B/grant':>12} {'etcd B/grant':>13}"
    )
    for r in results:
        lines.append(
            f"{int(r['grants']):>10,} {r['one_set_s']:>10.3f} {r['change_s']:>9.3f} {r['role_edit_s']:>12.3f} "
            f"{r['gil_ms']:>11.1f} {r['held_bytes_per_grant']:>13.0f} {r['rss_bytes_per_grant']:>12.0f} "
            f"{r['mirror_bytes_per_grant']:>13.0f}"
        )
    lines.append(
        "(through the etcd source's builder, from the keys etcd holds: one set = an active set read, checked and "
        "compiled cold; change = a proposal changing three principals' grants arrives while it is active; role "
        "edit = one editing a role a fifth of the principals hold; max GIL = the longest a thread sleeping 1 ms "
        "waited past its time during those builds; held = what the builder and the snapshot hold for one set "
        "(tracemalloc), RSS = the process's growth, etcd = the set's keys in the mirror)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,10000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--held", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.held:
        print(json.dumps(_held(int(args.held[0]), args.held[1])))
        return
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(table(run([int(s) for s in args.sizes.split(",")])))


if __name__ == "__main__":
    main()
