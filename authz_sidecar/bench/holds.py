"""Where a big build holds the GIL: the longest holds per step, with the builder's frames.

The etcd source's builder (:class:`~authz_sidecar.store.sources.etcd.SnapshotBuilder`) takes, in
turn, the bench's active set of N grants cold, a proposal changing three principals, the
proposal dropped, a set sharing no principal with the active one, and that set dropped (what
``bench/rebuild.py`` sends a sidecar); after each, the keys that serve are saved to a disk copy,
as the etcd source does after every install. A thread sleeps 0.5 ms in a loop; when it wakes more
than ``--limit`` ms late, another thread held the GIL that long, and the builder's frames at that
moment say where the hold ended. Every wake-up's lateness is kept too: its percentiles are what a
Check waiting for the GIL at any moment of the step would wait (idle, with nothing else running,
~0.08 ms at the median). Each step waits ``--settle`` seconds after it, so that what it dropped is
freed within the step (the releaser frees in the background).

Run as ``python -m authz_sidecar.bench.holds [--grants N]``; to measure another checkout's builder,
``PYTHONPATH=DIR python -P authz_sidecar/bench/holds.py`` (run by path: DIR need not have this file).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from authz_sidecar.bench.rebuild import policy
from authz_sidecar.documents import dump_permission_set
from authz_sidecar.model.assembly import LastGood
from authz_sidecar.model.values import Rollout
from authz_sidecar.store import layout
from authz_sidecar.store.layout import Layout
from authz_sidecar.store.sources.diskcopy import DiskCopy
from authz_sidecar.store.sources.etcd import SnapshotBuilder

LAYOUT = Layout("/authz")
CATALOG = {"service": "things", "permissions": [{"handle": "things:view"}, {"handle": "things:edit"}]}
STEPS = (("cold", ()), ("change", ("v2",)), ("drop change", ()), ("disjoint", ("v3",)), ("drop disjoint", ()))


class GilWatch:
    """A thread that sleeps `period` seconds in a loop and keeps its longest wake-up delay: how
    long another thread held the GIL at a time (the pause a Check waiting for it would feel).
    `on_late(seconds)`, if given, is called on the watching thread with every delay."""

    def __init__(self, period: float = 0.001, on_late: Callable[[float], None] | None = None) -> None:
        self.longest = 0.0
        self._period, self._on_late = period, on_late
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            time.sleep(self._period)
            late = time.perf_counter() - started - self._period
            self.longest = max(self.longest, late)
            if self._on_late is not None:
                self._on_late(late)

    def __enter__(self) -> GilWatch:
        self._thread.start()
        time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _where(frame: FrameType | None) -> str:
    if frame is None:
        return "?"
    return " < ".join(f"{f.name}:{f.lineno}" for f in reversed(traceback.extract_stack(frame)[-4:]))


def _stored(documents: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Each version's keys, split once: every step is given the same bytes objects for a set it
    keeps, as the etcd source's mirror keeps an unchanged value (the builder sees an unchanged set
    by identity; equal copies would be compared byte by byte, a hold a sidecar never has)."""
    held: dict[str, bytes] = {}  # sets share chunks: one bytes object per key, as in the mirror
    return {
        version: {key: held.setdefault(key, value) for key, value in LAYOUT.set_keys(version, document).items()}
        for version, document in documents.items()
    }


def _keys(stored: dict[str, dict[str, bytes]], shadows: tuple[str, ...]) -> dict[str, bytes]:
    kv = {LAYOUT.catalog("things"): json.dumps(CATALOG).encode()}
    for version in ("v1", *shadows):
        kv.update(stored[version])
    kv[LAYOUT.active] = layout.encode_active("v1")
    kv[LAYOUT.shadows] = layout.encode_shadows({v: Rollout() for v in shadows})
    return kv


def run(grants: int, *, limit_ms: float = 3.0, settle: float = 1.5) -> dict[str, dict[str, float]]:
    documents = {
        "v1": dump_permission_set(policy(grants, "v1")),
        "v2": dump_permission_set(policy(grants, "v2", changed=3)),
        "v3": dump_permission_set(policy(grants, "v3", prefix="other")),
    }
    stored = _stored(documents)
    steps = [(name, _keys(stored, shadows)) for name, shadows in STEPS]
    gc.collect()
    builder = SnapshotBuilder(LAYOUT, service="things", region="here", source="bench")
    last = LastGood()
    took: dict[str, float] = {}
    step, found, watched = "", list[tuple[float, str, str]](), threading.get_ident()
    lateness: dict[str, list[float]] = {}

    def hold(late: float) -> None:
        lateness.setdefault(step, []).append(late * 1000)
        # The builder's frames at the moment the hold ended, with the step it ended in.
        if late > limit_ms / 1000:
            found.append((late * 1000, step, _where(sys._current_frames().get(watched))))

    with tempfile.TemporaryDirectory(prefix="authz-holds-") as tmp, GilWatch(0.0005, hold):
        disk = DiskCopy(Path(tmp) / "copy.json", LAYOUT.prefix)
        for revision, (name, kv) in enumerate(steps, 1):
            step = name
            started = time.perf_counter()
            assembly, keys = builder.build(kv, revision, last)
            took[name] = time.perf_counter() - started
            if assembly.snapshot is None or assembly.refusals:
                raise RuntimeError(f"bench: the build failed: {assembly.waiting} {assembly.refusals}")
            last = assembly.last_good
            del assembly
            step = f"{name}: save"
            started = time.perf_counter()
            disk.save(keys, revision)
            took[step] = time.perf_counter() - started
            time.sleep(settle)
    report: dict[str, dict[str, float]] = {}
    for name, seconds in took.items():
        mine = sorted((ms for ms, at, _w in found if at == name), reverse=True)
        waits = statistics.quantiles(lateness.get(name, [0.0, 0.0]), n=100)
        report[name] = {
            "build_s": seconds,
            "longest_ms": mine[0] if mine else 0.0,
            "holds_over_limit": len(mine),
            "wait_p50_ms": waits[49],
            "wait_p99_ms": waits[98],
        }
    for ms, at, where in sorted(found, reverse=True)[:12]:
        print(f"{ms:7.1f} ms  {at:13}  {where}", file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grants", type=int, default=1_000_000)
    parser.add_argument("--limit", type=float, default=3.0, help="ms of lateness counted as a hold")
    parser.add_argument("--settle", type=float, default=1.5)
    args = parser.parse_args()
    report = run(args.grants, limit_ms=args.limit, settle=args.settle)
    for name, row in report.items():
        print(
            f"{name:19}  took {row['build_s']:6.2f} s  longest hold {row['longest_ms']:6.1f} ms"
            f"  holds over {args.limit:g} ms: {row['holds_over_limit']:3.0f}"
            f"  waits p50 {row['wait_p50_ms']:.2f} ms, p99 {row['wait_p99_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
