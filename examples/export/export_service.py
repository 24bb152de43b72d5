"""An export service that asks the sidecar which blocks of a composite snapshot a user may export.

A snapshot is composed from blocks of several accounts (a volume cloned across tenants, say). Before
exporting it for a user, the service sends the export manifest to FilterManifest: each block is
judged by the user's grants in the block's *origin* account, not the snapshot's. Only the allowed
blocks are exported, and their checksums are verified on the way out; the refused ones are listed
with their account. The summary's ``complete`` tells a whole answer from one cut short.

Run it: ``.venv/bin/python examples/export/export_service.py``. It starts a real etcd and a real
sidecar on loopback (and a Unix socket for the service, a trusted caller), writes a catalog and a
permission set with ``ctl``, runs the export for alice, then stops everything.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from authz_sidecar.client import AuthzClient, Block, ManifestSummary, RefusedBlock
from authz_sidecar.local.standalone import sidecar_on_socket

CATALOG = {"service": "snapshots", "permissions": [{"handle": "snapshots:export", "description": "Export blocks"}]}
POLICY = {
    "version": "v1",
    "roles": {"exporter": ["snapshots:export"]},
    "grants": [
        {"principal": "alice", "roles": ["exporter"], "scope": "account:acme"},
        {"principal": "alice", "roles": ["exporter"], "scope": "account:globex"},
    ],
}


def compose() -> dict[str, bytes]:
    """A snapshot's blocks, by id: data from three accounts."""
    return {
        f"{account}-{i}": f"{account} block {i}".encode() * 64
        for account in ("acme", "globex", "initech")
        for i in range(4)
    }


def manifest(blocks: dict[str, bytes]) -> list[Block]:
    return [
        Block(
            block_id=block_id,
            origin_account=block_id.split("-")[0],
            origin_volume=f"vol-{block_id.split('-')[0]}",
            created_at=1_796_000_000,
            checksum=hashlib.sha256(data).hexdigest(),
        )
        for block_id, data in blocks.items()
    ]


def export(authz: AuthzClient, principal: str, blocks: dict[str, bytes]) -> int:
    exported: list[str] = []
    refused: list[RefusedBlock] = []
    summary: ManifestSummary | None = None
    listed = {b.block_id: b for b in manifest(blocks)}
    for item in authz.filter_manifest(listed.values(), action="export", principal=principal):
        if isinstance(item, Block):
            data = blocks[item.block_id]
            if hashlib.sha256(data).hexdigest() != listed[item.block_id].checksum:
                print(f"checksum mismatch on {item.block_id}: not exported", file=sys.stderr)
                return 1
            exported.append(item.block_id)
        elif isinstance(item, RefusedBlock):
            refused.append(item)
        else:
            summary = item
    if summary is None or not summary.complete:
        print("the answer was cut short: nothing is exported", file=sys.stderr)
        return 1
    print(f"export for {principal} (set {summary.version}, {summary.permission}):")
    print(f"  exported {len(exported)} blocks: {', '.join(sorted(exported))}")
    for account in sorted({r.origin_account for r in refused}):
        ids = sorted(r.block_id for r in refused if r.origin_account == account)
        print(f"  refused {len(ids)} blocks of account {account} ({refused[0].reason}): {', '.join(ids)}")
    return 0


def main() -> int:
    with (
        tempfile.TemporaryDirectory(prefix="authz-export-") as tmp,
        sidecar_on_socket(Path(tmp), CATALOG, POLICY) as (target, _etcd),
        AuthzClient(target, timeout=10) as authz,
    ):
        return export(authz, "alice", compose())


if __name__ == "__main__":
    sys.exit(main())
