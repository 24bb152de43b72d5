"""Where the CPU goes under load: py-spy on the sidecar and on the bare threaded gRPC server.

Each server runs behind Envoy exactly as in ``make bench`` while h2load drives 16 streams; py-spy
samples every thread of the server process (``--idle`` off, so only running threads count) and the
samples are folded into self time per function. Comparing the two tables says what the sidecar
adds on top of what gRPC Python costs anyway.

Run as ``python -m authz_sidecar.bench.profile [--seconds 8]`` (py-spy needs ptrace: root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from authz_sidecar.bench import h2load
from authz_sidecar.bench.run import ALLOWED, Bench
from authz_sidecar.local.processes import LOOPBACK, Process, free_port


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("profile: py-spy is missing (pip install py-spy)")
    return found


def record(pid: int, seconds: float, out: Path) -> None:
    argv = [_py_spy(), "record", "--gil", "-p", str(pid), "-d", str(int(seconds)), "-r", "250"]
    subprocess.run(  # noqa: S603 - py-spy on our own child
        [*argv, "-f", "raw", "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=seconds + 60,
    )


# Files whose frames are the request handler itself (the sidecar's Check, the bare server's).
HANDLER_FILES = ("authz_sidecar/fronts/extauthz.py", "authz_sidecar/bench/baselines.py")


def self_time(raw: Path, top: int) -> tuple[list[tuple[str, float]], float]:
    """Fold py-spy's raw (collapsed) stacks into the share of samples each leaf function takes,
    and the share of samples inside the request handler (inclusive)."""
    counts: collections.Counter[str] = collections.Counter()
    total = handler = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] += int(n)
        total += int(n)
        if any(f in stack for f in HANDLER_FILES):
            handler += int(n)
    shares = [(frame, count / max(total, 1)) for frame, count in counts.most_common(top)]
    return shares, handler / max(total, 1)


def profile(bench: Bench, name: str, server: Process, port: int, *, seconds: float, top: int) -> str:
    with bench.envoy("grpc", port) as (listen, _proxy):
        url = f"http://{LOOPBACK}:{listen}/things/1"
        headers = {"authorization": f"Bearer {bench.issuer.token(ALLOWED)}"}
        raw = bench.workdir / f"{name}.raw"
        load = threading.Thread(
            target=h2load.run, kwargs={"url": url, "streams": 16, "seconds": seconds + 2, "headers": headers}
        )
        load.start()
        try:
            record(server.pid, seconds, raw)
        finally:
            load.join()
    shares, handler = self_time(raw, top)
    lines = [f"{name}: self time by function (share of samples holding the GIL)"]
    lines += [f"  {share * 100:5.1f}%  {frame}" for frame, share in shares]
    lines.append(f"  in the request handler (inclusive): {handler * 100:.1f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    h2load.find()
    _py_spy()
    with tempfile.TemporaryDirectory(prefix="authz-profile-") as tmp:
        bench = Bench(Path(tmp), args.seconds)
        port = free_port()
        bare = [sys.executable, "-m", "authz_sidecar.bench.baselines", "grpc-threads", "--port", str(port)]
        with bench.server("bare", bare, port) as server:
            print(
                profile(bench, "bare grpc.server threads allow-all", server, port, seconds=args.seconds, top=args.top)
            )
        grpc_port, http_port = free_port(), free_port()
        argv = bench.sidecar_argv(grpc_port, http_port)
        with bench.server("sidecar", argv, grpc_port, f"http://{LOOPBACK}:{http_port}/readyz") as server:
            print()
            print(profile(bench, "authz-sidecar (threads)", server, grpc_port, seconds=args.seconds, top=args.top))


if __name__ == "__main__":
    main()
