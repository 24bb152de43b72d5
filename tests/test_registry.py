"""Services register their own permissions at run time: on start, and through the Registry API."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import grpc
import pytest

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.v1 import registry_pb2, registry_pb2_grpc

from .helpers import ACTIVE, CATALOG, ctl, ctl_json, decision, etcd_sidecar, status, unique_prefix, wait_for, write_json


def registered(endpoints: str, prefix: str, *args: str) -> dict:  # type: ignore[type-arg]
    return ctl_json(endpoints, prefix, "registry", "get", *args)  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_registry_put_get_list_and_refusals(etcd: EtcdCluster, tmp_path: Path, model: str) -> None:
    prefix = unique_prefix()
    catalog = write_json(tmp_path / "catalog.json", CATALOG)
    other = write_json(tmp_path / "other.json", {"service": "billing", "permissions": [{"handle": "billing:pay"}]})
    assert ctl(etcd.endpoints, prefix, "registry", "put", "--file", other) == 0
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path, catalog=Path(catalog), server_model=model)
    try:
        wait_for(lambda: status(side)["registration"]["registered"], what="the registration")
        stub = registry_pb2_grpc.RegistryStub(side.channel)
        put = stub.PutPermission(
            registry_pb2.PutPermissionRequest(service="things", handle="things:archive", description="Archive"),
            timeout=10,
        )
        assert (put.service, put.handle) == ("things", "things:archive")
        got = stub.GetPermission(registry_pb2.GetPermissionRequest(handle="things:archive"), timeout=10)
        assert (got.service, got.handle, got.description) == ("things", "things:archive", "Archive")
        listed = stub.ListPermissions(registry_pb2.ListPermissionsRequest(service="things"), timeout=10)
        assert {p.handle for p in listed.permissions} == {p["handle"] for p in CATALOG["permissions"]} | {
            "things:archive"
        }
        assert len(stub.ListPermissions(registry_pb2.ListPermissionsRequest(), timeout=10).permissions) == 5
        refusals = [
            (registry_pb2.PutPermissionRequest(service="billing", handle="billing:refund"), "PERMISSION_DENIED"),
            (registry_pb2.PutPermissionRequest(service="things", handle="billing:pay"), "ALREADY_EXISTS"),
            (registry_pb2.PutPermissionRequest(service="things", handle="things:*"), "INVALID_ARGUMENT"),
        ]
        for request, code in refusals:
            with pytest.raises(grpc.RpcError) as err:
                stub.PutPermission(request, timeout=10)
            assert err.value.code().name == code
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPermission(registry_pb2.GetPermissionRequest(handle="things:nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # There is no Delete.
        delete = side.channel.unary_unary("/authz_sidecar.v1.Registry/DeletePermission", None, None)
        with pytest.raises(grpc.RpcError) as err:
            delete(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "billing:refund" not in str(registered(etcd.endpoints, prefix))
    finally:
        side.close()


def test_registration_waits_for_etcd_then_lands(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd")
    prefix = unique_prefix()
    catalog = write_json(tmp_path / "catalog.json", CATALOG)
    side = etcd_sidecar(cluster.endpoints, prefix, tmp_path, catalog=Path(catalog))
    try:
        wait_for(lambda: status(side)["registration"]["attempts"] >= 2, what="retries while etcd is down")
        assert decision(side, "alice") == 503 and not status(side)["ready"]
        cluster.start()
        wait_for(lambda: status(side)["registration"]["registered"], timeout=20, what="the retried registration")
        assert ctl(cluster.endpoints, prefix, "init", "--file", write_json(tmp_path / "a.json", _active())) == 0
        side.wait_ready(timeout=10)
        assert decision(side, "alice") == 200
        assert {p["handle"] for p in registered(cluster.endpoints, prefix)["permissions"]} >= {"things:view"}
    finally:
        side.close()
        cluster.stop()


def _active() -> dict:  # type: ignore[type-arg]

    return ACTIVE


def test_a_changed_catalog_reaches_every_sidecar_of_the_service(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    catalog = write_json(tmp_path / "catalog.json", CATALOG)
    assert ctl(etcd.endpoints, prefix, "registry", "put", "--file", catalog) == 0
    assert ctl(etcd.endpoints, prefix, "init", "--file", write_json(tmp_path / "a.json", _active())) == 0
    sides = [etcd_sidecar(etcd.endpoints, prefix, tmp_path / f"s{i}", catalog=Path(catalog)) for i in range(2)]
    try:
        for side in sides:
            side.wait_ready()
            assert decision(side, "bob", "GET", "/things/1/history") == 403  # unmapped route
        # The service ships a new route (and the permission it needs): one registration, both follow.
        changed = {
            **CATALOG,
            "routes": [
                *CATALOG["routes"],
                {"method": "GET", "path": "/things/{id}/history", "permission": "things:view"},
            ],
        }
        assert ctl(etcd.endpoints, prefix, "registry", "put", "--file", write_json(tmp_path / "c2.json", changed)) == 0
        for side in sides:
            wait_for(
                partial(lambda s: decision(s, "bob", "GET", "/things/1/history") == 200, side), what="the new route"
            )
    finally:
        for side in sides:
            side.close()


def _many(service: str, count: int, **extra: object) -> dict:  # type: ignore[type-arg]
    return {
        "service": service,
        "permissions": [{"handle": f"{service}:p{i}"} for i in range(count)],
        **extra,
    }


@pytest.mark.parametrize("model", ["aio", "threads"])
def test_registry_put_bounds_handles_descriptions_and_permissions(
    etcd: EtcdCluster, tmp_path: Path, model: str
) -> None:
    """Handles of at most 128 characters, descriptions of at most 512, at most 1000 permissions per
    service: beyond, PutPermission is refused and nothing is written."""
    prefix = unique_prefix()
    full = _many("things", 1000)
    assert ctl(etcd.endpoints, prefix, "registry", "put", "--file", write_json(tmp_path / "full.json", full)) == 0
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path, server_model=model)
    try:
        stub = registry_pb2_grpc.RegistryStub(side.channel)
        refusals = [
            (registry_pb2.PutPermissionRequest(service="things", handle="things:" + "a" * 130), "INVALID_ARGUMENT"),
            (
                registry_pb2.PutPermissionRequest(service="things", handle="things:p1", description="d" * 513),
                "INVALID_ARGUMENT",
            ),
            (registry_pb2.PutPermissionRequest(service="things", handle="things:one-more"), "RESOURCE_EXHAUSTED"),
        ]
        for request, code in refusals:
            with pytest.raises(grpc.RpcError) as err:
                stub.PutPermission(request, timeout=10)
            assert err.value.code().name == code, err.value.details()
        assert "1000" in (err.value.details() or "")
        # Describing a permission it already has is not a new one.
        stub.PutPermission(
            registry_pb2.PutPermissionRequest(service="things", handle="things:p1", description="d" * 512), timeout=10
        )
        handles = {p["handle"] for p in registered(etcd.endpoints, prefix, "--service", "things")["permissions"]}
        assert len(handles) == 1000 and "things:one-more" not in handles
    finally:
        side.close()


def test_ctl_registry_put_refuses_catalogs_over_the_bounds_before_writing(
    etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same bounds for catalog files, and a catalog too big for one etcd value (more than 1 MiB)
    is refused with a clear line before anything is sent."""
    prefix = unique_prefix()
    long_paths = _many(
        "things",
        1000,
        routes=[
            {"method": "GET", "path": f"/things/{i}/" + "a" * 1700, "permission": f"things:p{i}"} for i in range(1000)
        ],
    )
    many_routes = [{"method": "GET", "path": f"/t/{n}", "permission": "things:p0"} for n in range(1001)]
    cases = {
        "permissions": (_many("things", 1001), "at most 1000"),
        "routes": (
            _many("things", 1, routes=many_routes),
            "at most 1000",
        ),
        "description": (
            {"service": "things", "permissions": [{"handle": "things:view", "description": "d" * 513}]},
            "at most 512",
        ),
        "handle": ({"service": "things", "permissions": [{"handle": "things:" + "a" * 130}]}, "at most 128"),
        "size": (long_paths, "MiB"),
    }
    for name, (document, needle) in cases.items():
        capsys.readouterr()
        code = ctl(etcd.endpoints, prefix, "registry", "put", "--file", write_json(tmp_path / f"{name}.json", document))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1, name
        assert len(err) == 1 and needle in err[0], (name, err)
    capsys.readouterr()
    long_description = ["registry", "put", "--service", "things", "--handle", "things:view", "--description", "d" * 513]
    assert ctl(etcd.endpoints, prefix, *long_description) == 1
    assert "at most 512" in capsys.readouterr().err
    assert registered(etcd.endpoints, prefix)["permissions"] == []


def test_a_registration_over_the_bounds_is_refused_once_not_retried(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A sidecar whose catalog, merged with what etcd holds (permissions are never removed), would
    pass 1000 permissions says so in /status and stops trying: no retry can make it fit."""
    prefix = unique_prefix()
    assert (
        ctl(etcd.endpoints, prefix, "registry", "put", "--file", write_json(tmp_path / "f.json", _many("things", 999)))
        == 0
    )
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path, catalog=Path(write_json(tmp_path / "c.json", CATALOG)))
    try:
        wait_for(lambda: status(side)["registration"]["last_error"] is not None, what="the refusal")
        registration = status(side)["registration"]
        assert not registration["registered"] and "at most 1000" in registration["last_error"]
        time.sleep(0.5)
        assert status(side)["registration"]["attempts"] == 1
        assert len(registered(etcd.endpoints, prefix, "--service", "things")["permissions"]) == 999
    finally:
        side.close()
