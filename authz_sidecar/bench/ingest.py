"""How long etcd's watch holds the GIL while a big set's chunks arrive: the ingest before a build.

A real etcd; another process writes a set of N grants into it as ``ctl propose`` does (its
chunks, one put each, then its head); this process follows the prefix with the sidecar's own
watch (:meth:`~authz_sidecar.store.etcd.Etcd.watch`, on the event loop, as the etcd source does)
until the head arrives, while a thread sleeps 0.5 ms in a loop and keeps how late it wakes
(:class:`~authz_sidecar.bench.holds.GilWatch`): the wait a Check would have for the GIL at that
moment. ``bench/holds.py`` measures the build that follows; this, what comes before it.

The writer shares the machine's cores, so part of a long wait can be the scheduler rather than
the GIL: compare runs against each other, not against zero.

Run as ``python -m authz_sidecar.bench.ingest [--grants N] [--runs R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from authz_sidecar.bench.holds import GilWatch
from authz_sidecar.bench.rebuild import policy
from authz_sidecar.documents import dump_permission_set
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.policy import PolicyStore


async def _write(endpoint: str, prefix: str, grants: int) -> None:
    permissions = policy(grants, "v2", changed=3)
    document = dump_permission_set(permissions)
    async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
        print("writing", flush=True)  # the parent starts counting here
        await PolicyStore(etcd, prefix).write_set(permissions, document)


async def _follow(endpoint: str, prefix: str, grants: int, waits: list[float]) -> int:
    """Start the writer, follow the watch until the set's head arrives; the bytes of its chunks
    received. (A prefix of its own each time: sets share chunks, and a set written before would
    leave nothing to send.)"""
    lay = layout.Layout(prefix)
    head = lay.head("v2")
    argv = [sys.executable, "-m", "authz_sidecar.bench.ingest", "--write", endpoint, prefix, "--grants", str(grants)]
    async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
        writer = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        try:
            if writer.stdout is not None:
                await writer.stdout.readline()  # the document is built: its writes begin
            waits.clear()
            received = 0
            async for batch in etcd.watch(lay.root, 1, 60.0):
                received += sum(len(c.value or b"") for c in batch.changes if c.key.startswith(lay.chunks))
                if any(c.key == head for c in batch.changes):
                    return received
        finally:
            await asyncio.wait_for(writer.wait(), 60)
    raise RuntimeError("the watch ended before the head arrived")


def run(grants: int, runs: int) -> list[dict[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="authz-ingest-") as tmp:
        cluster = EtcdCluster(Path(tmp)).start()
        try:
            for number in range(1, runs + 1):
                waits: list[float] = []
                with GilWatch(0.0005, waits.append):
                    received = asyncio.run(_follow(cluster.endpoints, f"/ingest-{number}", grants, waits))
                longest = sorted(waits, reverse=True)
                rows.append(
                    {
                        "bytes": received,
                        "longest_ms": longest[0] * 1000,
                        "over_2ms": sum(1 for w in waits if w > 0.002),
                        "over_1ms": sum(1 for w in waits if w > 0.001),
                        "p99_ms": statistics.quantiles(waits, n=100)[98] * 1000,
                    }
                )
        finally:
            cluster.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grants", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", nargs=2, metavar=("ENDPOINT", "PREFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        asyncio.run(_write(args.write[0], args.write[1], args.grants))
        return
    for row in run(args.grants, args.runs):
        print(
            f"ingested {row['bytes'] / 1e6:5.1f} MB  longest wait {row['longest_ms']:5.2f} ms"
            f"  waits over 2 ms: {row['over_2ms']:3.0f}, over 1 ms: {row['over_1ms']:3.0f}"
            f"  p99 {row['p99_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
