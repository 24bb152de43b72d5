"""Selection: which set decides, exactly as DESIGN section 5 says, and stable across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.model.evaluation import evaluate
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import Selection, select, stable_bucket
from authz_sidecar.model.snapshot import Snapshot, build_snapshot

from .helpers import ACTIVE, CATALOG, shadow


def snap(*shadows: dict, region: str = "us-east") -> Snapshot:  # type: ignore[type-arg]
    return build_snapshot(
        parse_permission_set(ACTIVE, "active"),
        [parse_shadow(s, s["version"]) for s in shadows],
        [parse_catalog(CATALOG, "catalog")],
        service="things",
        region=region,
    )


def test_header_picks_a_live_shadow_for_a_tester() -> None:
    s = snap(shadow("v2", testers=["bob"]))
    enforced, how = select(s, "bob", "v2", "bob")
    assert (enforced.version, how) == ("v2", Selection.HEADER)


def test_header_for_non_tester_unknown_or_malformed_is_ignored() -> None:
    s = snap(shadow("v2", testers=["qa-bot"]))
    for principal, header in [
        ("bob", "v2"),
        ("qa-bot", "v9"),
        ("qa-bot", "../../etc"),
        ("qa-bot", ""),
        ("qa-bot", "\x00" * 5),
        ("qa-bot", "v" * 10_000),
    ]:
        enforced, how = select(s, principal, header, principal)
        assert (enforced.version, how) == ("v1", Selection.HEADER_IGNORED)


def test_shadow_without_testers_cannot_be_picked_by_header() -> None:
    """Picking by header is a tester's privilege: with no testers, nobody has it (canary still reaches it)."""
    s = snap(shadow("v2", weights={"us-east": 100}))
    for principal in ("anyone", "bob", "qa-bot"):
        enforced, how = select(s, principal, "v2", principal)
        assert (enforced.version, how) == ("v1", Selection.HEADER_IGNORED)
    assert select(s, "bob", None, "bob")[0].version == "v2"


def test_header_wins_over_canary_and_default_is_active() -> None:
    s = snap(shadow("v2", weights={"us-east": 100}), shadow("v3", testers=["bob"]))
    assert select(s, "bob", "v3", "bob")[1] is Selection.HEADER
    assert select(s, "bob", None, "bob")[0].version == "v2"
    assert select(snap(shadow("v2")), "bob", None, "bob")[1] is Selection.DEFAULT


def test_weight_applies_only_in_its_region() -> None:
    s = snap(shadow("v2", weights={"eu-west": 100}), region="us-east")
    assert select(s, "bob", None, "bob")[1] is Selection.DEFAULT
    s = snap(shadow("v2", weights={"eu-west": 100}), region="eu-west")
    assert select(s, "bob", None, "bob")[1] is Selection.CANARY


def test_ten_percent_canary_gets_ten_percent_of_ten_thousand_principals() -> None:
    s = snap(shadow("v2", weights={"us-east": 10}))
    picked = sum(select(s, f"user-{i}", None, f"user-{i}")[1] is Selection.CANARY for i in range(10_000))
    assert 900 <= picked <= 1100, picked


def test_raising_a_weight_only_adds_principals() -> None:
    """A principal in a 10% canary stays in it at 20%: users do not flip back and forth."""
    ten = {f"u{i}" for i in range(5000) if stable_bucket(f"u{i}", "v2") < 1000}
    twenty = {f"u{i}" for i in range(5000) if stable_bucket(f"u{i}", "v2") < 2000}
    assert ten < twenty


def test_same_principal_lands_in_same_set_in_two_processes() -> None:
    """The bucket does not depend on Python's per-process hash seed."""
    names = [f"principal-{i}" for i in range(200)]
    code = (
        "import json,sys\nfrom authz_sidecar.model.selection import stable_bucket\n"
        "print(json.dumps([stable_bucket(n, 'v2') for n in json.loads(sys.argv[1])]))"
    )
    runs = []
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(names)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1] == [stable_bucket(n, "v2") for n in names]


def test_observed_sets_and_mismatch_kinds() -> None:
    """Every other live set is evaluated; a disagreement inside the predicted impact is expected."""
    s = snap(shadow("v2", testers=["bob"]), shadow("v3", grants=[{"principal": "alice", "roles": ["viewer"]}]))
    ev = evaluate(s, "bob", "things:edit", None)
    assert ev.reason is Reason.MISSING_PERMISSION and ev.decided_by == "active"
    by_version = {o.version: o for o in ev.observed}
    assert by_version["v2"].allowed and by_version["v2"].mismatch and by_version["v2"].expected
    assert not by_version["v3"].mismatch
    assert ev.mismatch
    # Enforcing v2 by header: active is observed, and disagrees as v2's impact predicted.
    ev = evaluate(s, "bob", "things:edit", None, shadow_header="v2")
    assert ev.allowed and ev.decided_by == "shadow"
    assert [(o.version, o.allowed, o.expected) for o in ev.observed] == [("v1", False, True), ("v3", False, True)]
    # No mismatch when every set agrees.
    ev = evaluate(s, "alice", "things:view", None)
    assert ev.allowed and not ev.mismatch
