"""Values that reach headers, logs and metric labels are clean: no control characters, no trailing newline.

Versions become x-authz-set-version and metric labels; handles, roles, scopes and principals reach
logs and response bodies. A pattern anchored with ``$`` matches before a final newline, so ``v2\\n``
used to pass; every name is now matched whole. Checked on the parsers, through ``ctl`` and with
documents written straight into etcd around ctl.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.errors import DocumentError
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.store import layout

from .helpers import (
    ACTIVE,
    CATALOG,
    ctl,
    decision,
    etcd_sidecar,
    raw_put,
    raw_set,
    seed,
    shadow,
    status,
    unique_prefix,
    wait_for,
    write_json,
)

DIRTY = ["\n", "\r\n", "\x00", "\x1b[31m", "\x7f", "\t"]


def _with_role(role: str) -> dict[str, Any]:
    return {**ACTIVE, "roles": {**ACTIVE["roles"], role: ["things:view"]}}


def _with_grant(principal: str) -> dict[str, Any]:
    return {**ACTIVE, "grants": [*ACTIVE["grants"], {"principal": principal, "roles": ["viewer"]}]}


def _with_scope(scope: str) -> dict[str, Any]:
    return {**ACTIVE, "grants": [*ACTIVE["grants"], {"principal": "zed", "roles": ["viewer"], "scope": scope}]}


def _with_handle(handle: str) -> dict[str, Any]:
    return {**ACTIVE, "roles": {**ACTIVE["roles"], "viewer": ["things:view", handle]}}


@pytest.mark.parametrize("dirt", DIRTY)
@pytest.mark.parametrize(
    ("what", "make"),
    [
        ("version", lambda d: ("set", {**ACTIVE, "version": f"v1{d}"})),
        ("role", lambda d: ("set", _with_role(f"auditor{d}"))),
        ("principal", lambda d: ("set", _with_grant(f"zed{d}"))),
        ("scope", lambda d: ("set", _with_scope(f"account:acme{d}"))),
        ("handle", lambda d: ("set", _with_handle(f"things:view{d}"))),
        ("tester", lambda d: ("shadow", shadow("v2", testers=[f"qa-bot{d}"]))),
        ("region", lambda d: ("shadow", shadow("v2", weights={f"us-east{d}": 5}))),
        ("service", lambda d: ("catalog", {**CATALOG, "service": f"things{d}"})),
        (
            "route path",
            lambda d: (
                "catalog",
                {**CATALOG, "routes": [{"method": "GET", "path": f"/things{d}", "permission": "things:view"}]},
            ),
        ),
    ],
)
def test_control_characters_and_trailing_newlines_are_refused(what: str, make: Any, dirt: str) -> None:
    """Each kind of name, with each kind of dirt at its end, is refused with a DocumentError."""
    kind, document = make(dirt)
    parsers: dict[str, Callable[[Any, str], object]] = {
        "set": parse_permission_set,
        "shadow": parse_shadow,
        "catalog": parse_catalog,
    }
    with pytest.raises(DocumentError):
        parsers[kind](document, what)


def test_ctl_refuses_a_version_with_a_trailing_newline(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Through ctl, an operator's file with "v2\\n" is refused and nothing is written."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    bad = write_json(tmp_path / "v2.json", shadow("v2\n", testers=["qa-bot"]))
    assert ctl(etcd.endpoints, prefix, "propose", "--file", bad, "--request-id", "CR-9", "--reason", "t") != 0
    bad_active = write_json(tmp_path / "active.json", {**ACTIVE, "version": "v0\n"})
    prefix2 = unique_prefix()
    assert ctl(etcd.endpoints, prefix2, "init", "--file", bad_active) != 0


def test_dirty_names_written_into_etcd_around_ctl_never_go_live(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A shadow stored as "v2\\n" and a pointer naming it never become live; v1 keeps deciding."""
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    side = etcd_sidecar(etcd.endpoints, prefix, tmp_path)
    try:
        side.wait_ready()
        version = "v2\n"
        raw_set(etcd.endpoints, prefix, {**shadow(version), "version": version})
        rollout = {"weights": {"us-east": 100}, "testers": [], "state": "canary"}
        raw_put(etcd.endpoints, layout.Layout(prefix).shadows, json.dumps({version: rollout}).encode())
        wait_for(lambda: status(side)["invalid_documents"] >= 1, what="the dirty version to be refused")
        st = status(side)
        assert [s["version"] for s in st["shadows"]] == []
        assert decision(side, "bob") == 403  # v1 decides: bob is a viewer there
    finally:
        side.close()
