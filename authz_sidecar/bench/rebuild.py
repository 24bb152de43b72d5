"""Checks during a big rebuild: p99 through Envoy while a large shadow arrives in etcd.

Starts a real etcd holding an active set of N grants (1,000,000 in ``make bench``), one sidecar
following it and Envoy (gRPC ext_authz, jwt_authn) in front, and sends Checks at a steady rate
(h2load ``--rps``, one connection, so a pause shows as the latency of every request sent during it
rather than as fewer requests). Each round measures the same number of seconds twice: steady, and
with a new shadow of N grants written to etcd one second in (its chunks, its head, then the shadows
pointer). Reported per kind of shadow: p99 of the Checks sent from the pointer write until the
sidecar installed the new snapshot (at least one second: a window of a few hundred Checks), and
the build's duration from the sidecar's own ``installed_at``, against the steady p99 of the same
round taken over windows of the same length (their median); the median round is kept.

Two kinds of shadow: ``change`` (a proposal against the active set changing three principals'
grants, what ``ctl propose`` writes) and ``new`` (a set sharing no grant with the active one:
every piece parsed and compiled cold).

Run as ``python -m authz_sidecar.bench.rebuild [--grants N] [--rounds R] [--rps R]``; with
``--sidecar-path DIR`` the sidecar runs another checkout's code (DIR on its PYTHONPATH), for
before/after tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from authz_sidecar.bench import h2load
from authz_sidecar.bench.run import ALLOWED, CATALOG, DENIED, Bench
from authz_sidecar.documents import dump_permission_set, parse_catalog
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.model.values import Grant, Metadata, PermissionSet, Rollout
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.policy import PolicyStore

ROLES = {"viewer": ("things:view",), "editor": ("things:view", "things:edit")}


def policy(grants: int, version: str, prefix: str = "user", changed: int = 0) -> PermissionSet:
    """Alice edits, mallory views, and `grants` more principals view (one in ten in a scope); the
    first `changed` of them become editors."""
    rows = [Grant(ALLOWED, ("editor",)), Grant(DENIED, ("viewer",))]
    for i in range(grants):
        scope = f"account:a{i % 1000}" if i % 10 == 0 else None
        rows.append(Grant(f"{prefix}-{i}", ("editor",) if i < changed else ("viewer",), scope))
    meta = Metadata(version=version, parent="v1" if version != "v1" else "")
    return PermissionSet(roles=ROLES, grants=tuple(rows), meta=meta)


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/status", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _load(url: str, token: str, seconds: float, rps: int, log: Path) -> subprocess.Popen[str]:
    argv = [
        h2load.find(), url, "-t", "1", "-c", "1", "-m", "1", "--rps", str(rps),
        "-D", f"{int(seconds * 1000)}ms", "--log-file", str(log), "-H", f"authorization: Bearer {token}",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: S603


def _requests(log: Path) -> list[tuple[float, int, float]]:
    """(start in seconds since the epoch, status, latency in microseconds) per request."""
    rows = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((int(parts[0]) / 1e6, int(parts[1]), float(parts[2])))
    return rows


def _windowed_p99(requests: list[tuple[float, int, float]], span: float) -> float:
    """The median of the p99s of consecutive windows of `span` seconds (the whole stretch's p99
    when it is shorter than two windows)."""
    if not requests:
        return float("nan")
    first = requests[0][0]
    windows: dict[int, list[float]] = {}
    for start, _status, latency in requests:
        windows.setdefault(int((start - first) / span), []).append(latency)
    full = [w for i, w in windows.items() if i < max(windows)]  # the last one is cut short
    if len(full) < 2:
        return _p99([lat for _t, _s, lat in requests])
    return statistics.median(_p99(w) for w in full)


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


async def _write(endpoint: str, permissions: PermissionSet, document: bytes, shadows: dict[str, Rollout]) -> float:
    """Write a set's chunks and head, then the shadows pointer; returns when the pointer was put."""
    async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
        await PolicyStore(etcd).write_set(permissions, document)
        lay = layout.Layout(layout.DEFAULT_PREFIX)
        written = time.time()
        await etcd.call(etcd.kv.put, lay.shadows, layout.encode_shadows(shadows))
        return written


def _wait_installed(port: int, version: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(port)
        if version in [s.get("version") for s in status.get("shadows", [])]:
            return float(status["installed_at"])
        time.sleep(0.05)
    raise RuntimeError(f"the sidecar did not install {version} within {timeout} s")


def _one(
    url: str, token: str, shadow: PermissionSet, *, endpoint: str, http_port: int, load: tuple[float, int], logs: Path
) -> dict[str, float]:
    """One kind of shadow once: a steady stretch, then the same with the shadow arriving."""
    seconds, rps = load
    steady_log, busy_log = logs / "steady.log", logs / "busy.log"
    document = dump_permission_set(shadow)
    _load(url, token, seconds, rps, steady_log).communicate(timeout=seconds + 60)
    steady = _requests(steady_log)
    busy_load = _load(url, token, seconds, rps, busy_log)
    time.sleep(1.0)
    written = asyncio.run(_write(endpoint, shadow, document, {shadow.version: Rollout()}))
    installed = _wait_installed(http_port, shadow.version)
    busy_load.communicate(timeout=seconds + 60)
    busy = _requests(busy_log)
    # The rebuild's window: from the pointer write until installed, at least a second; the
    # steady p99 is that of windows of the same length in the steady stretch (their median), so
    # that a p99 over a few hundred Checks is compared with p99s over as many.
    span = max(installed - written, 1.0)
    during = [lat for start, _s, lat in busy if written <= start <= written + span]
    bad = [s for _t, s, _l in steady + busy if s != 200]
    if bad:
        raise RuntimeError(f"bench: answers other than 200 during the rebuild: {len(bad)}")
    steady_p99 = _windowed_p99(steady, span)
    # Back to the active set alone before the next round.
    asyncio.run(_drop_shadows(endpoint))
    _wait_without(http_port)
    return {
        "steady_p99_us": steady_p99,
        "rebuild_p99_us": _p99(during),
        "rebuild_max_us": max(during, default=float("nan")),
        "window_p99_us": _p99([lat for _t, _s, lat in busy]),
        "whole_steady_p99_us": _p99([lat for _t, _s, lat in steady]),
        "requests_during": len(during),
        "build_s": installed - written,
        "ratio": _p99(during) / steady_p99,
    }


def _seed(endpoint: str, active: PermissionSet) -> None:
    async def seed() -> None:
        async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
            store = PolicyStore(etcd)
            await store.register_catalog(parse_catalog(CATALOG, "catalog"))
            await store.init(active, dump_permission_set(active))

    asyncio.run(seed())


def run(grants: int, *, rounds: int = 3, seconds: float = 6.0, rps: int = 500, sidecar: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="authz-rebuild-") as tmp:
        workdir = Path(tmp)
        bench = Bench(workdir, seconds)
        cluster = EtcdCluster(workdir / "etcd").start()
        process: Process | None = None
        try:
            endpoint = cluster.endpoints
            _seed(endpoint, policy(grants, "v1"))
            grpc_port, http_port = free_port(), free_port()
            # -P: the current directory is not put first on sys.path, so that --sidecar-path's
            # checkout (PYTHONPATH) is the one imported even when run from another checkout. The
            # disk copy is on, as it ships: saved after every install, it is in the window when the
            # build takes under its second.
            argv = [
                sys.executable, "-P", "-m", "authz_sidecar", "serve",
                "--etcd", endpoint, "--service", "things", "--region", "bench",
                "--listen", f"{LOOPBACK}:{grpc_port}", "--http", f"{LOOPBACK}:{http_port}",
                "--jwt-authn-payload-key", "jwt_payload", "--state-dir", str(workdir / "state"),
                "--log-level", "warning",
            ]  # fmt: skip
            process = Process("sidecar", argv, workdir, env={"PYTHONPATH": sidecar} if sidecar else {})
            wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", process, timeout=600)
            token = bench.issuer.token(ALLOWED)
            results: dict[str, list[dict[str, float]]] = {"change": [], "new": []}
            with bench.envoy("grpc", grpc_port) as (listen, _proxy):
                url = f"http://{LOOPBACK}:{listen}/things/1"
                for number in range(rounds):
                    for kind, rows in results.items():
                        version = f"v{2 + 2 * number + (kind == 'new')}"
                        prefix = "user" if kind == "change" else "other"
                        shadow = policy(grants, version, prefix=prefix, changed=3 if kind == "change" else 0)
                        measured = _one(
                            url,
                            token,
                            shadow,
                            endpoint=endpoint,
                            http_port=http_port,
                            load=(seconds, rps),
                            logs=workdir,
                        )
                        rows.append(measured)
            summary = {}
            for kind, rows in results.items():
                ordered = sorted(rows, key=lambda r: r["ratio"])
                summary[kind] = {**ordered[len(ordered) // 2], "ratios": [round(r["ratio"], 2) for r in rows]}
            return {"grants": grants, "rps": rps, "seconds": seconds, "rounds": rounds, **summary}
        finally:
            if process is not None:
                process.stop()
            cluster.stop()


async def _drop_shadows(endpoint: str) -> None:
    async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
        await etcd.call(etcd.kv.put, layout.Layout(layout.DEFAULT_PREFIX).shadows, layout.encode_shadows({}))


def _wait_without(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _status(port).get("shadows"):
            return
        time.sleep(0.05)
    raise RuntimeError("the sidecar kept a shadow that was dropped")


def line(result: dict[str, Any]) -> str:
    parts = []
    for kind, what in (("change", "a proposal changing 3 principals"), ("new", "a set sharing nothing with it")):
        r = result[kind]
        parts.append(
            f"{what}: p99 {r['rebuild_p99_us'] / 1000:.1f} ms during the rebuild ({r['requests_during']} Checks, "
            f"build {r['build_s']:.2f} s, max {r['rebuild_max_us'] / 1000:.1f} ms) "
            f"vs {r['steady_p99_us'] / 1000:.1f} ms steady = {r['ratio']:.2f}x "
            f"(rounds {', '.join(f'{x:.2f}x' for x in r['ratios'])})"
        )
    return (
        f"Checks through Envoy at {result['rps']}/s while a {result['grants']:,}-grant shadow arrives in etcd "
        f"(median of {result['rounds']} rounds; goal: within 2x of steady):\n  " + "\n  ".join(parts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grants", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rps", type=int, default=500)
    parser.add_argument("--sidecar-path", default="", help="run the sidecar from this checkout (PYTHONPATH)")
    args = parser.parse_args()
    result = run(args.grants, rounds=args.rounds, seconds=args.seconds, rps=args.rps, sidecar=args.sidecar_path)
    print(line(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
