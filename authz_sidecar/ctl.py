"""``authz-sidecar ctl``: the control plane's commands over etcd.

Each command reads what it needs, checks it the way a sidecar would (a set that a sidecar would
refuse is refused here first), and writes with a compare, so concurrent operators never overwrite
each other. Output is a short human summary, or JSON with ``--json``; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from etcd3aio.errors import EtcdError

from authz_sidecar.assembly import check_handles
from authz_sidecar.documents import (
    Permission,
    PermissionSet,
    check_handle,
    dump_permission_set,
    load_document,
    parse_catalog,
    parse_permission_set,
    parse_shadow,
)
from authz_sidecar.engine import compile_set, declared, impact
from authz_sidecar.errors import AuthzError, DocumentError
from authz_sidecar.etcd import layout
from authz_sidecar.etcd.client import Etcd, EtcdOptions
from authz_sidecar.etcd.store import PolicyStore, StoreError

Command = Callable[[PolicyStore, argparse.Namespace], Awaitable[Any]]


def _read(path: str) -> Any:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise AuthzError(f"--file {path}: {exc.strerror}") from None
    return load_document(text, path)


async def _check_against_catalogs(store: PolicyStore, permissions: PermissionSet, kind: str = "active set") -> None:
    """Refuse a set a sidecar would refuse: every handle it grants must be in a registered catalog.
    `kind` names the set in the error ("active set", "shadow set")."""
    check_handles(permissions, await store.catalogs(), f"{kind} {permissions.version}")


async def cmd_init(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    permissions = parse_permission_set(_read(ns.file), ns.file)
    if not permissions.version:
        raise DocumentError("the set needs a version", document=ns.file, field="version")
    await _check_against_catalogs(store, permissions)
    await store.init(permissions, dump_permission_set(permissions))
    return {"active": permissions.version, "grants": len(permissions.grants)}


async def cmd_propose(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    shadow = parse_shadow(_read(ns.file), ns.file)
    pointers = await store.pointers()
    meta = replace(
        shadow.permissions.meta,
        request_id=ns.request_id,
        reason=ns.reason,
        author=ns.author or shadow.permissions.meta.author,
        parent=shadow.permissions.meta.parent or (pointers.active or ""),
    )
    permissions = replace(shadow.permissions, meta=meta)
    await _check_against_catalogs(store, permissions, "shadow set")
    await store.propose(permissions, dump_permission_set(permissions), shadow.rollout)
    return {
        "proposed": permissions.version,
        "parent": meta.parent,
        "request_id": meta.request_id,
        "weights": dict(shadow.rollout.weights),
        "testers": sorted(shadow.rollout.testers),
    }


def _weights(values: list[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for value in values:
        region, sep, percent = value.partition("=")
        if not sep or not region or not percent.strip().isdigit() or not 0 <= int(percent) <= 100:
            raise AuthzError(f"--weight {value!r}: expected REGION=PERCENT with a whole percent 0..100")
        weights[region.strip()] = int(percent)
    if not weights:
        raise AuthzError("give at least one --weight REGION=PERCENT")
    return weights


async def cmd_canary(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    rollout = await store.canary(ns.version, _weights(ns.weight))
    return {"version": ns.version, "weights": dict(rollout.weights), "state": rollout.state}


async def cmd_status(store: PolicyStore, _ns: argparse.Namespace) -> dict[str, Any]:
    pointers = await store.pointers()
    catalogs = await store.catalogs()
    revision, _ = await store.etcd.list_prefix(store.layout.active)
    return {
        "prefix": store.layout.prefix,
        "revision": revision,
        "active": pointers.active,
        "shadows": {v: layout.rollout_document(r) for v, r in sorted(pointers.shadows.items())},
        "catalogs": {c.service: {"permissions": len(c.permissions), "routes": len(c.routes)} for c in catalogs},
    }


async def cmd_report(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Sum every sidecar's report of a live shadow, and how much of its predicted impact was hit."""
    pointers = await store.pointers()
    pointers.shadow(ns.version)
    if pointers.active is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    _revision, kvs = await store.etcd.list_prefix(store.layout.reports(ns.version))
    reports = [json.loads(kv.value) for kv in kvs]
    mismatches: dict[str, int] = {}
    exercised: set[tuple[str, str, str | None]] = set()
    for report in reports:
        for kind, n in report.get("mismatches", {}).items():
            mismatches[kind] = mismatches.get(kind, 0) + n
        exercised.update((p, h, s) for p, h, s in report.get("exercised", []))
    active, shadow = [
        parse_permission_set(load_document(await store.document(v), v), v) for v in (pointers.active, ns.version)
    ]
    # Predicted from what the proposal declared it changes, as the sidecars predict it.
    predicted = impact(compile_set(active), compile_set(declared(active, shadow)))
    hit = exercised & predicted
    never = sorted({h for _p, h, _s in predicted} - {h for _p, h, _s in hit})
    return {
        "version": ns.version,
        "sidecars": sorted(r.get("sidecar", "?") for r in reports),
        "evaluations": sum(r.get("evaluations", 0) for r in reports),
        "mismatches": dict(sorted(mismatches.items())),
        "predicted_impact": len(predicted),
        "exercised": len(hit),
        "coverage": round(len(hit) / len(predicted), 4) if predicted else 1.0,
        "handles_never_exercised": never,
    }


async def cmd_registry_get(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    catalogs = [c for c in await store.catalogs() if not ns.service or c.service == ns.service]
    found = [
        {"service": c.service, "handle": p.handle, "description": p.description}
        for c in catalogs
        for p in c.permissions
        if not ns.handle or p.handle == ns.handle
    ]
    if ns.handle and not found:
        raise StoreError(f"permission {ns.handle!r} is not registered")
    return {"permissions": found}


async def cmd_registry_put(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    if ns.file:
        catalog = parse_catalog(_read(ns.file), ns.file)
        if ns.service and ns.service != catalog.service:
            raise AuthzError(f"--service {ns.service} but {ns.file} is the catalog of {catalog.service}")
        stored = await store.register_catalog(catalog)
    else:
        if not ns.service or not ns.handle:
            raise AuthzError("registry put needs --file CATALOG, or --service and --handle")
        handle = check_handle(ns.handle, "--handle", "handle")
        stored = await store.register_permission(ns.service, Permission(handle, ns.description or ""))
    return {"service": stored.service, "permissions": [p.handle for p in stored.permissions]}


def add_parser(
    sub: Any, add_flag: Callable[..., None], add_etcd_flags: Callable[[argparse.ArgumentParser], None]
) -> None:
    ctl = sub.add_parser("ctl", help="the control plane: change the sets in etcd")
    commands = ctl.add_subparsers(dest="ctl_command", required=True)

    def command(name: str, text: str, handler: Command, under: Any = commands) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = under.add_parser(name, help=text, description=text)
        add_flag(parser, "--etcd", text="comma-separated etcd endpoints")
        add_flag(parser, "--prefix", text="etcd key prefix")
        add_etcd_flags(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(handler=handler)
        return parser

    init = command("init", "make a set the first active set (only when none exists)", cmd_init)
    init.add_argument("--file", required=True, help="the set (YAML or JSON)")
    propose = command("propose", "store a shadow set beside the active one", cmd_propose)
    propose.add_argument("--file", required=True, help="the shadow set: roles, grants, weights, testers")
    propose.add_argument("--request-id", required=True, help="the change request this implements")
    propose.add_argument("--reason", required=True, help="why, in a sentence")
    propose.add_argument("--author", default="", help="who proposes it")
    canary = command("canary", "set a shadow's canary weight per region", cmd_canary)
    canary.add_argument("version")
    canary.add_argument("--weight", action="append", default=[], metavar="REGION=PERCENT", help="repeatable")
    command("status", "what is active and live", cmd_status)
    report = command("report", "a shadow's traffic over every sidecar: evaluations, mismatches, coverage", cmd_report)
    report.add_argument("version")
    registry = commands.add_parser("registry", help="the permission registry")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True)
    get = command("get", "show registered permissions", cmd_registry_get, registry_commands)
    get.add_argument("handle", nargs="?", default="", help="one handle (default: all)")
    get.add_argument("--service", default="", help="only this service's")
    put = command("put", "register permissions (never removes one)", cmd_registry_put, registry_commands)
    put.add_argument("--file", default="", help="a whole catalog (permissions and routes)")
    put.add_argument("--service", default="", help="the owning service")
    put.add_argument("--handle", default="", help="one permission handle")
    put.add_argument("--description", default="", help="what it allows")


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    for key, value in result.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        print(f"{key}: {text}")


def run(ns: argparse.Namespace, options: EtcdOptions) -> int:
    async def go() -> dict[str, Any]:
        async with Etcd(options.validate()) as etcd:
            try:
                result: dict[str, Any] = await ns.handler(PolicyStore(etcd, ns.prefix), ns)
                return result
            except EtcdError as exc:
                raise AuthzError(f"etcd at {etcd.endpoints}: {exc}") from None
            except grpc.aio.AioRpcError as exc:  # what etcd3aio does not map (e.g. auth required)
                raise AuthzError(f"etcd at {etcd.endpoints}: {exc.code().name}: {exc.details()}") from None
            except TimeoutError:
                raise AuthzError(f"etcd at {etcd.endpoints}: no answer within {options.timeout:g} s") from None

    try:
        result = asyncio.run(go())
    except ValueError as exc:  # a bad --prefix
        raise AuthzError(str(exc)) from None
    except StoreError as exc:
        raise AuthzError(str(exc)) from None
    _print(result, ns.json)
    return 0


__all__ = ["add_parser", "run"]
