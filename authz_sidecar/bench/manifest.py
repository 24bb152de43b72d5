"""FilterManifest's throughput and memory (goal: 200,000 blocks per second per sidecar core for a
manifest of 10 accounts).

A sidecar process per server model (``serve --server-model``, the file source) and this process as
the client, over real gRPC on loopback, sharing the machine's cores. The manifest: 100,000 blocks
of 10 accounts in batches of 1,000, for a principal holding export in 7 of them (so 70,000 allowed,
30,000 refused), with a shadow set observed beside the active one. The messages are encoded before
the clock starts; the client parses every answer and checks the counts and the summary.

Measured per model, median of the rounds: blocks per second (wall, client and sidecar together),
the sidecar's CPU per block (user + system from /proc over the run, so blocks per sidecar
CPU-second is what one core of it does), and its memory: resident set before the run and its
high-water mark after (VmHWM), whose difference bounds what streaming 100,000 blocks added,
gRPC's and protobuf's buffers included. Beside it, the same sidecar with one block per message,
the contract's first form, to show what a gRPC message costs.

``python -m authz_sidecar.bench.manifest [BLOCKS]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from authz_sidecar.bench.run import cpu_seconds
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.v1 import authz_pb2 as pb

METHOD = "/authz_sidecar.v1.Authz/FilterManifest"
ACCOUNTS = 10
HELD = 7  # accounts the principal may export from
PER_BATCH = 1000
MODELS = ("threads", "aio")


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shadows").mkdir(exist_ok=True)
    catalog = {"service": "exports", "permissions": [{"handle": "snapshots:export"}, {"handle": "snapshots:copy"}]}
    roles = {"exporter": ["snapshots:export"], "copier": ["snapshots:copy"]}
    grants: list[dict[str, Any]] = [
        {"principal": "exporter", "roles": ["exporter"], "scope": f"account:acct-{i}"} for i in range(HELD)
    ]
    grants += [{"principal": f"user-{i}", "roles": ["copier"]} for i in range(1000)]
    (directory / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    (directory / "active.yaml").write_text(yaml.safe_dump({"version": "v1", "roles": roles, "grants": grants}))
    shadow = {"version": "v2", "parent": "v1", "roles": roles, "grants": grants[1:]}
    (directory / "shadows" / "v2.yaml").write_text(yaml.safe_dump(shadow))
    return directory


def messages(blocks: int, per_message: int) -> list[bytes]:
    """The manifest encoded: the header, then `per_message` blocks per message (a lone Block when 1)."""
    header = pb.FilterManifestRequest(header=pb.ManifestHeader(principal="exporter", action="export"))
    out = [header.SerializeToString()]
    for start in range(0, blocks, per_message):
        chunk = [
            pb.Block(
                block_id=f"blk-{i:08d}",
                origin_volume=f"vol-{i % 7}",
                origin_account=f"acct-{i % ACCOUNTS}",
                created_at=1_700_000_000 + i,
                checksum="sha256:" + f"{i:064x}",
            )
            for i in range(start, min(blocks, start + per_message))
        ]
        message = (
            pb.FilterManifestRequest(block=chunk[0])
            if per_message == 1
            else pb.FilterManifestRequest(blocks=pb.BlockBatch(blocks=chunk))
        )
        out.append(message.SerializeToString())
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (its high-water mark), in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def stream(channel: grpc.Channel, encoded: list[bytes], blocks: int) -> None:
    """Send the manifest, read every answer, and check it: the allowed and refused counts, and one
    complete summary last. A wrong answer fails the benchmark."""
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    allowed = refused = 0
    summary = None
    for raw in call(iter(encoded), timeout=600):
        answer = pb.FilterManifestResponse.FromString(raw)
        kind = answer.WhichOneof("item")
        if kind == "answers":
            allowed += len(answer.answers.allowed)
            refused += len(answer.answers.refused)
        elif kind == "allowed":
            allowed += 1
        elif kind == "refused":
            refused += 1
        else:
            summary = answer.summary
    want_allowed = sum(1 for i in range(blocks) if i % ACCOUNTS < HELD)
    if (allowed, refused) != (want_allowed, blocks - want_allowed):
        raise RuntimeError(f"FilterManifest answered {allowed} allowed, {refused} refused of {blocks} blocks")
    if summary is None or not summary.complete or (summary.allowed, summary.refused) != (allowed, refused):
        raise RuntimeError(f"FilterManifest's summary is missing or wrong: {summary}")


def measure(model: str, workdir: Path, blocks: int, rounds: int, single_blocks: int) -> dict[str, Any]:
    policy = write_policy(workdir / "policy")
    grpc_port, http_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "authz_sidecar",
        "serve",
        "--listen",
        f"{LOOPBACK}:{grpc_port}",
        "--http",
        f"{LOOPBACK}:{http_port}",
        "--policy-dir",
        str(policy),
        "--service",
        "exports",
        "--region",
        "bench",
        "--server-model",
        model,
        "--log-level",
        "warning",
    ]
    batched = messages(blocks, PER_BATCH)
    one_by_one = messages(single_blocks, 1)
    proc = Process(f"sidecar-manifest-{model}", argv, workdir, env={"PYTHONUNBUFFERED": "1"})
    try:
        wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", proc)
        with grpc.insecure_channel(f"{LOOPBACK}:{grpc_port}") as channel:
            stream(channel, messages(PER_BATCH * 10, PER_BATCH), PER_BATCH * 10)  # warm: imports, memo, buffers
            runs = []
            for _ in range(rounds):
                before = memory_kib(proc.pid)
                cpu = cpu_seconds(proc.pid)
                started = time.perf_counter()
                stream(channel, batched, blocks)
                wall = time.perf_counter() - started
                cpu = cpu_seconds(proc.pid) - cpu
                after = memory_kib(proc.pid)
                runs.append(
                    {
                        "blocks_per_s": blocks / wall,
                        "cpu_us_per_block": cpu / blocks * 1e6,
                        "rss_before_mib": before["VmRSS"] / 1024,
                        "peak_growth_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
                    }
                )
            started = time.perf_counter()
            cpu = cpu_seconds(proc.pid)
            stream(channel, one_by_one, single_blocks)
            single_wall = time.perf_counter() - started
            single_cpu = cpu_seconds(proc.pid) - cpu
    finally:
        proc.stop()
    runs.sort(key=lambda r: r["blocks_per_s"])
    result: dict[str, Any] = dict(runs[len(runs) // 2])
    result["peak_growth_mib"] = max(r["peak_growth_mib"] for r in runs)
    result["blocks_per_cpu_s"] = 1e6 / result["cpu_us_per_block"]
    result["single_blocks_per_s"] = single_blocks / single_wall
    result["single_cpu_us_per_block"] = single_cpu / single_blocks * 1e6
    return result


def run(blocks: int = 100_000, rounds: int = 3, single_blocks: int = 5_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="authz-bench-manifest-") as tmp:
        return {
            "blocks": blocks,
            "accounts": ACCOUNTS,
            "per_batch": PER_BATCH,
            "rounds": rounds,
            "models": {model: measure(model, Path(tmp), blocks, rounds, single_blocks) for model in MODELS},
        }


def line(result: dict[str, Any]) -> str:
    parts = [
        f"{model}: {r['blocks_per_s']:,.0f} blocks/s, {r['cpu_us_per_block']:.2f} us sidecar CPU per block "
        f"({r['blocks_per_cpu_s']:,.0f} blocks per sidecar CPU-second), peak RSS +{r['peak_growth_mib']:.1f} MiB "
        f"over {r['rss_before_mib']:.0f} MiB; a block per message: {r['single_blocks_per_s']:,.0f} blocks/s"
        for model, r in result["models"].items()
    ]
    return (
        f"FilterManifest, {result['blocks']:,} blocks of {result['accounts']} accounts in batches of "
        f"{result['per_batch']:,} over gRPC: " + "; ".join(parts)
    )


if __name__ == "__main__":
    print(line(run(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)))
