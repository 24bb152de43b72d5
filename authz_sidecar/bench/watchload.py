"""Watch load: what a fleet's watches cost etcd, each on etcd directly and all through one gRPC proxy.

Every sidecar lists its prefix once and then holds one watch on it (store/sources/etcd.py), asking
for progress every third of ``--etcd-liveness``. A fleet talking to etcd directly is as many watch
streams and watchers as sidecars, and as many progress requests; ``etcd grpc-proxy`` folds the
watches of one range into one (docs/operations.md, "Many sidecars"). This measures both, on a
fresh etcd for each row, for:

- real sidecar processes (``--sidecars``; ~70 MB and ~1 s of CPU each to start, so a modest N),
  with a live shadow v2;
- lightweight watchers (``--watchers``), N etcd clients in this process, each doing what a
  sidecar's source does with etcd and nothing else: one listing of the prefix, then the same
  ``Etcd.watch`` call from the next revision, reopened from the last revision seen when it is
  lost, listed again when that revision was compacted. No snapshot is built.

A quiet fleet writes nothing. With ``--reports``, every sidecar publishes its report on the live
shadow every 2 s (the default ``--report-interval``), as each one does once traffic has reached
it: real sidecars are sent one Check each, and each lightweight watcher has its report written
the way the publisher writes it (a lease, the key on it, the previous lease revoked), through the
same endpoint it watches. Every sidecar watches the whole prefix, reports included, so each report
goes to every watcher: N / 2 writes a second, each fanned out N times.

For each row, after the watchers are up and have settled, a window of ``--window`` seconds in
which ``--writes`` canary steps are written to etcd directly (never through the proxy), at even
times, each followed until every watcher has seen it. Reported: etcd's watcher and watch-stream
gauges at the end of the window, the CPU seconds etcd and the proxy spent in it (/proc), their
RSS, the CPU of the watchers' side (the sidecar processes, or this process), the revisions written
in the window (the canary steps, and the sidecars' reports), how many watches were reopened in
it, and the slowest write's time until the last watcher had it (followed for up to 30 s after
the window).

Run as ``python -m authz_sidecar.bench.watchload [--sidecars 8] [--watchers 100,500,1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from authz_sidecar.bench.direct import sample_request
from authz_sidecar.bench.propagation import seed_examples
from authz_sidecar.local.etcd import EtcdCluster, EtcdGrpcProxy, scrape
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.store.etcd import CompactedError, Etcd, EtcdError, EtcdOptions, WatchLostError
from authz_sidecar.store.layout import Layout
from authz_sidecar.store.policy import PolicyStore

WATCHERS = "etcd_debugging_mvcc_watcher_total"
STREAMS = "etcd_debugging_mvcc_watch_stream_total"
# The sidecar's own default (--etcd-liveness), so the light watchers ask for progress as often.
LIVENESS = 5.0
# The sidecar's default --report-interval.
REPORT_INTERVAL = 2.0
SETTLE = 3.0
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    kind: str  # "sidecars" (processes) or "watchers" (lightweight, in this process)
    count: int
    path: str  # "direct" or "proxy"
    reports: bool
    etcd_watchers: int
    etcd_streams: int
    etcd_cpu: float
    proxy_cpu: float | None
    clients_cpu: float
    etcd_rss_mib: float
    proxy_rss_mib: float | None
    revisions: int
    reopened: int
    slowest_write_ms: float | None  # None: a write had not reached every watcher 30 s after the window


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Watcher:
    """One lightweight watcher's progress: the revision it has seen, and its reopenings."""

    revision: int = 0
    created: bool = False
    reopened: int = 0
    relisted: int = 0


async def follow(options: EtcdOptions, root: str, watcher: Watcher, opening: asyncio.Semaphore) -> None:
    """The source's loop (store/sources/etcd.py EtcdPolicySource._follow) without the snapshot:
    the same listing, the same watch call, the same resume and relist, the same first backoff."""
    async with Etcd(options) as etcd:
        listed = False
        while True:
            try:
                if not listed:
                    async with opening:  # a thousand first listings at once would only time out
                        watcher.revision = (await etcd.listing(root)).revision
                    listed = True
                async with contextlib.aclosing(etcd.watch(root, watcher.revision + 1, LIVENESS)) as batches:
                    async for batch in batches:
                        watcher.created = True
                        if batch.changes:
                            watcher.revision = max(watcher.revision, *(c.mod_revision for c in batch.changes))
            except CompactedError:
                watcher.relisted += 1
                listed = False
                continue
            except (WatchLostError, EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError):
                watcher.reopened += 1
            await asyncio.sleep(0.1)


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _check(grpc_port: int) -> None:
    with grpc.insecure_channel(f"{LOOPBACK}:{grpc_port}") as channel:
        pb_grpc.AuthorizationStub(channel).Check(sample_request("alice"), timeout=10)


@dataclass
class Fleet:
    """What a row's watchers are, and how to ask them where they are."""

    revisions: Callable[[], Awaitable[list[int]]]
    reopened: Callable[[], int]
    cpu: Callable[[], float]
    stop: Callable[[], Awaitable[None]]
    processes: list[Process] = field(default_factory=list)


async def publish(options: EtcdOptions, idents: list[str], offset: float) -> None:
    """The reports of `idents`, each every REPORT_INTERVAL as store/publisher.py writes one: a
    fresh lease, the report on it, the previous lease revoked (nothing is deleted: the key moved)."""
    layout = Layout()
    document = json.dumps({"sidecar": "", "region": "us-east", "revision": 0, "state": "canary", "weight": 10})
    leases: dict[str, int] = {}
    async with Etcd(options) as etcd:
        await asyncio.sleep(offset)
        while True:
            started = time.monotonic()
            for ident in idents:
                with contextlib.suppress(EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError):
                    lease = await etcd.call(etcd.lease.grant, round(REPORT_INTERVAL * 3))
                    await etcd.call(etcd.kv.put, layout.reports("v2") + ident, document, lease=lease.ID)
                    previous, leases[ident] = leases.get(ident), lease.ID
                    if previous is not None:
                        await etcd.call(etcd.lease.revoke, previous)
            await asyncio.sleep(max(0.0, started + REPORT_INTERVAL - time.monotonic()))


async def light_fleet(endpoint: str, count: int, *, reports: bool) -> Fleet:
    root = Layout().root
    watchers = [Watcher() for _ in range(count)]
    opening = asyncio.Semaphore(50)
    options = EtcdOptions(endpoints=(endpoint,))
    tasks = [asyncio.create_task(follow(options, root, w, opening)) for w in watchers]
    deadline = time.monotonic() + 120
    while not all(w.created for w in watchers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(w.created for w in watchers)} of {count} watches created in 120 s")
        await asyncio.sleep(0.05)
    if reports:  # a writer per 50 sidecars, their turns spread over the interval
        idents = [f"watcher-{i}" for i in range(count)]
        writers = [idents[i : i + 50] for i in range(0, count, 50)]
        for i, group in enumerate(writers):
            offset = REPORT_INTERVAL * i / len(writers)
            tasks.append(asyncio.create_task(publish(options, group, offset)))

    async def revisions() -> list[int]:
        return [w.revision for w in watchers]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return Fleet(revisions, lambda: sum(w.reopened for w in watchers), time.process_time, stop)


async def sidecar_fleet(endpoint: str, count: int, workdir: Path, *, reports: bool) -> Fleet:
    grpc_ports: list[int] = []
    ports: list[int] = []
    processes: list[Process] = []
    for i in range(count):
        grpc_port, http_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "authz_sidecar", "serve",
            "--etcd", endpoint, "--service", "things", "--region", "us-east",
            "--listen", f"{LOOPBACK}:{grpc_port}", "--http", f"{LOOPBACK}:{http_port}",
            "--cache-file", "off", "--log-level", "warning", "--workers", "1",
            "--jwt-authn-payload-key", "jwt_payload",
        ]  # fmt: skip
        processes.append(Process(f"sidecar{i}-{os.urandom(3).hex()}", argv, workdir))
        grpc_ports.append(grpc_port)
        ports.append(http_port)

    async def stop() -> None:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in processes))

    try:
        for process, port in zip(processes, ports, strict=True):
            await asyncio.to_thread(wait_for_http, f"http://{LOOPBACK}:{port}/readyz", process, 120)
    except BaseException:
        await stop()
        raise
    if reports:  # one decision each: v2 is evaluated beside v1, and the report has something to say
        for port in grpc_ports:
            await asyncio.to_thread(_check, port)

    async def revisions() -> list[int]:
        found = await asyncio.gather(*(asyncio.to_thread(_status, port) for port in ports))
        return [s["revision"] or 0 for s in found]

    def reopened() -> int:
        return sum(p.log_path.read_text(errors="replace").count('"etcd_unreachable"') for p in processes)

    def cpu() -> float:
        return sum(cpu_seconds(p.pid) for p in processes)

    return Fleet(revisions, reopened, cpu, stop, processes)


class Deliveries:
    """When each write reached the last watcher, polled only while one is on its way (a sidecar's
    /status costs it CPU that would be counted in the window)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.written: dict[int, float] = {}
        self.took: dict[int, float] = {}
        self.arrived = asyncio.Event()  # set while no write is on its way

    def wrote(self, revision: int, at: float) -> None:
        self.written[revision] = at
        self.arrived.clear()

    async def poll(self) -> None:
        while True:
            pending = [r for r in self.written if r not in self.took]
            if pending:
                low = min(await self.fleet.revisions())
                now = time.monotonic()
                for revision in pending:
                    if low >= revision:
                        self.took[revision] = now - self.written[revision]
                if len(self.took) == len(self.written):
                    self.arrived.set()
            await asyncio.sleep(0.005 if pending else 0.02)

    def slowest(self) -> float | None:
        """The slowest write's time to the last watcher, in ms; None while one is on its way."""
        if len(self.took) < len(self.written):
            return None
        return max(self.took.values(), default=0.0) * 1e3


async def _window(endpoint: str, window: float, writes: int, deliveries: Deliveries) -> int:
    """`writes` canary steps at even times over `window` seconds, written to etcd itself; returns
    the revisions written in the window (the sidecars' reports included)."""
    started = time.monotonic()
    async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
        first, _cluster = await etcd.current("/")
        store = PolicyStore(etcd)
        for i in range(writes):
            await asyncio.sleep(max(0.0, started + (i + 0.5) * window / writes - time.monotonic()))
            written = time.monotonic()
            await store.canary("v2", {"us-east": 20 if i % 2 == 0 else 10})
            deliveries.wrote(store.last_revision, written)
        await asyncio.sleep(max(0.0, started + window - time.monotonic()))
        last, _cluster = await etcd.current("/")
    return last - first


async def measure(
    kind: str,
    count: int,
    path: str,
    *,
    reports: bool,
    window: float,
    writes: int,
    progress_interval: str,
    workdir: Path,
) -> Row:
    rowdir = Path(tempfile.mkdtemp(prefix=f"{kind}-{count}-{path}-", dir=workdir))
    # A cluster behind proxies needs progress notifications of its own (docs/operations.md); one
    # that sidecars reach directly runs etcd's default (every 10 minutes), as it would in production.
    flags = [f"--experimental-watch-progress-notify-interval={progress_interval}"] if path == "proxy" else []
    cluster = EtcdCluster(rowdir / "etcd", flags=flags)
    proxy: EtcdGrpcProxy | None = None
    fleet: Fleet | None = None
    try:
        cluster.start()
        member = cluster.members[0]
        if member.process is None:
            raise RuntimeError("etcd did not start")
        etcd_pid = member.process.pid
        async with Etcd(EtcdOptions(endpoints=(cluster.endpoints,))) as etcd:
            await seed_examples(PolicyStore(etcd))
        endpoint = cluster.endpoints
        if path == "proxy":
            proxy = EtcdGrpcProxy(f"http://{cluster.endpoints}", rowdir).start()
            endpoint = proxy.endpoints
        if kind == "sidecars":
            fleet = await sidecar_fleet(endpoint, count, rowdir, reports=reports)
        else:
            fleet = await light_fleet(endpoint, count, reports=reports)
        await asyncio.sleep(SETTLE)
        proxy_pid = proxy.process.pid if proxy is not None and proxy.process is not None else None
        before = (cpu_seconds(etcd_pid), cpu_seconds(proxy_pid) if proxy_pid else 0.0, fleet.cpu(), fleet.reopened())
        deliveries = Deliveries(fleet)
        poller = asyncio.create_task(deliveries.poll())
        revisions = await _window(cluster.endpoints, window, writes, deliveries)
        after = (cpu_seconds(etcd_pid), cpu_seconds(proxy_pid) if proxy_pid else 0.0, fleet.cpu(), fleet.reopened())
        gauges = scrape(member.metrics_url, [WATCHERS, STREAMS])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await deliveries.arrived.wait()
        slowest = deliveries.slowest()
        poller.cancel()
        return Row(
            kind=kind,
            count=count,
            path=path,
            reports=reports,
            etcd_watchers=int(gauges[WATCHERS]),
            etcd_streams=int(gauges[STREAMS]),
            etcd_cpu=after[0] - before[0],
            proxy_cpu=after[1] - before[1] if proxy_pid else None,
            clients_cpu=after[2] - before[2],
            etcd_rss_mib=rss_mib(etcd_pid),
            proxy_rss_mib=rss_mib(proxy_pid) if proxy_pid else None,
            revisions=revisions,
            reopened=after[3] - before[3],
            slowest_write_ms=slowest,
        )
    finally:
        if fleet is not None:
            await fleet.stop()
        if proxy is not None:
            proxy.stop()
        cluster.stop()


def table(rows: Sequence[Row], *, window: float, writes: int, progress_interval: str) -> str:
    head = (
        f"watch load over a {window:g} s window with {writes} canary steps written to etcd; etcd's progress "
        f"notifications every {progress_interval} behind the proxy, etcd's default (10m) for direct; "
        f"{os.cpu_count()} cores; with reports, each sidecar's every {REPORT_INTERVAL:g} s\n"
    )
    columns = (
        "watchers", "path", "reports", "etcd watchers", "etcd streams", "etcd CPU s", "proxy CPU s", "watchers' CPU s",
        "etcd RSS MiB", "proxy RSS MiB", "revisions", "reopened", "slowest write ms",
    )  # fmt: skip
    lines = [columns]
    for r in rows:
        lines.append(
            (
                f"{r.count} {r.kind}",
                r.path,
                "yes" if r.reports else "no",
                str(r.etcd_watchers),
                str(r.etcd_streams),
                f"{r.etcd_cpu:.2f}",
                "-" if r.proxy_cpu is None else f"{r.proxy_cpu:.2f}",
                f"{r.clients_cpu:.2f}",
                f"{r.etcd_rss_mib:.0f}",
                "-" if r.proxy_rss_mib is None else f"{r.proxy_rss_mib:.0f}",
                str(r.revisions),
                str(r.reopened),
                "> 30 s" if r.slowest_write_ms is None else f"{r.slowest_write_ms:.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return head + "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, default=8, help="real sidecar processes (0: none)")
    parser.add_argument("--watchers", default="100,500,1000", help="lightweight watcher counts, comma separated")
    parser.add_argument("--paths", default="direct,proxy", help="direct, proxy, or both")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per row")
    parser.add_argument("--writes", type=int, default=5, help="canary steps written in the window")
    parser.add_argument("--reports", action="store_true", help="every sidecar publishes its report (see above)")
    parser.add_argument(
        "--progress-interval",
        default="2s",
        help="etcd's --experimental-watch-progress-notify-interval when the watchers go through the proxy",
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # the store's audit lines
    plan = [("sidecars", args.sidecars)] if args.sidecars else []
    plan += [("watchers", int(n)) for n in args.watchers.split(",") if n.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="authz-watchload-") as tmp:
        for kind, count in plan:
            for path in paths:
                row = asyncio.run(
                    measure(
                        kind,
                        count,
                        path,
                        reports=args.reports,
                        window=args.window,
                        writes=args.writes,
                        progress_interval=args.progress_interval,
                        workdir=Path(tmp),
                    )
                )
                rows.append(row)
                print(f"  measured {count} {kind} {path}", file=sys.stderr, flush=True)
    print(table(rows, window=args.window, writes=args.writes, progress_interval=args.progress_interval))
    if args.out is not None:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": [asdict(r) for r in rows]})
        )


if __name__ == "__main__":
    main()
