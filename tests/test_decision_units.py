"""The decision path's parts alone, in process: identity sources and their order, token verification,
the decision memo, and the snapshot holder's staleness rules. (The same behaviour through real gRPC,
Envoy and etcd is pinned by the integration tests; these say which part owns each rule.)"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from google.protobuf.struct_pb2 import Struct

from authz_sidecar.decision.decider import Decider
from authz_sidecar.decision.identity import (
    JWT_AUTHN_NAMESPACE,
    Identifier,
    RequestIdentityInputs,
    build_identifier,
    check_sources,
    jwt_authn_source,
    mtls_source,
)
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.decision.tokens import KeySet, TokenVerifier
from authz_sidecar.documents import parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.errors import ConfigError, IdentityError
from authz_sidecar.local.tokens import DemoIssuer
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.snapshot import Snapshot, build_snapshot
from authz_sidecar.telemetry.metrics import Metrics

from .helpers import ACTIVE, CATALOG, shadow


def inputs(
    headers: dict[str, str] | None = None, payload: dict[str, Any] | None = None, peer: str = ""
) -> RequestIdentityInputs:
    metadata: dict[str, Any] = {}
    if payload is not None:
        struct = Struct()
        struct.update({"jwt_payload": payload})
        metadata[JWT_AUTHN_NAMESPACE] = struct
    return RequestIdentityInputs(headers or {}, metadata, peer)


def snapshot(*shadows: dict[str, Any]) -> Snapshot:
    return build_snapshot(
        parse_permission_set(ACTIVE, "active"),
        [parse_shadow(s, s["version"]) for s in shadows],
        [parse_catalog(CATALOG, "catalog")],
        service="things",
        region="us-east",
    )


# --- identity ----------------------------------------------------------------------------------


def test_the_first_source_with_a_credential_decides() -> None:
    """Sources run in the configured order; the first that finds a principal wins."""
    identify = build_identifier(["jwt_authn", "mtls", "header"], dev_header="x-user").identify
    assert identify(inputs({"x-user": "dev"}, {"sub": "alice"}, "spiffe://peer")) == "alice"
    assert identify(inputs({"x-user": "dev"}, None, "spiffe://peer")) == "spiffe://peer"
    assert identify(inputs({"x-user": "dev"})) == "dev"
    assert identify(inputs()) is None


def test_an_invalid_credential_never_falls_through_to_a_weaker_source() -> None:
    """A bearer token that fails verification denies, even though a dev header is present."""
    verifier = TokenVerifier(DemoIssuer().jwks())
    identify = build_identifier(["jwt", "header"], verifier=verifier, dev_header="x-user").identify
    forged = DemoIssuer().token("alice")  # signed with another key
    with pytest.raises(IdentityError):
        identify(inputs({"authorization": f"Bearer {forged}", "x-user": "mallory"}))


def test_unprintable_or_huge_principals_are_refused() -> None:
    identify = build_identifier(["mtls", "payload_header"]).identify
    with pytest.raises(IdentityError):
        identify(inputs(peer="spiffe://x\n"))
    with pytest.raises(IdentityError):
        identify(inputs(peer="p" * 513))
    payload = base64.urlsafe_b64encode(json.dumps({"sub": "bob\x00"}).encode()).decode().rstrip("=")
    with pytest.raises(IdentityError):
        identify(inputs({"x-jwt-payload": payload}))


def test_sources_and_their_prerequisites_are_checked_once() -> None:
    """One statement of what each source needs, used by the settings and by the identifier."""
    with pytest.raises(ConfigError, match="unknown source 'magic'"):
        check_sources(["magic"], has_keys=False, dev_header=None)
    with pytest.raises(ConfigError, match="--identity jwt needs"):
        build_identifier(["jwt"])
    with pytest.raises(ConfigError, match="--identity header needs"):
        build_identifier(["header"])
    check_sources(["jwt_authn", "mtls"], has_keys=False, dev_header=None)


def test_jwt_authn_metadata_as_bytes_is_read_once_per_distinct_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gRPC front hands the jwt_authn namespace over as the Struct's bytes: the principal is
    the one the Struct names, read from each distinct value once; bytes that are not a Struct, or a
    payload without the claim, deny every time (nothing invalid is kept)."""

    parsed: list[bytes] = []
    real = Struct.FromString

    def counted(raw: bytes) -> Struct:
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(Struct, "FromString", counted)
    identify = build_identifier(["jwt_authn"], jwt_authn_payload_key="jwt_payload").identify

    def raw_inputs(raw: bytes) -> RequestIdentityInputs:
        return RequestIdentityInputs({}, {JWT_AUTHN_NAMESPACE: raw}, "")

    alice = inputs(payload={"sub": "alice"}).filter_metadata[JWT_AUTHN_NAMESPACE].SerializeToString()
    assert [identify(raw_inputs(bytes(alice))) for _ in range(3)] == ["alice"] * 3
    assert parsed == [alice]
    no_claim = inputs(payload={"iss": "demo"}).filter_metadata[JWT_AUTHN_NAMESPACE].SerializeToString()
    for raw in (no_claim, no_claim, b"\xff\xff"):
        with pytest.raises(IdentityError):
            identify(raw_inputs(raw))
    assert parsed == [alice, no_claim, no_claim, b"\xff\xff"]
    assert identify(raw_inputs(Struct().SerializeToString())) is None  # no payload at all: not this source


# --- tokens ------------------------------------------------------------------------------------


def test_token_claims_are_verified() -> None:
    issuer = DemoIssuer()
    verifier = TokenVerifier(issuer.jwks(), issuers=[issuer.issuer], audiences=["things"])
    assert verifier.principal(issuer.token("alice")) == "alice"
    now = int(time.time())
    for bad in (
        issuer.token("alice", ttl=-3600),  # expired
        issuer.token("alice", audience="other"),
        issuer.token("alice", nbf=now + 3600),
        issuer.token("alice", iss="https://elsewhere"),
        issuer.sign({"sub": "alice", "iss": issuer.issuer, "aud": "things"}),  # no exp
    ):
        with pytest.raises(IdentityError):
            verifier.principal(bad)


def test_none_is_never_an_algorithm_and_tokens_wait_for_keys() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(DemoIssuer().jwks(), algorithms=["none"])
    verifier = TokenVerifier(waiting_for="--jwks-url http://127.0.0.1:1/jwks")
    with pytest.raises(IdentityError, match="no signing keys yet"):
        verifier.principal(DemoIssuer().token("alice"))
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", algorithm="none")
    verifier.install(KeySet.parse(DemoIssuer().jwks(), "jwks"))
    with pytest.raises(IdentityError):
        verifier.principal(unsigned)


def test_a_rotation_forgets_tokens_verified_with_the_old_keys() -> None:
    """Verified tokens are cached with their key set: installing a new set drops them."""
    old, new = DemoIssuer(kid="old"), DemoIssuer(kid="new")
    verifier = TokenVerifier(old.jwks())
    token = old.token("alice")
    assert verifier.principal(token) == "alice"
    verifier.install(KeySet.parse(new.jwks(), "jwks"))
    with pytest.raises(IdentityError):
        verifier.principal(token)
    assert verifier.principal(new.token("bob")) == "bob"


# --- the decision memo -------------------------------------------------------------------------


def decider(store: SnapshotStore, stickiness: str = "principal") -> Decider:
    return Decider(store, build_identifier(["header"], dev_header="x-user"), Metrics(store), stickiness=stickiness)


def test_answers_are_memoised_per_snapshot() -> None:
    """The same question on the same snapshot is answered once; a new snapshot starts afresh."""
    store = SnapshotStore()
    first = snapshot()
    store.install(first)
    decide = decider(store).decide
    a = decide("PUT", "/things/1", {"x-user": "alice"})
    assert decide("PUT", "/things/1", {"x-user": "alice"}) is a
    assert len(first.memo) == 1
    second = snapshot()
    store.install(second)
    b = decide("PUT", "/things/1", {"x-user": "alice"})
    assert b is not a and len(second.memo) == 1 and len(first.memo) == 1


def test_nothing_is_memoised_when_the_answer_depends_on_the_request_id() -> None:
    """With request-id stickiness and a live canary, two requests of one principal may differ."""
    store = SnapshotStore()
    live = snapshot(shadow("v2", weights={"us-east": 50}))
    store.install(live)
    decide = decider(store, stickiness="request_id").decide
    versions = set()
    for i in range(40):
        outcome = decide("PUT", "/things/1", {"x-user": "bob"}, request_id=f"r-{i}")
        assert outcome.evaluation is not None
        versions.add(outcome.evaluation.enforced.meta.version)
    assert versions == {"v1", "v2"} and live.memo == {}


def test_a_reused_evaluation_is_counted_without_working_out_its_labels_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting a decision is one increment under the labels worked out once per distinct
    evaluation; the families scraped are the sums."""
    from authz_sidecar.telemetry import metrics as metrics_module

    worked_out: list[object] = []
    real = metrics_module.tally_of

    def counted(evaluation: Any) -> Any:
        worked_out.append(evaluation)
        return real(evaluation)

    monkeypatch.setattr(metrics_module, "tally_of", counted)
    store = SnapshotStore()
    store.install(snapshot(shadow("v2")))
    metrics = Metrics(store)
    decide = Decider(store, build_identifier(["header"], dev_header="x-user"), metrics).decide
    for _ in range(5):
        decide("PUT", "/things/1", {"x-user": "alice"})
    decide("GET", "/things/1", {"x-user": "alice"})
    decide("GET", "/things/1", {})  # a refusal: counted by its reason
    assert len(worked_out) == 2
    decisions, observations, per_set, _mismatches = metrics.counts()
    allowed = sum(n for (by, answer, _sel, _reason), n in decisions.items() if by == "active" and answer == "allow")
    assert allowed == 6 and decisions[("none", "deny", "none", "no_identity")] == 1
    assert observations == {"v2": 6}
    assert sum(n for (kind, version, _a, enforced), n in per_set.items() if version == "v1" and enforced == "true") == 6


def test_counting_holds_no_set_of_a_replaced_snapshot() -> None:
    """The labels worked out per evaluation are kept for reuse, but an evaluation holds its compiled
    set: once a new snapshot is installed, nothing the metrics keep may hold the old one's sets (a
    replaced million-grant set is hundreds of MB)."""
    store = SnapshotStore()
    old = snapshot(shadow("v2"))
    store.install(old)
    metrics = Metrics(store)
    decide = Decider(store, build_identifier(["header"], dev_header="x-user"), metrics).decide
    outcome = decide("PUT", "/things/1", {"x-user": "alice"})
    assert outcome.evaluation is not None
    old_set = outcome.evaluation.enforced
    store.install(snapshot(shadow("v3")))
    kept = [
        entry
        for value in vars(metrics).values()
        if isinstance(value, dict)
        for entry in value.values()
        if isinstance(entry, tuple) and any(getattr(e, "enforced", None) is old_set for e in entry)
    ]
    assert kept == []


def test_a_check_asked_again_on_a_snapshot_is_answered_from_its_memo_and_still_counted() -> None:
    """With identity from jwt_authn's metadata as bytes (the gRPC front's view), a Check asked again
    on the same snapshot is neither identified, routed nor decided again, but is counted each time;
    what the answer depends on is all in the key, and a new snapshot starts afresh."""
    store = SnapshotStore()
    first = snapshot(shadow("v2"))
    store.install(first)
    metrics = Metrics(store)
    identified: list[object] = []
    jwt_authn = jwt_authn_source("jwt_payload", "sub")

    def counted(inputs: RequestIdentityInputs) -> str | None:
        identified.append(inputs)
        return jwt_authn(inputs)

    decide = Decider(store, Identifier([("jwt_authn", counted), ("mtls", mtls_source)]), metrics).decide

    def meta(sub: str) -> dict[str, Any]:
        struct = inputs(payload={"sub": sub}).filter_metadata[JWT_AUTHN_NAMESPACE]
        return {JWT_AUTHN_NAMESPACE: struct.SerializeToString()}

    alice = meta("alice")
    answers = [decide("PUT", "/things/1", {}, filter_metadata=alice) for _ in range(4)]
    assert all(a is answers[0] for a in answers) and answers[0].allowed
    assert len(identified) == 1
    decisions = metrics.counts()[0]
    assert sum(n for labels, n in decisions.items() if labels[0] == "active") == 4
    # Everything the answer depends on is in the key: each of these is decided anew.
    assert not decide("PUT", "/things/1", {}, filter_metadata=meta("bob")).allowed
    assert decide("GET", "/things/1", {}, filter_metadata=alice).allowed
    assert decide("PUT", "/things/1", {"x-authz-shadow-version": "v2"}, filter_metadata=alice).allowed
    assert decide("PUT", "/things/1", {}, filter_metadata=alice, extensions={"permission": "things:view"}).allowed
    assert len(identified) == 5
    assert sum(1 for key in first.memo if key[0] == "check") == 5
    second = snapshot(shadow("v2"))
    store.install(second)
    decide("PUT", "/things/1", {}, filter_metadata=alice)
    assert len(identified) == 6
    # Identity sources that read headers (a token verified here expires) never take this path.
    by_header = Decider(store, build_identifier(["header"], dev_header="x-user"), metrics).decide
    by_header("PUT", "/things/1", {"x-user": "bob"})
    assert sum(1 for key in second.memo if key[0] == "check") == 1


# --- staleness ---------------------------------------------------------------------------------


def test_a_silent_source_withholds_the_snapshot_and_a_word_from_it_restores_it() -> None:
    """Past --max-staleness every Check denies (no snapshot); the next word from the source serves
    the same snapshot again, and listeners hear both changes."""
    store = SnapshotStore()
    heard: list[bool] = []
    store.on_serving(heard.append)
    store.install(snapshot())
    store.heard()
    store.enforce_max_staleness(60.0)
    assert store.snapshot is not None
    time.sleep(0.05)
    store.enforce_max_staleness(0.01)
    assert store.snapshot is None and store.withheld is not None and store.status()["withheld_for_staleness"]
    assert decider(store).decide("GET", "/things/1", {"x-user": "alice"}).reason is Reason.NO_SNAPSHOT
    store.heard()
    assert store.snapshot is not None and heard == [False, True]


def test_a_disk_copy_is_served_marked_stale_until_the_source_confirms() -> None:
    store = SnapshotStore()
    store.install(snapshot(), stale=True)
    assert store.status()["stale"] is True
    store.install(snapshot())
    assert store.status()["stale"] is False
