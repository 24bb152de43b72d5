"""Helpers for the tests that run a real etcd: seed it through the real CLI, run a sidecar on it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authz_sidecar import cli
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions

from .conftest import ACTIVE, CATALOG, RunningSidecar, sidecar_settings
from .test_check_grpc import check, request, status_of


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}"


def ctl(endpoints: str, prefix: str, *args: str) -> int:
    """Run `authz-sidecar ctl ...` in this process, as an operator would from a shell."""
    return cli.main(["ctl", *args, "--etcd", endpoints, "--prefix", prefix, "--etcd-timeout", "3"])


def ctl_json(endpoints: str, prefix: str, *args: str) -> Any:
    """`ctl ... --json`, its output parsed (and kept apart from the logs of sidecars in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ctl(endpoints, prefix, *args, "--json") == 0
    return json.loads(out.getvalue())


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
    document = {k: v for k, v in document.items() if k not in ("weights", "testers", "state")}
    version = document["version"]
    head, chunks = layout.split(version, json.dumps(document).encode())
    for index, chunk in enumerate(chunks):
        raw_put(endpoints, lay.chunk(version, head.sha256, index), chunk)
    raw_put(endpoints, lay.head(version), head.encode())


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
