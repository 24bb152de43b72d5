"""A paced HTTP/1.1 load generator for the scenario: many principals over keep-alive connections,
every answer recorded.

It runs as a process of its own (``python -m authz_sidecar.local.loadgen --config F --out F``), one
per region, so that what the scenario's own process does (ctl, polling etcd and the sidecars) never
holds the GIL while a request is due, and a region's pace does not depend on the other's.

Pacing is open loop: request ``i`` is due at ``start + i / rate`` whatever happened to the ones
before it; a worker thread takes the next due slot, sleeps until it, and sends. A slow answer
therefore makes later requests late (that lateness is measured and reported) rather than quietly
lowering the rate, which is what a closed loop would do. h2load could go faster but cannot give
each request its own principal, and the scenario's whole point is many principals.

The records are written as JSON when the generator stops (SIGTERM, SIGINT, or ``max_seconds``):
per request the wall-clock send and answer times (the clock the audit and the sidecars' logs use),
the principal and route (indices into the config), the status, the set version the upstream was
told decided (allowed requests) and the sidecar's deny reason (denied ones).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz_sidecar.local.processes import LOOPBACK

# (sent, answered, principal index, route index, status, set version, deny reason)
Record = tuple[float, float, int, int, int, str, str]


@dataclass(frozen=True)
class LoadConfig:
    """What one region's generator sends; written by the scenario as JSON."""

    port: int
    region: str
    rate: float  # requests per second
    workers: int  # threads, each with one keep-alive connection
    seed: int
    max_seconds: float  # a bound, whatever the scenario does
    principals: list[str]
    tokens: list[str]  # a bearer token per principal, same order
    routes: list[tuple[str, str]]  # (method, path); "{id}" in a path becomes a number
    route_weights: list[float]
    # Every `probe_every`-th request is the probe (principal, route): a synthetic check of what a
    # change touches, as a release engineer would run it, so coverage never waits on chance.
    probe: tuple[int, int] | None = None
    probe_every: int = 0

    @staticmethod
    def load(path: Path) -> LoadConfig:
        data = json.loads(path.read_text())
        data["routes"] = [tuple(r) for r in data["routes"]]
        data["probe"] = tuple(data["probe"]) if data.get("probe") else None
        return LoadConfig(**data)


class Generator:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self._slots = itertools.count()
        self._records: list[list[Record]] = [[] for _ in range(config.workers)]
        self._late: list[list[float]] = [[] for _ in range(config.workers)]
        self._start = 0.0
        self.started_at = 0.0

    def run(self) -> dict[str, Any]:
        self._start = time.monotonic() + 0.05
        self.started_at = time.time() + 0.05
        threads = [threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(self.config.workers)]
        for thread in threads:
            thread.start()
        # Polled rather than waited on: the signal handler that sets `stop` runs in this thread,
        # and must not run while this thread holds the event's lock.
        deadline = time.monotonic() + self.config.max_seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop.set()
        for thread in threads:
            thread.join(10)
        stopped_at = time.time()
        records = sorted(itertools.chain.from_iterable(self._records))
        late = sorted(itertools.chain.from_iterable(self._late))
        return {
            "region": self.config.region,
            "rate": self.config.rate,
            "started_at": self.started_at,
            "stopped_at": stopped_at,
            "late_p50_ms": _percentile(late, 0.5) * 1e3,
            "late_p99_ms": _percentile(late, 0.99) * 1e3,
            "late_max_ms": (late[-1] if late else 0.0) * 1e3,
            "records": records,
        }

    def _work(self, n: int) -> None:
        config = self.config
        rng = random.Random(config.seed * 1000 + n)  # noqa: S311 - traffic shape, not a secret
        routes = range(len(config.routes))
        conn = http.client.HTTPConnection(LOOPBACK, config.port, timeout=5)
        records, late = self._records[n], self._late[n]
        while not self.stop.is_set():
            slot = next(self._slots)
            delay = self._start + slot / config.rate - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                break
            late.append(max(0.0, -delay))
            if config.probe is not None and config.probe_every and slot % config.probe_every == 0:
                principal, route = config.probe
            else:
                principal = rng.randrange(len(config.principals))
                route = rng.choices(routes, config.route_weights)[0]
            method, path = config.routes[route]
            headers = {"authorization": f"Bearer {config.tokens[principal]}"}
            if method in ("PUT", "POST"):
                headers["content-length"] = "0"
            sent = time.time()
            status, version, reason = send(conn, method, path.replace("{id}", str(rng.randrange(1, 10_000))), headers)
            records.append((sent, time.time(), principal, route, status, version, reason))
        conn.close()


def send(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, str]:
    """One request on a kept-alive connection: (status, set version, deny reason); status 0 when
    no answer came (the error's name as the reason), and the connection is opened again next time."""
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return 0, "", type(exc).__name__
    version = ""
    if response.status == 200:
        try:
            version = str(json.loads(body).get("set_version") or "")
        except ValueError:
            version = ""
    return response.status, version, response.getheader("x-authz-reason") or ""


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description="paced HTTP load from many principals (the scenario's)")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    generator = Generator(LoadConfig.load(args.config))

    def stop(_signum: int, _frame: object) -> None:
        generator.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    result = generator.run()
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")))
    tmp.replace(args.out)  # the scenario never reads half a file
    print(f"{generator.config.region}: {len(result['records'])} requests, late p99 {result['late_p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
