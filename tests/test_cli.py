"""The command line: one clear line and a non-zero exit on error; AUTHZ_* variables; graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import Process, free_port, wait_for_http
from authz_sidecar.local.tokens import DemoIssuer

from .helpers import request, seed, shadow, status_of, unique_prefix, write_policy


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz_sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        # Flags that cannot be acted on are usage errors (2), found before anything starts.
        (["serve"], "no policy source", 2),
        (["serve", "--policy-dir", "/nonexistent"], "not a directory", 2),
        (["serve", "--policy-dir", ".", "--listen", "nowhere"], "--listen", 2),
        (["serve", "--policy-dir", ".", "--identity", "magic"], "unknown source", 2),
        (["serve", "--policy-dir", ".", "--identity", "header"], "--dev-principal-header", 2),
        (["serve", "--policy-dir", ".", "--jwt-algorithms", "none"], "never accepted", 2),
        (["serve", "--policy-dir", ".", "--grace", "soon"], "not a number", 2),
        (["serve", "--policy-dir", ".", "--state-dir", "/dev/null"], "--state-dir /dev/null: not a directory", 2),
        # The command ran and failed (1).
        (["validate", "--policy-dir", "/nonexistent"], "file not found", 1),
    ],
)
def test_errors_are_one_line_on_stderr(args: list[str], needle: str, code: int) -> None:
    result = run_cli(*args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("authz-sidecar: ") and needle in lines[0], result.stderr


def test_validate_reports_what_would_serve(tmp_path: Path) -> None:

    policy = write_policy(tmp_path / "p", shadows=[shadow("v2", weights={"us-east": 10})])
    result = run_cli("validate", "--policy-dir", str(policy), "--region", "us-east")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["active_version"] == "v1" and report["shadows"]["v2"]["weight_here"] == 10


def test_environment_configures_serve_and_sigterm_drains(tmp_path: Path) -> None:
    """AUTHZ_* variables stand in for flags; SIGTERM stops the sidecar with exit code 0."""
    policy = write_policy(tmp_path / "p")
    grpc_port, http_port = free_port(), free_port()
    proc = Process(
        "sidecar-env",
        [sys.executable, "-m", "authz_sidecar", "serve"],
        tmp_path,
        env={
            "AUTHZ_POLICY_DIR": str(policy),
            "AUTHZ_LISTEN": f"127.0.0.1:{grpc_port}",
            "AUTHZ_HTTP": f"127.0.0.1:{http_port}",
            "AUTHZ_REGION": "eu-west",
            "AUTHZ_SERVICE": "things",
            "AUTHZ_GRACE": "1",
        },
    )
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", proc)
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status").read())
        assert status["region"] == "eu-west" and status["service"] == "things"
        assert status["listen"] == f"127.0.0.1:{grpc_port}"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.popen.wait(timeout=15) == 0
        log = proc.log_path.read_text()
        assert '"event": "sidecar_stopping"' in log and '"event": "sidecar_stopped"' in log
    finally:
        proc.stop()


def test_logs_are_json_lines_with_sampled_decisions_mismatches_and_no_secrets(
    tmp_path: Path, issuer: DemoIssuer
) -> None:
    """--log-decisions 1 logs every decision; mismatches are always logged; no token in any line."""
    import grpc

    from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    policy = write_policy(tmp_path / "p", shadows=[shadow("v2")])
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    grpc_port, http_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "authz_sidecar", "serve", "--policy-dir", str(policy), "--service", "things",
        "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}", "--log-decisions", "1",
        "--jwks-file", str(jwks), "--jwt-issuers", issuer.issuer, "--jwt-audiences", "things", "--grace", "1",
    ]  # fmt: skip
    proc = Process("sidecar-logs", argv, tmp_path)
    token = issuer.token("bob")
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", proc)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for method in ("GET", "PUT"):  # GET: allowed, no mismatch; PUT: v1 denies, v2 would allow
                reply = stub.Check(request("/things/1", method, {"authorization": f"Bearer {token}"}), timeout=5)
                assert status_of(reply) == (200 if method == "GET" else 403)
    finally:
        proc.stop()
    text = proc.log_path.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "snapshot_swapped" in names and names.count("decision") == 2 and names.count("mismatch") == 1
    mismatch = next(e for e in events if e["event"] == "mismatch")
    assert mismatch["principal"] == "bob" and mismatch["observed"]["v2"]["decision"] == "allow"
    assert token not in text and token.split(".")[2] not in text


IMAGE_UID = 10001  # the user deploy/Dockerfile runs the sidecar as (it has no home directory)


def test_the_default_disk_copy_works_for_the_images_user(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Run as the image runs it: uid 10001, a HOME that does not exist, AUTHZ_STATE_DIR as the image
    sets it, no --cache-file. The disk copy of the last good snapshot lands in the state directory
    (before: it went to ~/.cache, which that user cannot create, and was never saved)."""
    import shutil
    import tempfile

    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path / "seed")
    # Outside pytest's tmp tree, which only root may enter.
    state = Path(tempfile.mkdtemp(prefix="authz-state-"))
    grpc_port, http_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "authz_sidecar", "serve", "--etcd", etcd.endpoints, "--prefix", prefix,
        "--service", "things", "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
        "--identity", "header", "--dev-principal-header", "x-user", "--grace", "0.5",
    ]  # fmt: skip
    if os.geteuid() == 0:  # become the image's user; as anyone else, this test already is not root
        os.chown(state, IMAGE_UID, IMAGE_UID)
        argv = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups", *argv]
    env = {"HOME": "/nonexistent/authz", "XDG_CACHE_HOME": "", "AUTHZ_STATE_DIR": str(state)}
    proc = Process("sidecar-state-dir", argv, tmp_path, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", proc)
        deadline = time.monotonic() + 15
        while not list(state.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        saved = list(state.glob("*.json"))
        assert [p.name for p in saved] == [f"things{prefix.replace('/', '_')}.json"], proc.log_tail()
        assert json.loads(saved[0].read_text())["prefix"] == prefix
        assert "disk_copy_not_saved" not in proc.log_path.read_text()
    finally:
        proc.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_the_image_creates_the_state_directory_for_its_user() -> None:
    """deploy/Dockerfile names a state directory in AUTHZ_STATE_DIR, creates it owned by the user it
    runs as, and switches to that user (the test above runs the sidecar that way)."""
    dockerfile = (Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile").read_text()
    env = [line.split("=", 1)[1].strip() for line in dockerfile.splitlines() if line.startswith("ENV AUTHZ_STATE_DIR=")]
    assert len(env) == 1, "the image sets AUTHZ_STATE_DIR once"
    state_dir = env[0]
    assert f"install -d -o authz -g authz -m 0700 {state_dir}" in dockerfile
    assert f"useradd --uid {IMAGE_UID} " in dockerfile and f"USER {IMAGE_UID}" in dockerfile
    assert dockerfile.index(f"USER {IMAGE_UID}") > dockerfile.index(state_dir)
