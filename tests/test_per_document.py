"""One bad document never blocks the others: each document is taken or refused on its own.

An invalid shadow is left out, an invalid active set or catalog keeps its last good version, and the
valid documents beside them keep updating. Every refusal shows in /status (``refused_documents``),
in ``authz_invalid_documents_total{kind}`` and in a ``document_invalid`` log event, through a real
policy directory and through a real etcd written around ``ctl``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.store import layout
from authz_sidecar.store.sources.files import write_atomically

from .helpers import (
    ACTIVE,
    CATALOG,
    RunningSidecar,
    ctl,
    decision,
    etcd_sidecar,
    raw_put,
    raw_set,
    scrape,
    seed,
    shadow,
    sidecar_settings,
    status,
    unique_prefix,
    wait_for,
    write_json,
    write_policy,
)

BILLING: dict[str, Any] = {
    "service": "billing",
    "permissions": [{"handle": "billing:pay", "description": "Pay"}],
    "routes": [],
}
# v1 with a role whose handle only the billing catalog has.
ACTIVE_WITH_BILLING: dict[str, Any] = {
    **ACTIVE,
    "roles": {**ACTIVE["roles"], "payer": ["billing:pay"]},
    "grants": [*ACTIVE["grants"], {"principal": "dave", "roles": ["payer"]}],
}


def bob_edits(version: str, base: dict[str, Any] = ACTIVE) -> dict[str, Any]:
    """`base` with bob as an editor, under another version."""
    grants = [g if g["principal"] != "bob" else {"principal": "bob", "roles": ["editor"]} for g in base["grants"]]
    return {**base, "version": version, "grants": grants}


def with_handle(doc: dict[str, Any], handle: str) -> dict[str, Any]:
    """`doc` whose editor role also carries `handle`."""
    doc = copy.deepcopy(doc)
    doc["roles"]["editor"] = [*doc["roles"]["editor"], handle]
    return doc


def refused(side: RunningSidecar) -> list[tuple[str, str]]:
    """(kind, document) of every refusal /status lists now."""
    return sorted((r["kind"], r["document"]) for r in status(side).get("refused_documents", []))


def invalid_counts(side: RunningSidecar) -> dict[str, float]:
    """authz_invalid_documents_total by kind, the kinds not seen yet (exported as 0) left out."""
    return {
        dict(labels)["kind"]: value
        for (name, labels), value in scrape(side).items()
        if name == "authz_invalid_documents_total" and value
    }


def invalid_events(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["kind"], e["document"], e["reason"]) for e in logs if e["event"] == "document_invalid"]


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def files_sidecar(policy: Path) -> RunningSidecar:
    return RunningSidecar(sidecar_settings(policy, identity=("header",), dev_principal_header="x-user"))


def put_yaml(path: Path, doc: dict[str, Any]) -> None:
    write_atomically(path, yaml.safe_dump(doc))


def test_files_an_invalid_shadow_never_blocks_a_new_shadow_or_a_corrected_active_set(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    policy = write_policy(tmp_path / "p")
    side = files_sidecar(policy)
    try:
        side.wait_ready()
        bad = policy / "shadows" / "v3.yaml"
        put_yaml(bad, with_handle(shadow("v3"), "things:fly"))  # no catalog has things:fly
        wait_for(lambda: status(side)["invalid_documents"] >= 1, what="the bad shadow refused")
        # While it sits there, a new valid shadow and a corrected active set arrive: both apply.
        put_yaml(policy / "shadows" / "v4.yaml", shadow("v4", testers=["qa-bot"]))
        put_yaml(policy / "active.yaml", bob_edits("v1b"))
        wait_for(lambda: status(side)["active_version"] == "v1b", what="the corrected active set")
        wait_for(lambda: [s["version"] for s in status(side)["shadows"]] == ["v4"], what="the new shadow")
        assert decision(side, "bob") == 200
        (entry,) = status(side)["refused_documents"]
        assert entry["kind"] == "shadow" and entry["document"] == str(bad) and "things:fly" in entry["reason"]
        # Counted and logged once, although the snapshot was rebuilt twice since.
        assert invalid_counts(side).get("shadow") == 1.0
        (event,) = invalid_events(logs)
        assert event[:2] == ("shadow", str(bad)) and "things:fly" in event[2]
        # Fixing it brings it in and clears the refusal.
        put_yaml(bad, shadow("v3"))
        wait_for(lambda: not refused(side), what="the refusal to clear")
        assert sorted(s["version"] for s in status(side)["shadows"]) == ["v3", "v4"]
    finally:
        side.close()


def test_files_an_invalid_active_set_or_catalog_keeps_its_last_good_version(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    policy = write_policy(tmp_path / "p", active=ACTIVE_WITH_BILLING)
    (policy / "catalogs").mkdir()
    billing = policy / "catalogs" / "billing.yaml"
    put_yaml(billing, BILLING)
    side = files_sidecar(policy)
    try:
        side.wait_ready()
        write_atomically(policy / "active.yaml", "version: v9\nroles: {viewer: ['things:*']}\ngrants: []\n")
        write_atomically(billing, "service: billing\npermissions: [{handle: Billing}]\n")
        write_atomically(policy / "catalog.yaml", "service: things\npermissions: 12\n")
        wait_for(lambda: len(refused(side)) == 3, what="three refusals")
        assert refused(side) == sorted(
            [
                ("active", str(policy / "active.yaml")),
                ("catalog", str(billing)),
                ("catalog", str(policy / "catalog.yaml")),
            ]
        )
        # Meanwhile a valid shadow granting billing:pay (known from billing's last good catalog) applies.
        payer = shadow("v2", testers=["bob"])
        payer["roles"] = {**payer["roles"], "payer": ["billing:pay"]}
        put_yaml(policy / "shadows" / "v2.yaml", payer)
        wait_for(lambda: [s["version"] for s in status(side)["shadows"]] == ["v2"], what="the shadow")
        st = status(side)
        assert st["active_version"] == "v1" and st["stale"] is False
        assert decision(side, "alice") == 200 and decision(side, "bob") == 403  # v1, routes of the last good catalog
        assert invalid_counts(side) == {"active": 1.0, "catalog": 2.0}
        assert sorted(e[:2] for e in invalid_events(logs)) == refused(side)
        write_policy(policy, active=ACTIVE_WITH_BILLING, shadows=[payer])
        put_yaml(billing, BILLING)
        wait_for(lambda: not refused(side), what="the refusals to clear")
        assert status(side)["last_error"] is None
    finally:
        side.close()


def test_files_shadows_that_no_longer_fit_are_left_out(tmp_path: Path) -> None:
    """A shadow whose handle left the catalog, and the one that pushes a region's weights over 100
    (in version order), are left out; the others stay live."""
    policy = write_policy(
        tmp_path / "p",
        shadows=[
            shadow("v2", weights={"us-east": 60}),
            shadow("v3", weights={"us-east": 50}),
            shadow("v4", weights={"us-east": 40}),
            with_handle(shadow("v5"), "things:delete"),
        ],
    )
    side = files_sidecar(policy)
    try:
        side.wait_ready()
        wait_for(lambda: len(refused(side)) == 1, what="the weight refusal")
        assert refused(side) == [("shadow", str(policy / "shadows" / "v3.yaml"))]
        assert "over 100" in status(side)["refused_documents"][0]["reason"]
        assert [s["version"] for s in status(side)["shadows"]] == ["v2", "v4", "v5"]
        # The catalog stops carrying things:delete: v5 no longer validates and leaves.
        smaller = {**CATALOG, "permissions": [p for p in CATALOG["permissions"] if p["handle"] != "things:delete"]}
        put_yaml(policy / "catalog.yaml", smaller)
        wait_for(lambda: len(refused(side)) == 2, what="v5 refused")
        v5 = [r for r in status(side)["refused_documents"] if r["document"].endswith("v5.yaml")]
        assert len(v5) == 1 and "things:delete" in v5[0]["reason"]
        assert [s["version"] for s in status(side)["shadows"]] == ["v2", "v4"]
    finally:
        side.close()


def test_files_an_unchanged_active_set_keeps_the_catalog_that_grants_its_handles(tmp_path: Path) -> None:
    """Dropping a handle the active set still grants is refused on the catalog's side, so the
    active set never loses the catalog its handles come from."""
    policy = write_policy(tmp_path / "p")
    side = files_sidecar(policy)
    try:
        side.wait_ready()
        smaller = {
            **CATALOG,
            "permissions": [p for p in CATALOG["permissions"] if p["handle"] != "things:edit"],
            "routes": [r for r in CATALOG["routes"] if r["permission"] != "things:edit"],
        }
        put_yaml(policy / "catalog.yaml", smaller)
        wait_for(lambda: refused(side) == [("catalog", str(policy / "catalog.yaml"))], what="the catalog refused")
        assert "things:edit" in status(side)["refused_documents"][0]["reason"]
        assert decision(side, "alice") == 200  # PUT /things/1 still maps to things:edit
    finally:
        side.close()


# --- etcd --------------------------------------------------------------------------------------


def rollout(**extra: Any) -> dict[str, Any]:
    return {"weights": {}, "testers": [], "state": "proposed", **extra}


def test_etcd_invalid_documents_are_refused_one_by_one(
    etcd: EtcdCluster, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    prefix = unique_prefix()
    lay = layout.Layout(prefix)
    ends = etcd.endpoints
    seed(ends, prefix, tmp_path, active=ACTIVE_WITH_BILLING, catalogs=[CATALOG, BILLING])
    side = etcd_sidecar(ends, prefix, tmp_path)
    try:
        side.wait_ready()
        # Around ctl: an invalid shadow (unknown handle) and a shadow pointer entry for a missing version.
        raw_set(ends, prefix, with_handle(shadow("v3"), "things:fly"))
        raw_put(ends, lay.shadows, _shadows({"v3": rollout(), "v8": rollout()}))
        wait_for(lambda: len(refused(side)) == 2, what="two refusals")
        assert refused(side) == [("pointer", lay.shadows), ("shadow", lay.head("v3"))]
        # While they sit there: a valid shadow through ctl, a corrected active set, a broken catalog.
        path = write_json(tmp_path / "v4.json", shadow("v4", testers=["qa-bot"]))
        assert ctl(ends, prefix, "propose", "--file", path, "--request-id", "CR-4", "--reason", "r") == 0
        raw_set(ends, prefix, bob_edits("v1b", ACTIVE_WITH_BILLING))
        raw_put(ends, lay.active, layout.encode_active("v1b"))
        raw_put(ends, lay.catalog("billing"), b'{"service": "billing", "permissions": "none"}')
        wait_for(lambda: status(side)["active_version"] == "v1b", what="the corrected active set")
        wait_for(lambda: [s["version"] for s in status(side)["shadows"]] == ["v4"], what="the valid shadow")
        wait_for(lambda: len(refused(side)) == 3, what="the catalog refused")
        assert refused(side) == [
            ("catalog", lay.catalog("billing")),
            ("pointer", lay.shadows),
            ("shadow", lay.head("v3")),
        ]
        assert decision(side, "bob") == 200
        assert invalid_counts(side) == {"catalog": 1.0, "pointer": 1.0, "shadow": 1.0}
        assert sorted(e[:2] for e in invalid_events(logs)) == refused(side)
        assert status(side)["stale"] is False
    finally:
        side.close()


def test_etcd_bad_pointers_keep_the_last_good_active_and_leave_shadows_out(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    lay = layout.Layout(prefix)
    ends = etcd.endpoints
    seed(ends, prefix, tmp_path)
    path = write_json(tmp_path / "v2.json", shadow("v2", testers=["bob"]))
    assert ctl(ends, prefix, "propose", "--file", path, "--request-id", "CR-2", "--reason", "r") == 0
    side = etcd_sidecar(ends, prefix, tmp_path)
    try:
        side.wait_ready()
        wait_for(lambda: [s["version"] for s in status(side)["shadows"]] == ["v2"], what="v2 live")
        raw_put(ends, lay.shadows, b"{not json")
        wait_for(lambda: refused(side) == [("pointer", lay.shadows)], what="the shadows pointer refused")
        assert status(side)["shadows"] == [] and status(side)["active_version"] == "v1"
        raw_put(ends, lay.active, layout.encode_active("v404"))
        raw_set(ends, prefix, shadow("v5", testers=["bob"]))
        raw_put(ends, lay.shadows, _shadows({"v5": rollout(testers=["bob"])}))
        wait_for(lambda: [s["version"] for s in status(side)["shadows"]] == ["v5"], what="v5 live")
        assert refused(side) == [("pointer", lay.active)]
        assert "v404" in status(side)["refused_documents"][0]["reason"]
        assert status(side)["active_version"] == "v1" and decision(side, "alice") == 200
    finally:
        side.close()


def _shadows(pointer: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps(pointer).encode()


def test_ctl_names_a_shadow_with_an_unknown_handle_a_shadow(
    etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    seed(etcd.endpoints, prefix, tmp_path)
    path = write_json(tmp_path / "v2.json", with_handle(shadow("v2"), "things:fly"))
    capsys.readouterr()
    assert ctl(etcd.endpoints, prefix, "propose", "--file", path, "--request-id", "CR", "--reason", "r") != 0
    err = capsys.readouterr().err
    assert "things:fly" in err and "active set" not in err and "shadow set v2" in err, err
