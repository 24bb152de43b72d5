"""The etcd policy source: list once, watch from the next revision, list again when it must.

The loop, and why each step is there:

1. List every key under the prefix in one linearizable range; remember the revision it was read at.
2. Watch the prefix from that revision + 1, so no write between the list and the watch is missed.
   The stream asks etcd for progress every ``liveness / 3`` and requires a leader; a stream that
   goes quiet for ``liveness`` seconds, ends, or loses its leader is reopened from the last revision
   seen (resume, not relist: nothing is read twice and nothing is skipped).
3. If that revision has been compacted away, list again: a watch that silently skipped ahead could
   miss a pointer flip.
4. After every change that touches what the snapshot is built from, build a new snapshot from the
   mirrored keys off the event loop, validate it whole, and only then swap it in. A bad document,
   a pointer to a missing version, a missing chunk or bytes that are not UTF-8 leave the last good
   snapshot serving and are reported.
5. Keep the keys of the last good snapshot in a file, so a sidecar restarted while etcd is
   unreachable serves that (marked stale) instead of denying everything.

Parsed documents are cached by version and digest (versions are immutable), and compiled sets by
document, so a canary weight change rebuilds in microseconds even with a million grants.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.documents import (
    Catalog,
    PermissionSet,
    ShadowSet,
    load_document,
    parse_catalog,
    parse_permission_set,
)
from authz_sidecar.errors import DocumentError
from authz_sidecar.etcd import layout
from authz_sidecar.etcd.client import Change, CompactedError, Etcd, EtcdOptions, WatchLostError
from authz_sidecar.etcd.layout import Layout
from authz_sidecar.snapshot import CompileCache, Snapshot, build_snapshot, paused_gc
from authz_sidecar.sources.files import write_atomically
from authz_sidecar.state import SnapshotStore

log = structlog.get_logger("authz_sidecar.sources.etcd")

CACHE_FORMAT = 1


class SnapshotBuilder:
    """Builds a snapshot from the mirrored keys of one prefix. Runs in a worker thread; keeps the
    parsed documents and compiled sets of the last build for the next."""

    def __init__(self, layout: Layout, *, service: str, region: str, source: str) -> None:
        self.layout = layout
        self.service = service
        self.region = region
        self.source = source
        # (version, digest) -> the parsed set and the chunk values it was parsed from.
        self._sets: dict[tuple[str, str], tuple[PermissionSet, tuple[bytes, ...]]] = {}
        self._catalogs: dict[bytes, Catalog] = {}
        self._compiled = CompileCache()

    def referenced(self, kv: Mapping[str, bytes]) -> set[str]:
        """The versions the pointers name (what a change must touch to need a rebuild)."""
        versions: set[str] = set()
        with contextlib.suppress(DocumentError):
            active = kv.get(self.layout.active)
            if active is not None:
                versions.add(layout.decode_active(active, self.layout.active))
        with contextlib.suppress(DocumentError):
            shadows = kv.get(self.layout.shadows)
            if shadows is not None:
                versions.update(layout.decode_shadows(shadows, self.layout.shadows))
        return versions

    def _set(self, kv: Mapping[str, bytes], version: str, used: set[str]) -> PermissionSet:
        head, parts = layout.chunks_of(kv, self.layout, version)
        head_key = self.layout.head(version)
        used.add(head_key)
        used.update(self.layout.chunk(version, head.sha256, i) for i in range(head.chunks))
        # When every chunk is the one parsed last time, the set is too: neither joining nor hashing
        # megabytes again is needed, so a weight change rebuilds without touching the sets. (The
        # mirror keeps an unchanged value as the same bytes object, and comparing tuples of the
        # same objects takes the identity shortcut.)
        cached = self._sets.get((version, head.sha256))
        if cached is not None and cached[1] == tuple(parts):
            return cached[0]
        document = layout.joined(head, parts, self.layout)
        permissions = parse_permission_set(load_document(document, head_key), head_key)
        if permissions.version != version:
            raise DocumentError(
                f"document says version {permissions.version!r} but is stored as {version!r}",
                document=head_key,
                field="version",
                value=permissions.version,
            )
        self._sets[(version, head.sha256)] = (permissions, tuple(parts))
        return permissions

    def build(self, kv: Mapping[str, bytes], revision: int) -> tuple[Snapshot, dict[str, bytes]]:
        """The snapshot, and the keys it was built from (what the disk copy keeps)."""
        with paused_gc():
            return self._build(kv, revision)

    def _build(self, kv: Mapping[str, bytes], revision: int) -> tuple[Snapshot, dict[str, bytes]]:
        used: set[str] = set()
        active_value = kv.get(self.layout.active)
        if active_value is None:
            raise DocumentError(
                "no active set in etcd yet (run 'authz-sidecar ctl init --file SET')", document=self.layout.active
            )
        used.add(self.layout.active)
        active = self._set(kv, layout.decode_active(active_value, self.layout.active), used)
        shadows: list[ShadowSet] = []
        shadows_value = kv.get(self.layout.shadows)
        if shadows_value is not None:
            used.add(self.layout.shadows)
            for version, rollout in layout.decode_shadows(shadows_value, self.layout.shadows).items():
                shadows.append(ShadowSet(permissions=self._set(kv, version, used), rollout=rollout))
        catalogs: list[Catalog] = []
        catalog_cache: dict[bytes, Catalog] = {}
        for key in sorted(k for k in kv if k.startswith(self.layout.catalogs)):
            value = kv[key]
            catalog = self._catalogs.get(value) or parse_catalog(load_document(value, key), key)
            if catalog.service != key.removeprefix(self.layout.catalogs):
                raise DocumentError(f"catalog of {catalog.service!r} stored under {key}", document=key, field="service")
            catalog_cache[value] = catalog
            catalogs.append(catalog)
            used.add(key)
        if not catalogs:
            raise DocumentError("no catalog registered in etcd yet", document=self.layout.catalogs)
        snapshot = build_snapshot(
            active,
            shadows,
            catalogs,
            service=self.service,
            region=self.region,
            revision=revision,
            source=self.source,
            cache=self._compiled,
        )
        # Only what this snapshot uses is kept for the next build.
        self._catalogs = catalog_cache
        live = [active, *(s.permissions for s in shadows)]
        self._sets = {k: v for k, v in self._sets.items() if any(v[0] is p for p in live)}
        self._compiled.retain(live)
        return snapshot, {k: kv[k] for k in sorted(used)}


class DiskCopy:
    """The keys of the last good snapshot, in one JSON file replaced atomically."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix

    def save(self, kv: Mapping[str, bytes], revision: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": CACHE_FORMAT,
            "prefix": self.prefix,
            "revision": revision,
            "saved_at": time.time(),
            "kvs": {k: base64.b64encode(v).decode() for k, v in kv.items()},
        }
        write_atomically(self.path, json.dumps(data))

    def load(self) -> tuple[dict[str, bytes], int] | None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != CACHE_FORMAT or data.get("prefix") != self.prefix:
                return None
            return {k: base64.b64decode(v) for k, v in data["kvs"].items()}, int(data["revision"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("disk_copy_unreadable", path=str(self.path), error=str(exc))
            return None


class EtcdPolicySource:
    def __init__(
        self,
        options: EtcdOptions,
        *,
        prefix: str = layout.DEFAULT_PREFIX,
        service: str = "",
        region: str = "",
        cache_file: Path | None = None,
        liveness: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.options = options
        self.layout = Layout(layout.normalise_prefix(prefix))
        self.liveness = liveness
        self.max_backoff = max_backoff
        self.builder = SnapshotBuilder(self.layout, service=service, region=region, source=self.describe())
        self.disk = DiskCopy(cache_file, self.layout.prefix) if cache_file is not None else None
        self.kv: dict[str, bytes] = {}
        self.revision = 0
        self.relists = 0
        # Whether self.kv mirrors etcd up to self.revision; a (re)started run() resumes from there.
        self.listed = False
        self.reconnects = 0
        self._saved_revision = -1
        self._save_task: asyncio.Task[None] | None = None

    def describe(self) -> str:
        return f"etcd:{','.join(self.options.endpoints)}{self.layout.prefix}"

    async def run(self, store: SnapshotStore) -> None:
        try:
            async with Etcd(self.options) as etcd:
                await self._follow(etcd, store)
        finally:
            # Let a disk copy being written finish: it is replaced atomically, but a sidecar that
            # stops right after a change should leave that change on disk.
            if self._save_task is not None and not self._save_task.done():
                await asyncio.wait([self._save_task], timeout=5)

    async def _follow(self, etcd: Etcd, store: SnapshotStore) -> None:
        delay = 0.1
        while True:
            try:
                if not self.listed:
                    self.revision, kvs = await etcd.list_prefix(self.layout.root)
                    self.kv = {kv.key: kv.value for kv in kvs}
                    self.listed = True
                    store.heard()
                    await self._rebuild(store)
                async for revision, changes in etcd.watch(self.layout.root, self.revision + 1, self.liveness):
                    store.heard()
                    store.source_state = "connected"
                    delay = 0.1
                    if not changes:
                        self.revision = max(self.revision, revision)
                        continue
                    before = self.builder.referenced(self.kv)
                    for change in changes:
                        if change.value is None:
                            self.kv.pop(change.key, None)
                        else:
                            self.kv[change.key] = change.value
                    self.revision = max(self.revision, *(c.mod_revision for c in changes))
                    if self._matters(changes, before | self.builder.referenced(self.kv)):
                        await self._rebuild(store)
            except CompactedError as exc:
                self.relists += 1
                log.warning("etcd_compacted_relisting", resume_from=self.revision + 1, error=str(exc))
                self.listed = False
                continue
            except (WatchLostError, EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                self.reconnects += 1
                store.source_state = "unreachable"
                log.warning(
                    "etcd_unreachable",
                    error=str(exc) or type(exc).__name__,
                    resume_from=self.revision + 1 if self.listed else None,
                    retry_in=round(delay, 2),
                )
                if store.snapshot is None and store.withheld is None:
                    await self._serve_disk_copy(store)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, self.max_backoff)

    def _matters(self, changes: list[Change], versions: set[str]) -> bool:
        """Whether a change touches a pointer, a catalog or a version the pointers name (writes of
        chunks for a version nobody points at yet do not need a rebuild)."""
        lay = self.layout
        for change in changes:
            key = change.key
            if key in (lay.active, lay.shadows) or key.startswith(lay.catalogs):
                return True
            if any(key == lay.head(v) or key.startswith(lay.head(v) + "/") for v in versions):
                return True
        return False

    async def _rebuild(self, store: SnapshotStore) -> None:
        try:
            snapshot, used = await asyncio.to_thread(self.builder.build, dict(self.kv), self.revision)
        except DocumentError as exc:
            store.reject(str(exc))
            return
        store.install(snapshot)
        if self.disk is not None and self.revision != self._saved_revision:
            self._saved_revision = self.revision
            self._save_task = asyncio.create_task(self._save(self.disk, used, self.revision))

    async def _save(self, disk: DiskCopy, used: dict[str, bytes], revision: int) -> None:
        try:
            await asyncio.to_thread(disk.save, used, revision)
        except OSError as exc:
            log.warning("disk_copy_not_saved", path=str(disk.path), error=str(exc))

    async def _serve_disk_copy(self, store: SnapshotStore) -> None:
        if self.disk is None:
            return
        loaded = await asyncio.to_thread(self.disk.load)
        if loaded is None:
            return
        kv, revision = loaded
        try:
            snapshot, _used = await asyncio.to_thread(self.builder.build, kv, revision)
        except DocumentError as exc:
            log.warning("disk_copy_invalid", path=str(self.disk.path), error=str(exc))
            return
        log.warning("serving_disk_copy", path=str(self.disk.path), revision=revision)
        store.install(snapshot, stale=True)
