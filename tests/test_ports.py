"""A second sidecar on an address already in use: one clear line on stderr and a non-zero exit,
never a traceback, and never a sidecar silently sharing the first one's gRPC port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz_sidecar.local.processes import Process, free_port, wait_for_http

from .conftest import write_policy


def serve(name: str, tmp: Path, policy: Path, grpc: int, http: int, http_authz: int) -> Process:
    argv = [
        sys.executable, "-m", "authz_sidecar", "serve", "--policy-dir", str(policy), "--service", "things",
        "--listen", f"127.0.0.1:{grpc}", "--http", f"127.0.0.1:{http}", "--http-authz", f"127.0.0.1:{http_authz}",
        "--grace", "0.5",
    ]  # fmt: skip
    return Process(name, argv, tmp)


def stderr_lines(proc: Process) -> list[str]:
    """The child's output, without the JSON log lines (the sidecar logs to stderr too)."""
    return [line for line in proc.log_path.read_text().splitlines() if line.strip() and not line.startswith("{")]


@pytest.mark.parametrize("shared", ["--listen", "--http", "--http-authz"])
def test_a_second_sidecar_on_a_port_in_use_says_so_and_exits(tmp_path: Path, shared: str) -> None:
    policy = write_policy(tmp_path / "p")
    first_ports = {"--listen": free_port(), "--http": free_port(), "--http-authz": free_port()}
    second_ports = {"--listen": free_port(), "--http": free_port(), "--http-authz": free_port()}
    second_ports[shared] = first_ports[shared]
    first = serve("first", tmp_path, policy, *first_ports.values())
    second: Process | None = None
    try:
        wait_for_http(f"http://127.0.0.1:{first_ports['--http']}/readyz", first)
        second = serve("second", tmp_path, policy, *second_ports.values())
        try:
            code = second.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 1, f"the second sidecar kept running beside the first:\n{second.log_tail()}"
        lines = stderr_lines(second)
        assert len(lines) == 1, "\n".join(lines)
        assert lines[0].startswith("authz-sidecar: ") and shared in lines[0] and "in use" in lines[0], lines[0]
        assert "Traceback" not in second.log_path.read_text()
        assert first.alive()
    finally:
        if second is not None:
            second.stop()
        first.stop()
