"""``python -m authz_sidecar.bench [--quick]``: measure, print the table, write bench/results/*.json."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from authz_sidecar.bench import combos as combos_bench
from authz_sidecar.bench import h2load, propagation, scale
from authz_sidecar.bench import manifest as manifest_bench
from authz_sidecar.bench import plan as plan_bench
from authz_sidecar.bench import rebuild as rebuild_bench
from authz_sidecar.bench import replay as replay_bench
from authz_sidecar.bench.run import Bench, Point, Row, machine_facts, to_json

REPO_ROOT = Path(__file__).resolve().parents[2]
FASTEST_GRPC = "fastest bare gRPC"
NGHTTPD = "Envoy + ext_authz HTTP/2 -> nghttpd (C) allow"
SIDECAR_GRPC = "Envoy + ext_authz gRPC -> authz-sidecar (default: threads)"
# The same sidecar with tracing on, against it with tracing off (metrics are always on).
TRACED_100 = "Envoy + ext_authz gRPC -> authz-sidecar, tracing 100%"
TRACED_1 = "Envoy + ext_authz gRPC -> authz-sidecar, tracing 1%"
# The same sidecar writing every decision to --decision-log, against it without (the goal: within 10%).
# With the bench policy (10,000 principals, three live shadows with cohorts) this is every feature on.
DECISION_LOG_100 = "Envoy + ext_authz gRPC -> authz-sidecar, decision log 100%"
# The floor of Python gRPC: a sync grpc.server returning a prebuilt allow (bench/baselines.py).
FLOOR = "Envoy + ext_authz gRPC -> bare grpc.server threads"
# The same two called directly: h2load's gRPC calls at the server, no Envoy.
DIRECT_FLOOR = "Check direct (h2load gRPC) -> bare grpc.server threads"
DIRECT_SIDECAR = "Check direct (h2load gRPC) -> authz-sidecar, every feature"
# Size: the same Check through Envoy with an active set and a shadow of 100 grants, and of a million.
SMALL_GRANTS = 100


def sized(grants: int) -> str:
    return f"Envoy + ext_authz gRPC -> authz-sidecar, {grants:,} grants x 2"


def _fmt_point(p: Point | None) -> str:
    if p is None:
        return f"{'-':>9} {'-':>8} {'-':>8}"
    return f"{p.rps:>9,.0f} {p.p50_us:>8.0f} {p.p99_us:>8.0f}"


def _point(row: Row, streams: int) -> Point | None:
    return next((p for p in row.points if p.streams == streams), None)


def baseline_rps(rows: list[Row], row: Row, streams: int) -> float | None:
    if row.baseline is None:
        return None
    if row.baseline == FASTEST_GRPC:
        candidates = [r for r in rows if r.name.startswith("Envoy + ext_authz gRPC -> bare")]
    else:
        candidates = [r for r in rows if r.name == row.baseline]
    values = [p.rps for r in candidates if (p := _point(r, streams)) is not None]
    return max(values) if values else None


def cpu_ratio(rows: list[Row], row: Row, streams: int = 16) -> float | None:
    """The server's CPU per request in `row` over that of its cpu_baseline row (16 streams)."""
    base = next((r for r in rows if r.name == row.cpu_baseline), None)
    mine, theirs = _point(row, streams), _point(base, streams) if base else None
    if mine is None or theirs is None:
        return None
    a, b = mine.cpu_us_per_request.get("server"), theirs.cpu_us_per_request.get("server")
    return a / b if a and b else None


def table(bench: Bench) -> str:
    lines = [
        f"{'configuration':<58} {'1 stream: rps':>14} {'p50us':>6} {'p99us':>6}   {'16 streams: rps':>15}"
        f" {'p50us':>6} {'p99us':>6}   ratio@1 ratio@16  cpu@16  cpu us/req (16)",
    ]
    for row in bench.rows:
        one, sixteen = _point(row, 1), _point(row, 16)
        ratios = []
        for streams, point in ((1, one), (16, sixteen)):
            base = baseline_rps(bench.rows, row, streams)
            ratios.append(f"{point.rps / base:>6.2f}x" if point and base else f"{'':>7}")
        cpu_x = cpu_ratio(bench.rows, row)
        ratios.append(f"{cpu_x:>5.2f}x" if cpu_x else f"{'':>6}")
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in (sixteen.cpu_us_per_request if sixteen else {}).items())
        lines.append(f"{row.name:<58} {_fmt_point(one)}   {_fmt_point(sixteen):>31}   {'  '.join(ratios)}  {cpu}")
    lines.append("ratios: each sidecar row against its baseline row in this same run (rps / baseline rps);")
    lines.append(
        "cpu@16: the server's CPU per request at 16 streams over its cpu baseline's (the floor of Python gRPC)"
    )
    for row in bench.rows:
        if row.baseline:
            lines.append(f"  {row.name}  vs  {row.baseline}")
        if row.cpu_baseline and row.cpu_baseline != row.baseline:
            lines.append(f"  {row.name}  cpu vs  {row.cpu_baseline}")
    return "\n".join(lines)


def goals(bench: Bench, large: int, at_scale: dict[str, Any] | None = None) -> str:
    """Issue 20's goals as this run measured them: CPU per Check and throughput against the floor,
    through Envoy and direct, the Check at `large` grants against the same at 100, and (from
    `at_scale`) building, changing and holding a large set and the p99 while one arrives."""
    rows = {r.name: r for r in bench.rows}
    lines = []
    for label, name in (("through Envoy", DECISION_LOG_100), ("called directly", DIRECT_SIDECAR)):
        row = rows.get(name)
        if row is None or row.cpu_baseline not in rows:
            continue
        cpu_x = cpu_ratio(bench.rows, row)
        mine, floor = _point(row, 16), _point(rows[row.cpu_baseline], 16)
        rps_x = mine.rps / floor.rps if mine and floor else None
        lines.append(
            f"every feature vs the floor, {label}, 16 streams: CPU per Check "
            + (f"{cpu_x:.2f}x" if cpu_x else "-")
            + " (goal <= 1.11x), throughput "
            + (f"{rps_x:.2f}x" if rps_x else "-")
            + " (goal >= 0.9x)"
        )
    small, big = rows.get(sized(SMALL_GRANTS)), rows.get(sized(large))
    if small and big:
        parts = []
        for streams in (1, 16):
            a, b = _point(big, streams), _point(small, streams)
            if a and b:
                cpu_a, cpu_b = a.cpu_us_per_request.get("server"), b.cpu_us_per_request.get("server")
                cpu = f", CPU per Check {cpu_a / cpu_b:.2f}x" if cpu_a and cpu_b else ""
                parts.append(f"{streams} stream{'s' if streams > 1 else ''}: throughput {a.rps / b.rps:.2f}x{cpu}")
        lines.append(
            f"{large:,} grants vs {SMALL_GRANTS} (x 2 sets), through Envoy: " + "; ".join(parts) + " (goal: within 5%)"
        )
        lines += _size_share(big, (at_scale or {}).get("scale"))
    return "\n".join(lines + _scale_goals(at_scale or {}))


def _size_share(big: Row, scaled: list[dict[str, float]] | None) -> list[str]:
    """What size can add to a Check, at most: the evaluation (select, decide, observe the other
    set) of a principal the memo has not seen, at the largest size against the smallest (the
    scale rows: random principals, so the large dict's cache misses are in it), as a share of the
    CPU a whole Check costs at the large size through Envoy."""
    point = _point(big, 16)
    cpu_us = point.cpu_us_per_request.get("server") if point else None
    if not scaled or not cpu_us:
        return []
    least, most = min(scaled, key=lambda r: r["grants"]), max(scaled, key=lambda r: r["grants"])
    extra_us = (most["evaluate_ns"] - least["evaluate_ns"]) / 1000
    return [
        f"  of which size: evaluating an unseen principal at {int(most['grants']):,} grants takes "
        f"{most['evaluate_ns'] / 1000:.2f} us against {least['evaluate_ns'] / 1000:.2f} us "
        f"at {int(least['grants']):,}: {extra_us / cpu_us:.1%} of a Check's {cpu_us:.0f} us of CPU, "
        "when every Check is a new principal"
    ]


def _scale_goals(at_scale: dict[str, Any]) -> list[str]:
    """Issue 20's goals for large sets, from the scale and rebuild measurements of the same run."""
    lines = []
    if at_scale.get("scale"):
        big = max(at_scale["scale"], key=lambda r: r["grants"])
        lines.append(
            f"{int(big['grants']):,} grants: one set built cold in {big['one_set_s']:.2f} s (goal <= 2 s), "
            f"a proposal changing 3 principals installed in {big['change_s']:.2f} s (goal <= 0.5 s), "
            f"{big['held_bytes_per_grant']:.0f} B held per grant, {big['rss_bytes_per_grant']:.0f} B resident "
            "(goal <= 300 B)"
        )
    rebuilt = at_scale.get("rebuild")
    if rebuilt:
        kinds = (("change", "a proposal changing 3 principals"), ("new", "a set sharing nothing"))
        lines.append(
            f"Check p99 through Envoy while a {rebuilt['grants']:,}-grant shadow arrives, against steady: "
            + ", ".join(f"{what} {rebuilt[kind]['ratio']:.2f}x" for kind, what in kinds)
            + " (goal <= 2x)"
        )
    return lines


def _only(plan: list[tuple[Row, Callable[[Row], None]]], texts: list[str]) -> list[tuple[Row, Callable[[Row], None]]]:
    """The rows named by `texts`, and the baselines their ratios need."""
    wanted = {row.name for row, _ in plan if any(t in row.name for t in texts)}
    for row, _ in plan:
        if row.name in wanted and row.baseline:
            if row.baseline == FASTEST_GRPC:
                wanted |= {r.name for r, _ in plan if r.name.startswith("Envoy + ext_authz gRPC -> bare")}
            else:
                wanted.add(row.baseline)
        if row.name in wanted and row.cpu_baseline:
            wanted.add(row.cpu_baseline)
    return [(row, body) for row, body in plan if row.name in wanted]


def _at_scale(quick: bool) -> dict[str, Any]:
    """What is measured beside the rows: decisions and rebuilds at scale, propagation over sidecars
    on a real etcd, the plan of a change over 100,000 principals, the replay of a decision log
    (1,000,000 decisions; 100,000 in quick mode), the role combinations of 1,000,000 principals
    (100,000 in quick mode), FilterManifest over 100,000 blocks in both server models, and Checks
    through Envoy while a 1,000,000-grant shadow arrives in etcd (20,000 in quick mode)."""
    sizes = [100, 10_000, 100_000] if quick else [100, 10_000, 1_000_000]
    print(f"  measuring scale at {', '.join(f'{s:,}' for s in sizes)} grants ...", flush=True)
    scaled = scale.run(sizes)
    sidecars, changes = (3, 10) if quick else (10, 100)
    print(f"  measuring propagation over {sidecars} sidecars x {changes} changes ...", flush=True)
    propagated = propagation.run(sidecars, changes)
    print("  measuring the plan of a change over 100,000 principals ...", flush=True)
    planned = plan_bench.run(100_000, rounds=1 if quick else 3)
    decisions = 100_000 if quick else 1_000_000
    print(f"  measuring the replay of {decisions:,} recorded decisions ...", flush=True)
    replayed = replay_bench.run(decisions, rounds=1 if quick else 3)
    holders = 100_000 if quick else 1_000_000
    print(f"  measuring the role combinations of {holders:,} principals ...", flush=True)
    combined = combos_bench.run(holders, rounds=1)
    rebuilt_grants = 20_000 if quick else 1_000_000
    print(f"  measuring Checks through Envoy while a {rebuilt_grants:,}-grant shadow arrives ...", flush=True)
    rebuilt = rebuild_bench.run(rebuilt_grants, rounds=1 if quick else 3, seconds=2.0 if quick else 6.0)
    print("  measuring FilterManifest over 100,000 blocks (threads, aio) ...", flush=True)
    manifested = manifest_bench.run(100_000, rounds=1 if quick else 3, single_blocks=1_000 if quick else 5_000)
    return {
        "scale": scaled,
        "propagation": propagated,
        "plan": planned,
        "replay": replayed,
        "combos": combined,
        "manifest": manifested,
        "rebuild": rebuilt,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one second per point (CI): checks, not numbers")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per point (default 5, quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per point, median kept (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="measure only rows whose name contains TEXT (repeatable; baselines are kept); skips scale and propagation",
    )
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    rounds = args.rounds or (1 if args.quick else 3)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    try:
        h2load.find()
    except h2load.H2loadMissingError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        bench = Bench(Path(tmp), seconds)
        print(f"benchmark: {rounds} x {seconds:g}s per point (median kept), h2load on loopback, Envoy --concurrency 1")
        http_bare = "Envoy + ext_authz HTTP -> bare asyncio HTTP allow-all"
        # The large size of the size pair: a million grants (100,000 in quick mode, which checks only).
        large = 100_000 if args.quick else 1_000_000
        plan: list[tuple[Row, Callable[[Row], None]]] = [
            (Row("Envoy, no authorization (floor)", None), bench.row_envoy("floor")),
            (Row("Envoy + RBAC filter (jwt_authn, rules + shadow rules)", None), bench.row_envoy("rbac")),
            (Row("Envoy + ext_authz gRPC -> bare grpc.aio allow-all", None), bench.row_bare("grpc-aio", "grpc")),
            (Row(FLOOR, None), bench.row_bare("grpc-threads", "grpc")),
            (
                Row(SIDECAR_GRPC, FASTEST_GRPC, FLOOR),
                bench.row_sidecar("grpc"),
            ),
            (Row(TRACED_100, SIDECAR_GRPC), bench.row_sidecar_traced(1.0)),
            (Row(TRACED_1, SIDECAR_GRPC), bench.row_sidecar_traced(0.01)),
            (Row(DECISION_LOG_100, SIDECAR_GRPC, FLOOR), bench.row_sidecar_decision_log()),
            (Row(DIRECT_FLOOR, None), bench.row_bare_direct),
            (Row(DIRECT_SIDECAR, DIRECT_FLOOR, DIRECT_FLOOR), bench.row_sidecar_direct),
            (Row(sized(SMALL_GRANTS), None), bench.row_sidecar_sized(SMALL_GRANTS)),
            (Row(sized(large), sized(SMALL_GRANTS)), bench.row_sidecar_sized(large)),
            (
                Row("Envoy + ext_authz gRPC -> authz-sidecar (grpc.aio + uvloop)", FASTEST_GRPC),
                bench.row_sidecar("grpc", "--server-model", "aio"),
            ),
            (Row(http_bare, None), bench.row_bare("http", "http")),
            (Row(NGHTTPD, None), bench.row_nghttpd),
            (Row("Envoy + ext_authz HTTP -> authz-sidecar --http-authz", NGHTTPD), bench.row_sidecar("http")),
            (Row("Check called directly (in-process, parse+decide+render)", None), bench.row_direct),
        ]
        if args.only:
            plan = _only(plan, args.only)
        bench.run(plan, rounds)
        facts = machine_facts()
    at_scale: dict[str, Any] = {} if args.only else _at_scale(args.quick)
    print()
    print(table(bench))
    print()
    summary = goals(bench, large, at_scale)
    print(summary)
    if at_scale:
        print()
        print(scale.table(at_scale["scale"]))
        print()
        print(propagation.table(at_scale["propagation"]))
        print()
        print(plan_bench.line(at_scale["plan"]))
        print(replay_bench.line(at_scale["replay"]))
        print(combos_bench.line(at_scale["combos"]))
        print(manifest_bench.line(at_scale["manifest"]))
        print(rebuild_bench.line(at_scale["rebuild"]))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-{time.strftime('%Y%m%dT%H%M%S')}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({**to_json(bench, facts), "goals": summary, **at_scale}, indent=2))
    print(f"\nwritten: {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")
    if bench.errors:
        print("\nbenchmark FAILED: answers other than the expected ones were measured:", file=sys.stderr)
        for error in bench.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
