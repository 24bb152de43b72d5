"""make bench's goals block: each of issue 20's goals read from the rows and measurements of one run
(the numbers here are made up; what is checked is which row each ratio comes from)."""

from __future__ import annotations

from authz_sidecar.bench.__main__ import DECISION_LOG_100, DIRECT_FLOOR, DIRECT_SIDECAR, FLOOR, goals, sized
from authz_sidecar.bench.run import Bench, Point, Row


def _row(name: str, cpu_baseline: str | None, rps: float, cpu: float) -> Row:
    point = Point(16, rps, 1000.0, 2000.0, int(rps * 4), {200: int(rps * 4)}, {"server": cpu})
    return Row(
        name, None, cpu_baseline, points=[point, Point(1, rps / 2, 500.0, 900.0, 10, {200: 10}, {"server": cpu})]
    )


def test_the_goals_block_reads_each_goal_from_its_own_rows() -> None:
    bench = Bench.__new__(Bench)
    bench.rows = [
        _row(FLOOR, None, 4000, 200),
        _row(DECISION_LOG_100, FLOOR, 3800, 210),
        _row(DIRECT_FLOOR, None, 6000, 180),
        _row(DIRECT_SIDECAR, DIRECT_FLOOR, 4800, 234),
        _row(sized(100), None, 4000, 200),
        _row(sized(1_000_000), None, 3900, 202),
    ]
    at_scale = {
        "scale": [
            {"grants": 100, "evaluate_ns": 1500.0},
            {
                "grants": 1_000_000,
                "evaluate_ns": 3500.0,
                "one_set_s": 2.4,
                "change_s": 0.31,
                "held_bytes_per_grant": 187.0,
                "rss_bytes_per_grant": 205.0,
            },
        ],
        "rebuild": {"grants": 1_000_000, "change": {"ratio": 1.8}, "new": {"ratio": 2.6}},
    }
    text = goals(bench, 1_000_000, at_scale)
    assert "through Envoy, 16 streams: CPU per Check 1.05x (goal <= 1.11x), throughput 0.95x" in text
    assert "called directly, 16 streams: CPU per Check 1.30x (goal <= 1.11x), throughput 0.80x" in text
    assert "1,000,000 grants vs 100 (x 2 sets), through Envoy: 1 stream: throughput 0.97x, CPU per Check 1.01x" in text
    # 2 us more per unseen principal against 202 us of CPU per Check at a million grants.
    assert "takes 3.50 us against 1.50 us at 100: 1.0% of a Check's 202 us of CPU" in text
    assert "one set built cold in 2.40 s (goal <= 2 s)" in text
    assert "installed in 0.31 s (goal <= 0.5 s), 187 B held per grant, 205 B resident" in text
    assert "a proposal changing 3 principals 1.80x, a set sharing nothing 2.60x (goal <= 2x)" in text


def test_a_run_of_some_rows_only_states_the_goals_it_measured() -> None:
    bench = Bench.__new__(Bench)
    bench.rows = [_row(DIRECT_FLOOR, None, 6000, 180), _row(DIRECT_SIDECAR, DIRECT_FLOOR, 4800, 234)]
    text = goals(bench, 1_000_000)
    assert text.splitlines() == [
        "every feature vs the floor, called directly, 16 streams: CPU per Check 1.30x (goal <= 1.11x), "
        "throughput 0.80x (goal >= 0.9x)"
    ]
