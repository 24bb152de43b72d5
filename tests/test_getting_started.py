"""docs/getting-started.md, run: every shell block under a ``<!-- run ... -->`` marker, in order.

What differs from a reader's machine, and only that, is substituted: free loopback ports for the
ones the page shows, ``localhost`` (resolved by Envoy's DNS, as a service name would be) for the
service's host, a JWKS served here for the identity provider's, and tokens minted for its issuer.
Everything else (the catalog, the generated Envoy config, etcd, the sidecar, Envoy, the controller,
the canary and its promotion) is the page's own commands on real processes.

A marker says how a block runs: ``run`` (must exit 0), ``run: background`` (left running, with
``ready when URL answers`` waited for), ``run: until the output contains "TEXT"`` (repeated).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_sidecar.local.processes import LOOPBACK, free_port, wait_for_http
from authz_sidecar.local.tokens import DemoIssuer

pytestmark = pytest.mark.envoy

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
ISSUER = "https://idp.example.com"
JWKS_URL = "https://idp.example.com/.well-known/jwks.json"
SERVICE = "notes.internal:8000"
# The page is written for bash, and its requests use curl (the test suite's install step brings it).
BASH = shutil.which("bash") or "/bin/bash"
_BLOCK = re.compile(r"<!-- (run[^>]*?) -->\s*\n```sh\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Block:
    how: str
    script: str


def blocks(text: str) -> list[Block]:
    return [Block(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def test_every_command_on_the_page_is_marked_to_run() -> None:
    """A shell block without a marker would be a command no test runs."""
    text = PAGE.read_text()
    assert len(re.findall(r"^```sh$", text, re.MULTILINE)) == len(blocks(text)) > 8


class _Jwks(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def jwks_server(issuer: DemoIssuer) -> Iterator[int]:
    import json

    handler = type("Jwks", (_Jwks,), {"body": json.dumps(issuer.jwks()).encode()})
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


class Page:
    """The page's processes: each background block is a session of its own, stopped by its pid."""

    def __init__(self, workdir: Path, env: dict[str, str], substitutions: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.substitutions = substitutions
        self.background: list[subprocess.Popen[bytes]] = []
        self.outputs: dict[str, str] = {}  # a foreground block's first line -> what it printed

    def script(self, block: Block) -> str:
        script = block.script
        for old, new in self.substitutions.items():
            script = script.replace(old, new)
        return script

    def run(self, block: Block) -> None:
        script = self.script(block)
        if block.how.startswith("run: background"):
            with (self.workdir / f"background-{len(self.background)}.log").open("wb") as log:
                self.background.append(
                    subprocess.Popen(
                        [BASH, "-c", script],
                        cwd=self.workdir,
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            ready = re.search(r"ready when (\S+) answers", block.how)
            if ready:
                url = ready.group(1)
                for old, new in self.substitutions.items():
                    url = url.replace(old, new)
                wait_for_http(url, timeout=60)
            return
        until = re.search(r'until the output contains "([^"]+)"', block.how)
        deadline = time.monotonic() + 150
        while True:
            done = subprocess.run(
                [BASH, "-euo", "pipefail", "-c", script],
                cwd=self.workdir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
            if until is None or until.group(1) in done.stdout:
                self.outputs[block.script.splitlines()[0]] = done.stdout
                return
            assert time.monotonic() < deadline, f"{script}\nnever printed {until.group(1)!r}:\n{done.stdout}"
            time.sleep(1)

    def stop(self) -> None:
        for process in reversed(self.background):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def test_the_getting_started_page_runs_from_the_catalog_to_a_promotion(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            pytest.fail("curl is missing; `make test-deps` installs it")
        pytest.skip("curl is not installed (make test-deps installs it): the page's requests cannot run")
    issuer = DemoIssuer(issuer=ISSUER)
    upstream_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "TOKEN_ANA": issuer.token("ana", audience="notes"),
        "TOKEN_BEN": issuer.token("ben", audience="notes"),
        "PYTHONUNBUFFERED": "1",
    }
    upstream = subprocess.Popen(
        [sys.executable, "-m", "authz_sidecar.local.upstream", "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    page: Page | None = None
    try:
        with jwks_server(issuer) as jwks_port:
            substitutions = {
                JWKS_URL: f"http://localhost:{jwks_port}/.well-known/jwks.json",
                SERVICE: f"localhost:{upstream_port}",
                **{f"127.0.0.1:{port}": f"127.0.0.1:{free_port()}" for port in (2379, 2380, 8080, 9901, 9191, 9464)},
            }
            page = Page(tmp_path, env, substitutions)
            for block in blocks(PAGE.read_text()):
                page.run(block)
            first_requests = next(out for first, out in page.outputs.items() if first.startswith("curl"))
            assert first_requests.splitlines()[0] == "200"
            assert '"permission":"notes:write"' in first_requests
            assert first_requests.splitlines()[-1] == "401"
            audit = page.outputs["authz-sidecar ctl audit --etcd 127.0.0.1:2379"]
            assert "promote" in audit, audit
    finally:
        if page is not None:
            page.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
