"""Peak memory of a real ``authz-sidecar serve --http-authz`` while one client sends a huge header.

    .venv/bin/python tools/header_memory.py [MEGABYTES]

Starts the sidecar as a child process on free loopback ports, sends ``GET /things/1`` with one
header of MEGABYTES (200 by default) in 1 MiB writes, stops writing when the sidecar answers or
closes, and prints the sidecar's peak resident memory (VmHWM) before and after, with the answer it
gave. The child is stopped by its pid. Linux only (/proc).
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

from authz_sidecar.local.processes import Process, free_port, wait_for_http

CATALOG = """service: things
permissions: [{handle: "things:view"}]
routes: [{method: GET, path: "/things/{id}", permission: "things:view"}]
"""
ACTIVE = """version: v1
roles: {viewer: ["things:view"]}
grants: [{principal: alice, roles: [viewer]}]
"""


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def send_huge_header(port: int, megabytes: int) -> tuple[bytes, float]:
    """Write the header until done or refused; return the first bytes answered and the seconds taken."""
    chunk = b"a" * (1024 * 1024)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"GET /things/1 HTTP/1.1\r\nhost: x\r\nx-big: ")
        sock.setblocking(False)
        sent = 0
        answer = b""
        while sent < megabytes and not answer:
            try:
                answer = sock.recv(4096)
                if not answer:
                    answer = b"(closed)"
                break
            except BlockingIOError:
                pass
            except ConnectionError as exc:
                answer = f"({type(exc).__name__})".encode()
                break
            try:
                sock.setblocking(True)
                sock.sendall(chunk)
                sock.setblocking(False)
                sent += 1
            except (BrokenPipeError, ConnectionResetError) as exc:
                answer = f"(refused after {sent} MiB: {type(exc).__name__})".encode()
        if not answer:
            sock.setblocking(True)
            sock.sendall(b"\r\n\r\n")
            try:
                answer = sock.recv(4096) or b"(closed)"
            except (TimeoutError, ConnectionError) as exc:
                answer = f"({type(exc).__name__})".encode()
        return answer, time.monotonic() - started


def main() -> int:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "policy" / "shadows").mkdir(parents=True)
        (work / "policy" / "catalog.yaml").write_text(CATALOG)
        (work / "policy" / "active.yaml").write_text(ACTIVE)
        grpc_port, http_port, authz_port = free_port(), free_port(), free_port()
        argv = [
            sys.executable, "-m", "authz_sidecar", "serve", "--policy-dir", str(work / "policy"),
            "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
            "--http-authz", f"127.0.0.1:{authz_port}", "--cache-file", "off",
        ]  # fmt: skip
        proc = Process("sidecar", argv, work)
        try:
            wait_for_http(f"http://127.0.0.1:{http_port}/readyz", proc)
            before = peak_kib(proc.pid)
            answer, seconds = send_huge_header(authz_port, megabytes)
            after = peak_kib(proc.pid)
        finally:
            proc.stop()
    status = answer.split(b"\r\n", 1)[0].decode("latin-1")
    print(f"header: {megabytes} MiB; answer after {seconds:.1f} s: {status}")
    print(f"sidecar peak RSS (VmHWM): {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
