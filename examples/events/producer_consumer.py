"""Signed events for asynchronous work: a producer has the sidecar sign an event for a user; a
consumer, later, verifies it and checks the user's permission again at the moment it acts.

The story it prints:
1. bob may delete things; the producer signs "delete things/42" and "delete things/43" for him;
2. the consumer verifies the first, consuming it: valid and allowed, so it acts;
3. the first event is delivered again: refused as replayed, across every consumer;
4. the platform team revokes bob's role (ctl propose, ctl promote);
5. the consumer verifies the second: the signature is good, but bob no longer holds the
   permission in the set in force now, so it is refused at consume time.

Run it: ``.venv/bin/python examples/events/producer_consumer.py``. It starts a real etcd and a real
sidecar with a fresh Ed25519 key (the producer and consumer talk to it over its Unix socket, a
trusted caller), and stops everything at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from authz_sidecar.client import AuthzClient
from authz_sidecar.local.mesh import run_ctl
from authz_sidecar.local.standalone import sidecar_on_socket

CATALOG = {
    "service": "things",
    "permissions": [{"handle": "things:view"}, {"handle": "things:delete"}],
}
POLICY = {
    "version": "v1",
    "roles": {"viewer": ["things:view"], "deleter": ["things:view", "things:delete"]},
    "grants": [{"principal": "bob", "roles": ["deleter"]}, {"principal": "alice", "roles": ["viewer"]}],
}
REVOKE = {"changes": [{"principal": "bob", "revoke": ["deleter"], "grant": ["viewer"]}]}


def story(authz: AuthzClient, endpoints: str, work: Path) -> bool:
    first = authz.sign(b'{"delete": "things/42"}', "things:delete", principal="bob", ttl_seconds=600)
    second = authz.sign(b'{"delete": "things/43"}', "things:delete", principal="bob", ttl_seconds=600)
    print(f"signed {first.event_id} and {second.event_id} for {first.principal} (key {first.key_id})")

    acted = authz.verify_and_check(first)
    print(f"consumer, event 1: valid={acted.valid} allowed={acted.allowed} ({acted.reason}): deletes things/42")

    again = authz.verify_and_check(first)
    print(f"consumer, event 1 delivered again: valid={again.valid} ({again.reason}): refused")

    (work / "revoke.json").write_text(json.dumps(REVOKE))
    proposed = run_ctl(
        endpoints, "propose", "--file", str(work / "revoke.json"), "--request-id", "CR-9", "--reason", "bob leaves ops"
    )
    promoted = run_ctl(
        endpoints, "promote", proposed["proposed"], "--request-id", "CR-9-go", "--reason", "bob leaves ops"
    )
    # Read our own write: the sidecar answers only once it has applied the promotion.
    authz.check("things:view", principal="bob", at_least_revision=promoted["revision"])
    print(f"platform: bob's deleter role revoked, {promoted['active']} active at revision {promoted['revision']}")

    late = authz.verify_and_check(second)
    print(f"consumer, event 2: valid={late.valid} allowed={late.allowed} ({late.reason}): refused at consume time")
    return (
        (acted.valid, acted.allowed) == (True, True)
        and (late.valid, late.allowed, late.reason) == (True, False, "missing_permission")
        and (again.valid, again.reason) == (False, "replayed")
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="authz-events-") as tmp:
        work = Path(tmp)
        key = work / "event-key.pem"
        key.write_bytes(
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key.chmod(0o600)
        with (
            sidecar_on_socket(work, CATALOG, POLICY, extra=("--event-key", str(key))) as (target, etcd),
            AuthzClient(target, timeout=10, retries=20) as authz,
        ):
            ok = story(authz, etcd, work)
        print("as expected" if ok else "NOT as expected")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
