"""What the tests share: the demo documents, a sidecar running in a thread and reached over real
gRPC, requests as Envoy sends them, scrapes of /metrics and /status, and the helpers for the tests
that run a real etcd (seeding it through the real CLI, writing around it). Test modules import from
here, never from each other."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authz_sidecar import cli
from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from authz_sidecar.config import Settings
from authz_sidecar.server import Sidecar
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions

CATALOG: dict[str, Any] = {
    "service": "things",
    "permissions": [
        {"handle": "things:view", "description": "Read a thing"},
        {"handle": "things:edit", "description": "Change a thing"},
        {"handle": "things:delete", "description": "Delete a thing"},
    ],
    "routes": [
        {"method": "GET", "path": "/things", "permission": "things:view"},
        {"method": "GET", "path": "/things/{id}", "permission": "things:view"},
        {"method": "PUT", "path": "/things/{id}", "permission": "things:edit"},
        {
            "method": "GET",
            "path": "/accounts/{account}/things",
            "permission": "things:view",
            "scope": "account:{account}",
        },
    ],
}


# Roles for the lifecycle tests: an admin can also delete.
ROLES_WITH_ADMIN = {
    "viewer": ["things:view"],
    "editor": ["things:view", "things:edit"],
    "admin": ["things:view", "things:edit", "things:delete"],
}

ACTIVE: dict[str, Any] = {
    "version": "v1",
    "roles": {"viewer": ["things:view"], "editor": ["things:view", "things:edit"]},
    "grants": [
        {"principal": "alice", "roles": ["editor"]},
        {"principal": "bob", "roles": ["viewer"]},
        {"principal": "carol", "roles": ["editor"], "scope": "account:acme"},
        {"principal": "qa-bot", "roles": ["viewer"]},
    ],
}


def shadow(
    version: str,
    *,
    weights: dict[str, int] | None = None,
    testers: list[str] | None = None,
    grants: list[dict[str, Any]] | None = None,
    cohorts: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A shadow of ACTIVE in which bob is an editor, unless other grants are given."""
    doc: dict[str, Any] = {
        "version": version,
        "parent": "v1",
        "roles": ACTIVE["roles"],
        "grants": grants
        if grants is not None
        else [
            {"principal": "alice", "roles": ["editor"]},
            {"principal": "bob", "roles": ["editor"]},
            {"principal": "carol", "roles": ["editor"], "scope": "account:acme"},
            {"principal": "qa-bot", "roles": ["viewer"]},
        ],
    }
    if weights is not None:
        doc["weights"] = weights
    if testers is not None:
        doc["testers"] = testers
    if cohorts is not None:
        doc["cohorts"] = cohorts
    return doc


def write_policy(
    directory: Path,
    *,
    active: dict[str, Any] | None = None,
    shadows: list[dict[str, Any]] = (),  # type: ignore[assignment]
    catalog: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shadows").mkdir(exist_ok=True)
    (directory / "active.yaml").write_text(yaml.safe_dump(active or ACTIVE))
    (directory / "catalog.yaml").write_text(yaml.safe_dump(catalog or CATALOG))
    for old in (directory / "shadows").glob("*.yaml"):
        old.unlink()
    for doc in shadows:
        (directory / "shadows" / f"{doc['version']}.yaml").write_text(yaml.safe_dump(doc))
    return directory


class RunningSidecar:
    """A Sidecar on its own event loop in a thread, reachable over real gRPC on loopback."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.sidecar: Sidecar = self.call(self._make(settings))
        self.call(self.sidecar.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.sidecar.grpc_port}")

    async def _make(self, settings: Settings) -> Sidecar:
        return Sidecar(settings)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def wait_ready(self, timeout: float = 10) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.sidecar.store.snapshot is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no snapshot: {self.sidecar.store.last_error}")
            time.sleep(0.02)

    def close(self) -> None:
        self.channel.close()
        self.call(self.sidecar.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def sidecar_settings(policy: Path | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http": "127.0.0.1:0",
        "policy_dir": policy,
        "service": "things",
        "region": "us-east",
        "poll_interval": 0.05,
        "jwt_authn_payload_key": "jwt_payload",
        "grace": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


JWT_AUTHN = "envoy.filters.http.jwt_authn"


def request(
    path: str = "/things/1",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    sub: str | None = None,
    extensions: dict[str, str] | None = None,
    peer: str = "",
) -> pb.CheckRequest:
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.id = method, path, "req-1"
    http.headers.update(headers or {})
    if sub is not None:
        payload = Struct()
        payload.update({"jwt_payload": {"sub": sub, "iss": "x"}})
        req.attributes.metadata_context.filter_metadata[JWT_AUTHN].CopyFrom(payload)
    req.attributes.context_extensions.update(extensions or {})
    req.attributes.source.principal = peer
    return req


def check(side: RunningSidecar, req: pb.CheckRequest) -> pb.CheckResponse:
    return pb_grpc.AuthorizationStub(side.channel).Check(req, timeout=5)  # type: ignore[no-any-return]


def status_of(resp: pb.CheckResponse) -> int:
    return 200 if resp.HasField("ok_response") else int(resp.denied_response.status.code)


def headers_of(resp: pb.CheckResponse) -> dict[str, str]:
    options = resp.ok_response.headers if resp.HasField("ok_response") else resp.denied_response.headers
    return {h.header.key: h.header.value for h in options}


def scrape(side: RunningSidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{side.sidecar.http_port}/metrics").read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def status(side: RunningSidecar) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{side.sidecar.http_port}/status", timeout=5) as r:
        body = r.read()
    try:
        return json.loads(body)  # type: ignore[no-any-return]
    except ValueError:
        raise AssertionError(f"/status on port {side.sidecar.http_port} answered {body[:300]!r}") from None


def health(side: RunningSidecar) -> int:
    stub = health_pb2_grpc.HealthStub(side.channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}"


def ctl(endpoints: str, prefix: str, *args: str) -> int:
    """Run `authz-sidecar ctl ...` in this process, as an operator would from a shell."""
    return cli.main(["ctl", *args, "--etcd", endpoints, "--prefix", prefix, "--etcd-timeout", "3"])


def ctl_captured(endpoints: str, prefix: str, *args: str) -> tuple[int, str, str]:
    """`ctl ...` with its exit code, stdout and stderr (kept apart from the logs of sidecars here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ctl(endpoints, prefix, *args)
    return code, out.getvalue(), err.getvalue()


def ctl_json(endpoints: str, prefix: str, *args: str) -> Any:
    """`ctl ... --json`, its output parsed."""
    code, out, _err = ctl_captured(endpoints, prefix, *args, "--json")
    assert code == 0
    return json.loads(out)


def write_json(path: Path, data: dict[str, Any]) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def seed(
    endpoints: str,
    prefix: str,
    tmp: Path,
    *,
    active: dict[str, Any] | None = None,
    catalogs: list[dict[str, Any]] | None = None,
) -> None:
    """Catalogs (the test catalog by default) and an active set, written with the CLI."""
    tmp.mkdir(parents=True, exist_ok=True)
    for catalog in catalogs or [CATALOG]:
        path = write_json(tmp / f"catalog-{catalog['service']}.json", catalog)
        assert ctl(endpoints, prefix, "registry", "put", "--file", path) == 0
    assert ctl(endpoints, prefix, "init", "--file", write_json(tmp / "active.json", active or ACTIVE)) == 0


def raw_put(endpoints: str, key: str, value: bytes) -> None:
    """Write one key directly with the etcd client, around ctl and its checks."""

    async def put() -> None:
        async with Etcd(EtcdOptions(endpoints=tuple(endpoints.split(",")))) as client:
            await client.call(client.kv.put, key, value)

    asyncio.run(put())


def raw_set(endpoints: str, prefix: str, document: dict[str, Any]) -> None:
    """Store a set document under its version (chunk, then head) without ctl's checks; nothing
    points at it yet. A shadow's rollout fields are left out: in etcd they live in the pointer."""
    lay = layout.Layout(prefix)
    document = {k: v for k, v in document.items() if k not in ("weights", "testers", "state", "cohorts")}
    version = document["version"]
    keys = lay.set_keys(version, json.dumps(document).encode())
    head = keys.pop(lay.head(version))
    for key, chunk in keys.items():
        raw_put(endpoints, key, chunk)
    raw_put(endpoints, lay.head(version), head)


def etcd_sidecar(endpoints: str, prefix: str, tmp: Path, **overrides: Any) -> RunningSidecar:
    values: dict[str, Any] = {
        "policy_dir": None,
        "etcd": tuple(endpoints.split(",")),
        "prefix": prefix,
        "cache_file": str(tmp / "snapshot-cache.json"),
        "identity": ("header",),
        "dev_principal_header": "x-user",
        "etcd_liveness": 1.5,
        "etcd_timeout": 2.0,
    }
    values.update(overrides)
    return RunningSidecar(sidecar_settings(None, **values))


def decision(side: RunningSidecar, principal: str, method: str = "PUT", path: str = "/things/1") -> int:
    return status_of(check(side, request(path, method, headers={"x-user": principal})))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll until `predicate()`; return how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - started


def processes_of(workdir: Path) -> list[int]:
    """Pids of the processes whose command line names `workdir` or whose output goes to a log in
    it: every process a mesh (make run, the scenario) starts."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                output = os.readlink(entry / "fd" / "1")
            except OSError:
                continue
            if str(workdir) in cmdline or output.startswith(f"{workdir}/"):
                pids.append(int(entry.name))
    return pids
