"""A second sidecar on an address already in use: one clear line on stderr and a non-zero exit,
never a traceback, and never a sidecar silently sharing the first one's gRPC port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz_sidecar.local.processes import Process, free_port, wait_for_http

from .helpers import write_policy


def address(port: int | str) -> str:
    return port if isinstance(port, str) else f"127.0.0.1:{port}"


def serve(name: str, tmp: Path, policy: Path, grpc: int | str, http: int | str, http_authz: int | str) -> Process:
    argv = [
        sys.executable, "-m", "authz_sidecar", "serve", "--policy-dir", str(policy), "--service", "things",
        "--listen", address(grpc), "--http", address(http), "--http-authz", address(http_authz), "--grace", "0.5",
    ]  # fmt: skip
    return Process(name, argv, tmp)


def stderr_lines(proc: Process) -> list[str]:
    """The child's output, without the JSON log lines (the sidecar logs to stderr too)."""
    return [line for line in proc.log_path.read_text().splitlines() if line.strip() and not line.startswith("{")]


@pytest.mark.parametrize("shared", ["--listen", "--http", "--http-authz", "unix socket"])
def test_a_second_sidecar_on_a_port_in_use_says_so_and_exits(tmp_path: Path, shared: str) -> None:
    """Each address flag in turn is the one both sidecars are given; a unix socket too (gRPC would
    remove the first sidecar's socket file and take the path over)."""
    policy = write_policy(tmp_path / "p")
    first_ports: dict[str, int | str] = {"--listen": free_port(), "--http": free_port(), "--http-authz": free_port()}
    second_ports: dict[str, int | str] = {"--listen": free_port(), "--http": free_port(), "--http-authz": free_port()}
    if shared == "unix socket":
        shared = "--listen"
        first_ports[shared] = f"unix://{tmp_path}/authz.sock"
    second_ports[shared] = first_ports[shared]
    first = serve("first", tmp_path, policy, *first_ports.values())
    second: Process | None = None
    try:
        wait_for_http(f"http://{address(first_ports['--http'])}/readyz", first)
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
        if isinstance(first_ports["--listen"], str):
            assert Path(first_ports["--listen"].removeprefix("unix://")).exists()
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_a_controller_whose_metrics_port_is_taken_says_so_and_exits(tmp_path: Path) -> None:
    """`controller --metrics` on a port in use: the same one line as the sidecar's, not a traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable, "-m", "authz_sidecar", "controller", "--etcd", f"127.0.0.1:{free_port()}",
                "--metrics", f"127.0.0.1:{port}", "--dlq-file", str(tmp_path / "dlq.json"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert done.returncode == 1, done.stderr
    assert lines == [f"authz-sidecar: --metrics 127.0.0.1:{port}: address already in use (another controller?)"]
