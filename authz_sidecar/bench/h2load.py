"""Drive a URL with h2load and read back throughput, latency percentiles and status codes."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


class H2loadMissingError(RuntimeError):
    pass


def find() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise H2loadMissingError(
            "h2load not found: install Debian's nghttp2-client (make bench does this when run as root)"
        )
    return path


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    statuses: dict[int, int]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run(
    url: str,
    *,
    streams: int,
    seconds: float,
    headers: dict[str, str],
    warmup: float = 0.3,
    data: Path | None = None,
) -> LoadResult:
    """Open-ended load for `seconds`: 1 stream = one connection, one request at a time; 16 streams =
    4 connections x 4 concurrent streams. With `data`, every request is a POST of that file's bytes
    (a gRPC call when it holds one framed message and the headers say application/grpc)."""
    connections = 1 if streams == 1 else 4
    per_connection = streams // connections
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "h2load.log"
        argv = [
            find(),
            url,
            "-t",
            "1",
            "-c",
            str(connections),
            "-m",
            str(per_connection),
            "-D",
            f"{int(seconds * 1000)}ms",
            "--warm-up-time",
            f"{int(warmup * 1000)}ms",
            "--log-file",
            str(log),
        ]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        if data is not None:
            argv += ["-d", str(data)]
        out = subprocess.run(  # noqa: S603 - argv built here from fixed parts
            argv, capture_output=True, text=True, timeout=seconds + warmup + 60, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr or out.stdout}")
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            status, latency = int(parts[1]), float(parts[2])
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(latency)
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out.stdout)
    if not match:
        raise RuntimeError(f"cannot read h2load output:\n{out.stdout}")
    elapsed = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        rps=float(match.group(3)),
        p50_us=_percentile(latencies, 0.50),
        p99_us=_percentile(latencies, 0.99),
        statuses=statuses,
    )
