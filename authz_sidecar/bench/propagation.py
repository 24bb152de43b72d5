"""Propagation: from a write to etcd until every sidecar decides with it.

Starts one real etcd and N sidecar processes watching it (the issue asks for 10), then makes
changes through the control plane's store (a canary weight flipped back and forth) and, for each
change, reads every sidecar's /status until it has installed a snapshot at or past the write's
revision. A sidecar's ``installed_at`` (from its own clock, the same machine's) minus the time just
before the write is that sidecar's propagation time, so how often /status is polled does not
change the number. Reported: p50/p99 per (change, sidecar), and per change until the last sidecar.

Run as ``python -m authz_sidecar.bench.propagation [--sidecars 10] [--changes 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from authz_sidecar.documents import dump_permission_set, parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.documents import load_document as load
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.policy import PolicyStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policy"


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def seed_examples(store: PolicyStore) -> None:
    """The example catalog, active set v1 and shadow v2, as `make run` has them."""
    catalog = parse_catalog(load((EXAMPLES / "catalog.yaml").read_text(), "catalog"), "catalog")
    await store.register_catalog(catalog)
    active = parse_permission_set(load((EXAMPLES / "active.yaml").read_text(), "active"), "active")
    await store.init(active, dump_permission_set(active))
    shadow = parse_shadow(load((EXAMPLES / "shadows" / "v2.yaml").read_text(), "v2"), "v2")
    await store.propose(shadow.permissions, dump_permission_set(shadow.permissions), shadow.rollout)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def _measure(endpoint: str, ports: list[int], changes: int) -> dict[str, Any]:
    each: list[float] = []
    last: list[float] = []
    async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
        store = PolicyStore(etcd)
        for i in range(changes):
            started = time.time()
            await store.canary("v2", {"us-east": 20 if i % 2 == 0 else 10})
            revision = store.last_revision
            times = []
            for port in ports:
                deadline = time.monotonic() + 10
                while True:
                    status = await asyncio.to_thread(_status, port)
                    if (status["revision"] or 0) >= revision:
                        times.append(status["installed_at"] - started)
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"sidecar on {port} did not reach revision {revision}")
                    await asyncio.sleep(0.002)
            each.extend(times)
            last.append(max(times))
    return {
        "sidecars": len(ports),
        "changes": changes,
        "each_p50_ms": percentile(each, 0.5) * 1e3,
        "each_p99_ms": percentile(each, 0.99) * 1e3,
        "all_p50_ms": percentile(last, 0.5) * 1e3,
        "all_p99_ms": percentile(last, 0.99) * 1e3,
        "max_ms": max(last) * 1e3,
    }


def run(sidecars: int = 10, changes: int = 100) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="authz-propagation-") as tmp:
        workdir = Path(tmp)
        cluster = EtcdCluster(workdir / "etcd").start()
        processes: list[Process] = []
        try:
            endpoint = cluster.endpoints

            async def seed() -> None:
                async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
                    await seed_examples(PolicyStore(etcd))

            asyncio.run(seed())
            ports = []
            for i in range(sidecars):
                grpc_port, http_port = free_port(), free_port()
                argv = [
                    sys.executable, "-m", "authz_sidecar", "serve",
                    "--etcd", endpoint, "--service", "things", "--region", "us-east",
                    "--listen", f"{LOOPBACK}:{grpc_port}", "--http", f"{LOOPBACK}:{http_port}",
                    "--cache-file", "off", "--log-level", "warning", "--workers", "1",
                ]  # fmt: skip
                processes.append(Process(f"sidecar{i}", argv, workdir))
                ports.append(http_port)
            for process, port in zip(processes, ports, strict=True):
                wait_for_http(f"http://{LOOPBACK}:{port}/readyz", process, timeout=60)
            return asyncio.run(_measure(endpoint, ports, changes))
        finally:
            for process in processes:
                process.stop()
            cluster.stop()


def table(result: dict[str, Any]) -> str:
    return (
        f"propagation: etcd write -> snapshot installed, {result['sidecars']} sidecars x {result['changes']} changes\n"
        f"  each sidecar: p50 {result['each_p50_ms']:.1f} ms, p99 {result['each_p99_ms']:.1f} ms; "
        f"until the last of them: p50 {result['all_p50_ms']:.1f} ms, p99 {result['all_p99_ms']:.1f} ms "
        f"(max {result['max_ms']:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sidecars", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args()
    print(table(run(args.sidecars, args.changes)))


if __name__ == "__main__":
    main()
