"""The file source reloads on change, and a bad file keeps its last good version (or is left out)
while the rest serves."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from authz_sidecar.store.sources.files import write_atomically

from .helpers import ACTIVE, RunningSidecar, shadow, sidecar_settings, write_policy


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def status(side: RunningSidecar) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{side.sidecar.http_port}/status").read()
    )
    return found


def test_reload_bad_file_and_recovery(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p")
    side = RunningSidecar(sidecar_settings(policy, dev_principal_header="x-u", identity=("header",)))
    try:
        side.wait_ready()
        store = side.sidecar.store
        assert store.snapshot is not None and store.snapshot.shadows == ()

        # A new shadow file appears: it becomes live.
        write_atomically(policy / "shadows" / "v2.yaml", yaml.safe_dump(shadow("v2")))
        wait_for(lambda: store.snapshot is not None and len(store.snapshot.shadows) == 1)

        # The active set changes: the new version serves.
        write_atomically(policy / "active.yaml", yaml.safe_dump({**ACTIVE, "version": "v1b"}))
        wait_for(lambda: store.snapshot is not None and store.snapshot.active_version == "v1b")
        good = store.snapshot

        # Each kind of bad document keeps its last good version serving (v1b and the same
        # catalogs) and shows up in /status and the counter.
        bad_docs = {
            "active.yaml": "roles: {viewer: [things:*]}\ngrants: []\nversion: v3\n",
            "catalog.yaml": "service: things\npermissions: [{handle: Things}]\n",
        }
        for count, (name, text) in enumerate(bad_docs.items(), start=1):
            before = (policy / name).read_text()
            write_atomically(policy / name, text)
            wait_for(lambda c=count: store.invalid_documents >= c)
            assert store.snapshot is not None and store.snapshot.active_version == "v1b"
            assert store.snapshot.catalogs == good.catalogs
            body = status(side)
            assert body["active_version"] == "v1b" and name in body["last_error"]
            write_atomically(policy / name, before)
        (policy / "shadows" / "v3.yaml").write_bytes(b"version: v3\nroles: {r: [\xff]}\n")
        wait_for(lambda: store.invalid_documents >= 3)
        assert "not UTF-8" in (store.last_error or "")
        snapshot = store.snapshot
        assert snapshot is not None and [v.version for v in snapshot.shadows] == ["v2"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{side.sidecar.http_port}/metrics").read().decode()
        for kind in ("active", "catalog", "shadow"):
            assert f'authz_invalid_documents_total{{kind="{kind}"}} 1.0' in metrics

        # Removing the bad file recovers; the error clears.
        (policy / "shadows" / "v3.yaml").unlink()
        wait_for(lambda: store.last_error is None)
        assert store.snapshot is not good and store.snapshot is not None
        assert store.snapshot.active_version == "v1b"
    finally:
        side.close()


def test_unchanged_sets_are_not_compiled_again(tmp_path: Path) -> None:
    """A change to one shadow recompiles that shadow only; the active set's compiled form is reused."""
    from authz_sidecar.store.sources.files import FilePolicySource

    policy = write_policy(tmp_path / "p", shadows=[shadow("v2"), shadow("v3")])
    source = FilePolicySource(policy, service="things")
    first = source.load()
    write_atomically(policy / "shadows" / "v3.yaml", yaml.safe_dump(shadow("v3", testers=["qa-bot"])))
    second = source.load()
    assert second.active is first.active
    assert second.by_version["v2"].compiled is first.by_version["v2"].compiled
    assert second.by_version["v2"].impact is first.by_version["v2"].impact
    assert second.by_version["v3"].compiled is not first.by_version["v3"].compiled
    assert second.by_version["v3"].rollout.testers == frozenset({"qa-bot"})
    # Changing the active set recompiles it and every impact against it.
    write_atomically(policy / "active.yaml", yaml.safe_dump({**ACTIVE, "version": "v1b"}))
    third = source.load()
    assert third.active is not second.active and third.active_version == "v1b"
    assert third.by_version["v2"].compiled is second.by_version["v2"].compiled
    assert third.by_version["v2"].impact is not second.by_version["v2"].impact
