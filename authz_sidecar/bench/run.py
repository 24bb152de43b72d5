"""The benchmark run: start each configuration, load it with h2load, and report ratios.

Every number in one report is measured in the same run on the same machine, so the ratios (the
sidecar against Envoy's floor, Envoy's RBAC filter and the bare Python servers) are what to read;
absolute numbers move with the machine. Nothing here asserts a time.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz_sidecar.bench import envoyconf, h2load
from authz_sidecar.local import envoy
from authz_sidecar.local.processes import LOOPBACK, Process, binary, free_port, wait_for_http, wait_for_port
from authz_sidecar.local.tokens import DemoIssuer

ALLOWED, DENIED = "alice", "mallory-viewer"
SHADOWS = ("v2", "v3", "v4")
CLK_TCK = os.sysconf("SC_CLK_TCK")


PRINCIPALS = 10_000
COHORT = [f"user-{i}" for i in range(10)]


def bench_policy(directory: Path, principals: int = PRINCIPALS) -> Path:
    """The product as it ships: an active set of `principals` principals and three live shadows,
    each with a cohort in this region, so every Check decides once and observes three times."""
    cohorts = {"bench": {"principals": COHORT, "role_sets": [["viewer", "editor"]]}}
    return _write_policy(directory, principals, SHADOWS, {"cohorts": cohorts})


def sized_policy(directory: Path, grants: int) -> Path:
    """An active set of `grants` grants and one live shadow of as many, observed beside it: the
    pair of rows that says whether the size of the sets shows in a Check."""
    return _write_policy(directory, grants, ("v2",), {})


def _write_policy(directory: Path, principals: int, shadows: tuple[str, ...], rollout: dict[str, Any]) -> Path:
    """A policy directory: the catalog, an active set v1 of `principals` grants and `shadows` of the
    same grants, each live with weight 0 here and `rollout`'s fields."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shadows").mkdir(exist_ok=True)
    (directory / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    grants = _grants(principals)
    # JSON (load_document reads text starting with '{' with the C parser): PyYAML would take seconds.
    (directory / "active.yaml").write_text(json.dumps({"version": "v1", "roles": ROLES, "grants": grants}))
    for version in shadows:
        doc = {"version": version, "parent": "v1", "roles": ROLES, "grants": grants, "weights": {"bench": 0}}
        (directory / "shadows" / f"{version}.yaml").write_text(json.dumps({**doc, **rollout}))
    return directory


CATALOG = {
    "service": "things",
    "permissions": [{"handle": "things:view"}, {"handle": "things:edit"}],
    "routes": [
        {"method": "GET", "path": "/things/{id}", "permission": "things:view"},
        {"method": "PUT", "path": "/things/{id}", "permission": "things:edit"},
    ],
}
ROLES = {"viewer": ["things:view"], "editor": ["things:view", "things:edit"]}


def _grants(principals: int) -> list[dict[str, Any]]:
    grants: list[dict[str, Any]] = [
        {"principal": ALLOWED, "roles": ["editor"]},
        {"principal": DENIED, "roles": ["viewer"]},
    ]
    grants += [{"principal": f"user-{i}", "roles": ["viewer"]} for i in range(max(principals - 2, 0))]
    return grants


def grpc_check_body(path: Path, principal: str = ALLOWED) -> Path:
    """One CheckRequest as Envoy sends it (jwt_authn's payload in the metadata, a route-table
    path), framed as one gRPC message: h2load's body for the rows that call Check directly."""
    from authz_sidecar.bench.direct import sample_request

    message = sample_request(principal).SerializeToString()
    path.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    return path


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Point:
    streams: int
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    statuses: dict[int, int]
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    baseline: str | None
    # The row whose server CPU per request this row's is compared with (the floor of Python gRPC).
    cpu_baseline: str | None = None
    points: list[Point] = field(default_factory=list)
    rounds: list[Point] = field(default_factory=list)


class Bench:
    def __init__(self, workdir: Path, seconds: float, streams: tuple[int, ...] = (1, 16)) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.streams = streams
        self.issuer = DemoIssuer()
        self.jwks = self.issuer.write_jwks(workdir / "jwks.json")
        self.policy = bench_policy(workdir / "policy")
        self.check_body = grpc_check_body(workdir / "check.grpc")
        self._sized: dict[int, Path] = {}
        self._logs = itertools.count(1)
        self.rows: list[Row] = []
        self.errors: list[str] = []

    # --- processes ---------------------------------------------------------------------------

    @contextmanager
    def envoy(self, kind: str, authz_port: int = 0, authz_http2: bool = False) -> Iterator[tuple[int, Process]]:
        listen, admin = free_port(), free_port()
        config = envoyconf.write(
            envoyconf.build(
                kind,
                listen=listen,
                admin=admin,
                jwks=self.jwks,
                authz_port=authz_port,
                principals=[ALLOWED, "bob", "carol"],
                authz_http2=authz_http2,
            ),
            self.workdir / f"envoy-{kind}.json",
        )
        proc = envoy.start(config, self.workdir, name=f"envoy-{kind}")
        try:
            wait_for_http(f"http://{LOOPBACK}:{admin}/ready", proc)
            yield listen, proc
        finally:
            proc.stop()

    @contextmanager
    def server(
        self,
        name: str,
        argv: list[str],
        port: int,
        ready_url: str | None = None,
        env: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[Process]:
        proc = Process(name, argv, self.workdir, env={"PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            if ready_url:
                wait_for_http(ready_url, proc, timeout=timeout or 20.0)
            else:
                wait_for_port(port, proc, timeout=timeout or 20.0)
            yield proc
        finally:
            proc.stop()

    def sidecar_argv(self, grpc_port: int, http_port: int, *extra: str, policy: Path | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "authz_sidecar",
            "serve",
            "--listen",
            f"{LOOPBACK}:{grpc_port}",
            "--http",
            f"{LOOPBACK}:{http_port}",
            "--policy-dir",
            str(policy or self.policy),
            "--service",
            "things",
            "--region",
            "bench",
            "--jwt-authn-payload-key",
            "jwt_payload",
            "--log-level",
            "warning",
            *extra,
        ]

    # --- measuring ---------------------------------------------------------------------------

    def measure(
        self,
        row: Row,
        url: str,
        processes: dict[str, Process],
        expect: int = 200,
        principal: str = ALLOWED,
        *,
        data: Path | None = None,
    ) -> None:
        """With `data`, a gRPC call straight to the server (no Envoy): h2load POSTs the framed
        CheckRequest in that file."""
        headers = {"authorization": f"Bearer {self.issuer.token(principal)}"}
        if data is not None:
            headers = {"content-type": "application/grpc", "te": "trailers"}
        for streams in self.streams:
            before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
            result = h2load.run(url, streams=streams, seconds=self.seconds, headers=headers, data=data)
            after = {name: cpu_seconds(p.pid) for name, p in processes.items()}
            cpu = {name: (after[name] - before[name]) / max(result.requests, 1) * 1e6 for name in processes}
            point = Point(streams, result.rps, result.p50_us, result.p99_us, result.requests, result.statuses, cpu)
            row.points.append(point)
            unexpected = {s: n for s, n in result.statuses.items() if s != expect}
            if unexpected or result.requests == 0:
                self.errors.append(f"{row.name} @{streams}: expected only {expect}, got {result.statuses}")

    def check_answers(self, row: Row, url: str) -> None:
        """Before loading a sidecar row: one allowed and one denied request must be answered as such."""
        import urllib.error
        import urllib.request

        for principal, want in ((ALLOWED, 200), (DENIED, 403)):
            req = urllib.request.Request(  # noqa: S310 - loopback
                url.replace("/things/1", "/things/1"),
                method="PUT" if principal == DENIED else "GET",
                headers={"authorization": f"Bearer {self.issuer.token(principal)}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as response:  # noqa: S310
                    got = response.status
            except urllib.error.HTTPError as err:
                got = err.code
            if got != want:
                self.errors.append(f"{row.name}: {principal} expected {want}, got {got}")

    def run(self, plan: list[tuple[Row, Callable[[Row], None]]], rounds: int) -> None:
        """Measure every row `rounds` times, interleaved, and keep each point's median round.

        Interleaving spreads a slow spell of the machine over all rows instead of one, and the
        median discards a single disturbed round; both make the ratios steadier than the rates.
        """
        for number in range(1, rounds + 1):
            for row, body in plan:
                print(f"  round {number}/{rounds}: {row.name} ...", flush=True)
                try:
                    body(row)
                except Exception as exc:  # a row that cannot run is reported, and fails the run
                    self.errors.append(f"{row.name}: {exc}")
        for row, _body in plan:
            row.rounds = row.points
            row.points = []
            for streams in sorted({p.streams for p in row.rounds}):
                measured = sorted((p for p in row.rounds if p.streams == streams), key=lambda p: p.rps)
                row.points.append(measured[len(measured) // 2])
            self.rows.append(row)

    # --- rows --------------------------------------------------------------------------------

    def row_envoy(self, kind: str) -> Callable[[Row], None]:
        def body(row: Row) -> None:
            with self.envoy(kind) as (listen, proxy):
                self.measure(row, f"http://{LOOPBACK}:{listen}/things/1", {"envoy": proxy})

        return body

    def row_bare(self, kind: str, envoy_kind: str) -> Callable[[Row], None]:
        def body(row: Row) -> None:
            port = free_port()
            argv = [sys.executable, "-m", "authz_sidecar.bench.baselines", kind, "--port", str(port)]
            with self.server(kind, argv, port) as server, self.envoy(envoy_kind, port) as (listen, proxy):
                self.measure(row, f"http://{LOOPBACK}:{listen}/things/1", {"envoy": proxy, "server": server})

        return body

    def row_nghttpd(self, row: Row) -> None:
        """A C HTTP/2 server as the HTTP authorization service: it answers 200 with a file for
        /things/1, so through Envoy it allows like the bare servers do, at C speed."""
        docroot = self.workdir / "htdocs"
        (docroot / "things").mkdir(parents=True, exist_ok=True)
        (docroot / "things" / "1").write_text("")
        port = free_port()
        argv = [nghttpd_binary(), "--no-tls", "-d", str(docroot), str(port)]
        with self.server("nghttpd", argv, port) as server, self.envoy("http", port, authz_http2=True) as (listen, px):
            self.measure(row, f"http://{LOOPBACK}:{listen}/things/1", {"envoy": px, "server": server})

    def row_sidecar_traced(self, ratio: float) -> Callable[[Row], None]:
        """The default sidecar with tracing on, sampling `ratio` of the requests (h2load sends no
        trace headers, so each Check is a root and the ratio sampler decides), exporting to a real
        OTLP/gRPC collector process. A row whose collector received no span failed."""

        def body(row: Row) -> None:
            port = free_port()
            argv = [sys.executable, "-m", "authz_sidecar.bench.collector", "--port", str(port)]
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{LOOPBACK}:{port}",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(ratio),
            }
            with self.server("collector", argv, port) as collector:
                self.row_sidecar("grpc", env=env)(row)
                collector.stop()
                received = collector.log_path.read_text()
            if "spans received: 0" in received or "spans received" not in received:
                self.errors.append(f"{row.name}: the collector received no spans ({received.strip()[-80:]})")

        return body

    def row_sidecar_decision_log(self) -> Callable[[Row], None]:
        """The default sidecar writing every decision to a decision log (serve --decision-log) at its
        default rotation. A row that wrote no line failed; lines lost to a full queue are said, not
        failed: they are the price the log pays so that no Check ever waits for it."""
        rounds = itertools.count(1)

        def body(row: Row) -> None:
            directory = self.workdir / f"decisions-{next(rounds)}"
            directory.mkdir()
            log = directory / "decisions.jsonl"
            counted: list[tuple[float, float]] = []

            def scrape(http_port: int) -> None:
                counted.append(logged_decisions(http_port))

            self.row_sidecar("grpc", "--decision-log", str(log), after=scrape)(row)
            files = list(directory.iterdir())
            written = sum(f.read_bytes().count(b"\n") for f in files)
            for file in files:
                file.unlink()
            directory.rmdir()
            decided, dropped = counted[0]
            print(
                f"    decision log: {written:,} lines for {decided:,.0f} decisions, {dropped:,.0f} dropped", flush=True
            )
            if written == 0:
                self.errors.append(f"{row.name}: the decision log has no line")

        return body

    def row_bare_direct(self, row: Row) -> None:
        """The floor called directly: h2load's gRPC calls straight at the bare threaded server."""
        port = free_port()
        argv = [sys.executable, "-m", "authz_sidecar.bench.baselines", "grpc-threads", "--port", str(port)]
        with self.server("grpc-threads-direct", argv, port) as server:
            self.check_direct(row, port)
            self.measure(row, direct_url(port), {"server": server}, data=self.check_body)

    def row_sidecar_direct(self, row: Row) -> None:
        """The sidecar with every feature (the bench policy, the decision log) called directly: the
        same CheckRequest Envoy would send, from h2load, with no Envoy between."""
        grpc_port, http_port = free_port(), free_port()
        argv = self.sidecar_argv(grpc_port, http_port, "--decision-log", str(self.decision_log_path()))
        with self.server("sidecar-direct", argv, grpc_port, f"http://{LOOPBACK}:{http_port}/readyz") as server:
            self.check_direct(row, grpc_port)
            self.measure(row, direct_url(grpc_port), {"server": server}, data=self.check_body)

    def row_sidecar_sized(self, grants: int) -> Callable[[Row], None]:
        """The sidecar through Envoy deciding with an active set and a shadow of `grants` grants each
        (sized_policy), the decision log on: the pair of rows that shows whether size is seen."""

        def body(row: Row) -> None:
            policy = self._sized.get(grants)
            if policy is None:
                policy = self._sized[grants] = sized_policy(self.workdir / f"policy-{grants}", grants)
            extra = ("--decision-log", str(self.decision_log_path()))
            self.row_sidecar("grpc", *extra, policy=policy, ready_timeout=300.0)(row)

        return body

    def decision_log_path(self) -> Path:
        """A new directory for one row's decision log (the files are removed with the workdir)."""
        directory = self.workdir / f"log-{next(self._logs)}"
        directory.mkdir()
        return directory / "decisions.jsonl"

    def check_direct(self, row: Row, port: int) -> None:
        """Before loading a row called directly: the framed request must be answered with an allow."""
        import grpc

        from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb

        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            call = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check", None, None)
            answer = pb.CheckResponse.FromString(call(self.check_body.read_bytes()[5:], timeout=10))
        if answer.status.code != 0:
            self.errors.append(f"{row.name}: the direct Check did not allow ({answer.status})")

    def row_sidecar(
        self,
        envoy_kind: str,
        *extra: str,
        env: dict[str, str] | None = None,
        after: Callable[[int], None] | None = None,
        policy: Path | None = None,
        ready_timeout: float | None = None,
    ) -> Callable[[Row], None]:
        """`after(http_port)` runs once the row is measured, before the sidecar stops."""

        def body(row: Row) -> None:
            grpc_port, http_port, authz_http = free_port(), free_port(), free_port()
            argv = self.sidecar_argv(grpc_port, http_port, *extra, policy=policy)
            port = grpc_port
            if envoy_kind == "http":
                argv += ["--http-authz", f"{LOOPBACK}:{authz_http}", "--identity", "jwt_authn,payload_header"]
                port = authz_http
            ready = f"http://{LOOPBACK}:{http_port}/readyz"
            with (
                self.server("sidecar", argv, port, ready, env, timeout=ready_timeout) as server,
                self.envoy(envoy_kind, port) as (listen, proxy),
            ):
                url = f"http://{LOOPBACK}:{listen}/things/1"
                self.check_answers(row, url)
                self.measure(row, url, {"envoy": proxy, "server": server})
                if after is not None:
                    after(http_port)

        return body

    def row_direct(self, row: Row) -> None:
        """Check called in-process: the sidecar's own cost per decision, without gRPC or Envoy."""
        from authz_sidecar.bench.direct import direct_check_rate

        rps, p50, p99, n = direct_check_rate(self.policy, self.seconds, ALLOWED)
        row.points.append(Point(1, rps, p50, p99, n, {200: n}))


def direct_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}/envoy.service.auth.v3.Authorization/Check"


def logged_decisions(http_port: int) -> tuple[float, float]:
    """A running sidecar's decisions made with a set (the ones the decision log writes) and
    authz_decision_log_dropped_total, every reason summed."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    decided = dropped = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "authz_decisions_total" and sample.labels.get("decided_by") != "none":
                decided += sample.value
            elif sample.name == "authz_decision_log_dropped_total":
                dropped += sample.value
    return decided, dropped


def nghttpd_binary() -> str:
    import shutil

    for candidate in (shutil.which("nghttpd"), "/usr/sbin/nghttpd"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("nghttpd not found: install Debian's nghttp2-server (make bench-deps does, as root)")


def _version_of(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    return (done.stdout or done.stderr).strip()


def machine_facts() -> dict[str, Any]:
    import grpc

    cpu = ""
    with suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "envoy": _version_of([binary("envoy"), "--version"]).rsplit(":", 1)[-1].strip(),
        "h2load": _version_of([h2load.find(), "--version"]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def to_json(bench: Bench, facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": facts,
        "seconds_per_point": bench.seconds,
        "rows": [asdict(r) for r in bench.rows],
        "errors": bench.errors,
    }
