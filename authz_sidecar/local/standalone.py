"""One real etcd and one real sidecar listening on a Unix socket, for the runnable examples: what an
application sees in its pod (the sidecar's socket, a trusted caller) without the rest of the mesh."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.mesh import run_ctl
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.telemetry import logs


@contextmanager
def sidecar_on_socket(
    work: Path, catalog: dict[str, Any], policy: dict[str, Any], *, extra: Sequence[str] = ()
) -> Iterator[tuple[str, str]]:
    """Start etcd, register `catalog` and make `policy` the active set with ctl, start a sidecar of
    the catalog's service on ``work/authz.sock``; yield (the socket's gRPC target, etcd's
    endpoints). Everything is stopped on the way out."""
    logs.configure("warning")  # ctl runs in this process: its audit lines would drown the example
    cluster = EtcdCluster(work / "etcd").start()
    sidecar: Process | None = None
    try:
        (work / "catalog.json").write_text(json.dumps(catalog))
        (work / "active.json").write_text(json.dumps(policy))
        run_ctl(cluster.endpoints, "registry", "put", "--file", str(work / "catalog.json"))
        run_ctl(cluster.endpoints, "init", "--file", str(work / "active.json"))
        socket_path = work / "authz.sock"
        http = free_port()
        argv = [
            sys.executable, "-m", "authz_sidecar", "serve", "--etcd", cluster.endpoints,
            "--listen", f"unix://{socket_path}", "--http", f"{LOOPBACK}:{http}", "--service", catalog["service"],
            "--cache-file", "off", *extra,
        ]  # fmt: skip
        sidecar = Process("sidecar", argv, work)
        wait_for_http(f"http://{LOOPBACK}:{http}/readyz", sidecar, timeout=30)
        yield f"unix://{socket_path}", cluster.endpoints
    finally:
        if sidecar is not None:
            sidecar.stop()
        cluster.stop()
