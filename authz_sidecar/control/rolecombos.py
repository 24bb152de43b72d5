"""``ctl roles combos``: the role combinations a set's principals hold, how many hold each and how
many of those were active in recorded decisions, and the combinations that could be merged
(:mod:`authz_sidecar.model.combos`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from authz_sidecar.control.replay import decision_files, read_decisions
from authz_sidecar.errors import ConfigError
from authz_sidecar.model.combos import active_principals, combos, document
from authz_sidecar.store.policy import PolicyStore, StoreError


async def cmd_combos(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    if ns.limit < 1:
        raise ConfigError("--limit must be at least 1")
    version = ns.set or (await store.pointers()).active
    if version is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    paths = decision_files(ns.decisions) if ns.decisions else []
    started = time.perf_counter()
    permissions = await store.permission_set(version)
    active = active_principals(read_decisions(paths).decisions) if paths else frozenset()
    result = combos(permissions, active)
    return {
        **document(result, ns.limit),
        "principals": len({g.principal for g in permissions.grants}),
        "decision_files": [str(p) for p in paths],
        "active_principals": len(active) if paths else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def add_roles_commands(
    commands: Any,
    command: Callable[..., argparse.ArgumentParser],
    connection: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    roles = commands.add_parser("roles", help="the roles principals hold")
    connection(roles, True)
    roles_commands = roles.add_subparsers(dest="roles_command", required=True, metavar="COMMAND")
    verb = command(
        "combos",
        "every role combination held (per scope), its holders and handles, and the combinations that could merge",
        cmd_combos,
        roles_commands,
    )
    verb.add_argument("--set", default="", metavar="VERSION", help="a stored set (default: the active one)")
    verb.add_argument("--decisions", nargs="+", default=[], metavar="FILE", help="decision logs: who was active")
    verb.add_argument("--limit", type=int, default=50, help="combinations listed, the most held first")
