"""The etcd policy source: list once, watch from the next revision, list again when it must.

The loop, and why each step is there:

1. List every key under the prefix in one linearizable range; remember the revision it was read at
   and the cluster that answered.
2. Watch the prefix from that revision + 1, so no write between the list and the watch is missed.
   The stream asks etcd for progress every ``liveness / 3`` and requires a leader; a stream that
   goes quiet for ``liveness`` seconds, ends, or loses its leader is reopened from the last revision
   applied (resume, not relist: nothing is read twice and nothing is skipped). Only events move
   that revision: a progress report proves the stream alive and nothing more (etcd 3.5.1 can
   report progress ahead of events still queued for the stream).
3. If that revision has been compacted away, list again: a watch that silently skipped ahead could
   miss a pointer flip.
4. If etcd answers from another cluster (its cluster id changed: replaced) or says its newest
   revision is below the one applied (restored from a backup, or wiped), and a linearizable read
   confirms it, list again and follow what it holds now: the old revision will never come.
5. After every change that touches what the snapshot is built from, read each document from the
   mirrored keys off the event loop and take or refuse it on its own (:mod:`authz_sidecar.model.assembly`):
   an invalid shadow (or a shadows pointer entry naming a missing version) is left out, an invalid
   active set (or an active pointer that is malformed or names a missing version) or catalog keeps
   its last good version, and every refusal is reported while the valid documents still apply.
6. Hand the keys under a followed prefix (:meth:`EtcdPolicySource.follow`: the published event
   keys) to their listener after a listing and after each change among them, so what else a
   sidecar reads from etcd comes through this one watch. Consumed events (``consumed/``) are not
   mirrored: nothing here reads them, and a busy consumer writes one per event.
7. Keep the documents of the last good snapshot in a file. A sidecar restarted while etcd is
   unreachable serves that copy (marked stale); one restarted while etcd holds data that does not
   build falls back on the copy's active set and catalogs (stale until etcd's own data builds).

Parsed documents are cached by version and digest (versions are immutable), and compiled sets by
document, so a canary weight change rebuilds in microseconds even with a million grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
import structlog
from etcd3aio.errors import EtcdError

from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import load_document, parse_catalog
from authz_sidecar.documents.bigsets import BigSet, read_set
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.assembly import Assembly, LastGood, Read, Refusal, assemble
from authz_sidecar.model.pacing import HANDOVER, Demand, Pacer, pacing
from authz_sidecar.model.snapshot import CompileCache, paused_gc
from authz_sidecar.model.values import Catalog, Grants, PermissionSet, ShadowSet
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Change, CompactedError, Etcd, EtcdOptions, WatchBatch, WatchLostError
from authz_sidecar.store.layout import Layout
from authz_sidecar.store.sources.diskcopy import DiskCopy
from authz_sidecar.store.sources.release import Releaser

log = structlog.get_logger("authz_sidecar.store.sources.etcd")

# A build that read at least this many grants freezes what is alive when it ends (see build()).
FREEZE_AFTER = 100_000

__all__ = ["DiskCopy", "EtcdPolicySource", "SnapshotBuilder"]


class SnapshotBuilder:
    """Reads the documents of one prefix from the mirrored keys and assembles a snapshot. Runs in
    a worker thread; keeps the parsed documents and compiled sets of what serves for the next
    build, and the bytes they were read from for the disk copy."""

    def __init__(self, layout: Layout, *, service: str, region: str, source: str, demand: Demand | None = None) -> None:
        self.layout = layout
        self.service = service
        self.region = region
        self.source = source
        # Requests the process has answered, counted (see Pacer): builds rest while it moves.
        self.demand = demand
        # (version, digest) -> the parsed set (with what reading a child against it needs), the
        # chunk values it was parsed from, and every key and value it was read from (head and chunks).
        self._sets: dict[tuple[str, str], tuple[BigSet, tuple[bytes, ...], dict[str, bytes]]] = {}
        # The version the active pointer named at the last build: a new set is read against it.
        self._active_version = ""
        # Grants read by the build under way (a large build ends with gc.freeze).
        self._grants_read = 0
        # How often builds rested for the threads answering Checks (authz_sidecar.model.pacing).
        self.rests = 0
        self._catalogs: dict[bytes, Catalog] = {}
        # Chunks checked against their digests (id -> chunk), for the sets held in self._sets: a
        # proposal shares most of its chunks with the active set, and they are not hashed again.
        self._verified: dict[int, bytes] = {}
        self._compiled = CompileCache()
        # Frees a large build's values in pieces once they are dropped.
        self.releaser = Releaser()

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

    def _parsed_set(self, kv: Mapping[str, bytes], version: str) -> PermissionSet:
        head, parts = layout.chunks_of(kv, self.layout, version)
        head_key = self.layout.head(version)
        # When every chunk is the one parsed last time, the set is too: neither joining nor hashing
        # megabytes again is needed, so a weight change rebuilds without touching the sets. (The
        # mirror keeps an unchanged value as the same bytes object, and comparing tuples of the
        # same objects takes the identity shortcut.)
        cached = self._sets.get((version, head.sha256))
        if cached is not None and cached[1] == tuple(parts):
            return cached[0].permissions
        document = layout.gathered(head, parts, self.layout, self._verified)
        # Read in pieces (the GIL handed over between them), and against the active set when
        # there is one: a proposal made from it is parsed and compiled only where it differs.
        parent = self._parent(version)
        read = read_set(document, head_key, parent)
        permissions = read.permissions
        self._grants_read += len(permissions.grants)
        if parent is not None and read.changed is not None:
            self._compiled.derived(permissions, parent.permissions, read.changed)
        if permissions.version != version:
            raise DocumentError(
                f"document says version {permissions.version!r} but is stored as {version!r}",
                document=head_key,
                field="version",
                value=permissions.version,
            )
        raw = {head_key: kv[head_key], **dict(zip(self.layout.chunk_keys(head), parts, strict=True))}
        self._sets[(version, head.sha256)] = (read, tuple(parts), raw)
        return permissions

    def _parent(self, version: str) -> BigSet | None:
        """The set a new version is read against: the active set's, else the largest held."""
        held = [entry[0] for (v, _digest), entry in self._sets.items() if v != version and entry[0].pieces]
        active = [entry[0] for (v, _digest), entry in self._sets.items() if v == self._active_version]
        if active and active[0].pieces and self._active_version != version:
            return active[0]
        return max(held, key=lambda b: len(b.pieces), default=None)

    def _set(self, kv: Mapping[str, bytes], version: str, kind: str, pointer: str) -> Read[PermissionSet]:
        """The set a pointer names; a missing version is the pointer's fault, anything wrong with
        the set's head, chunks or document is the set's."""
        head_key = self.layout.head(version)
        if head_key not in kv:
            return Read(
                head_key,
                Refusal("pointer", pointer, f"names version {version!r}, which is not in etcd (no {head_key})"),
            )
        try:
            return Read(head_key, self._parsed_set(kv, version))
        except DocumentError as exc:
            return Read(head_key, Refusal.of(kind, exc, head_key))

    def _catalog(self, key: str, value: bytes) -> Read[Catalog]:
        catalog = self._catalogs.get(value)
        if catalog is None:
            try:
                catalog = parse_catalog(load_document(value, key), key)
                if catalog.service != key.removeprefix(self.layout.catalogs):
                    raise DocumentError(f"catalog of {catalog.service!r} stored under {key}", document=key)
            except DocumentError as exc:
                return Read(key, Refusal.of("catalog", exc, key))
            self._catalogs[value] = catalog
        return Read(key, catalog)

    def build(self, kv: Mapping[str, bytes], revision: int, last: LastGood) -> tuple[Assembly, dict[str, bytes]]:
        """The assembly, and the keys that store what it serves (what the disk copy keeps)."""
        # It rests between its pieces of work while other threads (those answering Checks) wait
        # to run (authz_sidecar.model.pacing): even with the GIL handed over after 0.1 ms
        # (HANDOVER), a Check waits at each of its GIL acquisitions behind a busy build.
        pacer = Pacer(demand=self.demand)
        try:
            with HANDOVER.held(), pacing(pacer):
                return self._frozen_build(kv, revision, last)
        finally:
            self.rests += pacer.rests

    def _frozen_build(
        self, kv: Mapping[str, bytes], revision: int, last: LastGood
    ) -> tuple[Assembly, dict[str, bytes]]:
        with paused_gc():
            self._grants_read = 0
            built = self._build(kv, revision, last)
            if self._grants_read >= FREEZE_AFTER:
                self._release_later(built[0])
                # Everything alive is moved out of the cyclic collector's sight (gc.freeze takes no
                # time). Otherwise the first collection after the build walks every container it
                # made, holding the GIL ~0.2 s per million grants while Checks wait, and each later
                # full collection walks them again. Frozen objects are still freed by reference
                # counting when their snapshot goes; only a cycle alive right now would never be
                # collected, and a build makes none.
                gc.freeze()
            return built

    def _release_later(self, assembly: Assembly) -> None:
        """Hand the large values of what was just built to the releaser, so that whichever
        statement drops their last owner later does not free a million grants at once."""
        for read, _parts, _raw in self._sets.values():
            if isinstance(read.permissions.grants, Grants) and len(read.permissions.grants) >= FREEZE_AFTER:
                self.releaser.keep(read.permissions.grants)
        snapshot = assembly.snapshot
        if snapshot is None:
            return
        for compiled in (snapshot.active, *(view.compiled for view in snapshot.shadows)):
            if sum(map(len, compiled.unscoped)) + sum(map(len, compiled.scoped)) >= FREEZE_AFTER:
                self.releaser.keep(compiled)
        for view in snapshot.shadows:
            if len(view.impact) >= FREEZE_AFTER:
                self.releaser.keep(view.impact)

    def _build(self, kv: Mapping[str, bytes], revision: int, last: LastGood) -> tuple[Assembly, dict[str, bytes]]:
        lay = self.layout
        found: list[Refusal] = []
        active: Read[PermissionSet] | None = None
        pointer = kv.get(lay.active)
        if pointer is not None:
            try:
                version = layout.decode_active(pointer, lay.active)
            except DocumentError as exc:
                active = Read(lay.active, Refusal.of("pointer", exc, lay.active))
            else:
                active = self._set(kv, version, "active", lay.active)
                self._active_version = version
        elif last.active is not None:
            found.append(Refusal("pointer", lay.active, "is gone; the last good active set stays"))
        shadows: list[Read[ShadowSet]] = []
        pointer = kv.get(lay.shadows)
        if pointer is not None:
            try:
                rollouts = layout.decode_shadows(pointer, lay.shadows)
            except DocumentError as exc:
                found.append(Refusal.of("pointer", exc, lay.shadows))
                rollouts = {}
            for version, rollout in rollouts.items():
                read = self._set(kv, version, "shadow", lay.shadows)
                if isinstance(read.value, Refusal):
                    shadows.append(Read(read.document, read.value))
                else:
                    shadows.append(Read(read.document, ShadowSet(permissions=read.value, rollout=rollout)))
        catalogs = [self._catalog(key, kv[key]) for key in sorted(k for k in kv if k.startswith(lay.catalogs))]
        assembly = assemble(
            active,
            shadows,
            catalogs,
            last=last,
            found=found,
            service=self.service,
            region=self.region,
            revision=revision,
            source=self.source,
            cache=self._compiled,
            no_active="no active set in etcd yet (run 'authz-sidecar ctl init --file SET')",
            no_catalog="no catalog registered in etcd yet",
        )
        if assembly.snapshot is None:
            return assembly, {}
        keys = self._keys_of(assembly)
        # Keep for the next build what serves now and what served before (a fallback needs it).
        good = assembly.last_good
        live = [s.permissions for s in assembly.shadows.values()]
        live += [
            g.active.value for g in (good, last) if g.active is not None and isinstance(g.active.value, PermissionSet)
        ]
        self._sets = {k: v for k, v in self._sets.items() if any(v[0].permissions is p for p in live)}
        held = {id(part) for _read, parts, _raw in self._sets.values() for part in parts}
        self._verified = {i: part for i, part in self._verified.items() if i in held}
        catalogs_kept = [*good.catalogs.values(), *last.catalogs.values()]
        self._catalogs = {b: c for b, c in self._catalogs.items() if any(c is k for k in catalogs_kept)}
        self._compiled.retain(live)
        return assembly, keys

    def _keys_of(self, assembly: Assembly) -> dict[str, bytes]:
        """The keys and values that store exactly what `assembly` serves: pointers written for
        it, the sets' heads and chunks, the catalogs. Empty if one is not at hand."""
        lay = self.layout
        good = assembly.last_good
        if good.active is None or not isinstance(good.active.value, PermissionSet):
            return {}
        raw = {id(entry[0].permissions): entry[2] for entry in self._sets.values()}
        sets = [good.active.value, *(s.permissions for s in assembly.shadows.values())]
        if any(id(p) not in raw for p in sets):
            return {}
        keys = {lay.active: layout.encode_active(good.active.value.version)}
        for permissions in sets:
            keys.update(raw[id(permissions)])
        if assembly.shadows:
            keys[lay.shadows] = layout.encode_shadows({s.version: s.rollout for s in assembly.shadows.values()})
        values = {id(c): b for b, c in self._catalogs.items()}
        for key, catalog in good.catalogs.items():
            value = values.get(id(catalog))
            if value is None:
                return {}
            keys[key] = value
        return dict(sorted(keys.items()))


class EtcdMovedError(Exception):
    """etcd was replaced (another cluster id) or restored (its revision went back): list again."""


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
        demand: Demand | None = None,
    ) -> None:
        """`demand`: a count of the requests the process has answered; builds and disk copies rest
        while it moves (authz_sidecar.model.pacing)."""
        self.options = options
        self.layout = Layout(layout.normalise_prefix(prefix))
        self.liveness = liveness
        self.max_backoff = max_backoff
        self.builder = SnapshotBuilder(
            self.layout, service=service, region=region, source=self.describe(), demand=demand
        )
        self.disk = DiskCopy(cache_file, self.layout.prefix, demand=demand) if cache_file is not None else None
        self.kv: dict[str, bytes] = {}
        # The revision everything in self.kv is current to: a listing's, or the last event applied.
        self.revision = 0
        # The cluster self.kv was read from (0 before the first listing).
        self.cluster_id = 0
        self.relists = 0
        # Whether self.kv mirrors etcd up to self.revision; a (re)started run() resumes from there.
        self.listed = False
        self.reconnects = 0
        # How often etcd was found replaced or restored; orders the disk copies (see DiskCopy).
        self.generation = 0
        # The documents that served last: an invalid active set or catalog falls back on them.
        self.last = LastGood()
        # The disk copy, assembled, once read (None: not read yet, or nothing usable in it).
        self._disk_assembly: Assembly | None = None
        self._disk_read = False
        self._saved = (-1, -1)
        self._saves: set[asyncio.Task[None]] = set()
        self._followers: list[tuple[str, Callable[[dict[str, bytes]], None]]] = []
        # version -> (its head's value, the chunk keys it names), for _matters.
        self._heads: dict[str, tuple[bytes, set[str]]] = {}

    def follow(self, prefix: str, listener: Callable[[dict[str, bytes]], None]) -> None:
        """Call `listener` with every mirrored key under `prefix` (key -> value, all of them) after
        each listing and after each change to one of them, on the event loop."""
        self._followers.append((prefix, listener))

    def _tell(self, changed: list[Change] | None) -> None:
        for prefix, listener in self._followers:
            if changed is None or any(c.key.startswith(prefix) for c in changed):
                listener({k: v for k, v in self.kv.items() if k.startswith(prefix)})

    def describe(self) -> str:
        return f"etcd:{','.join(self.options.endpoints)}{self.layout.prefix}"

    async def run(self, store: SnapshotStore) -> None:
        try:
            async with Etcd(self.options) as etcd:
                await self._follow(etcd, store)
        finally:
            # Let a disk copy being written finish: it is replaced atomically, but a sidecar that
            # stops right after a change should leave that change on disk.
            if self._saves:
                await asyncio.wait(list(self._saves), timeout=5)

    async def _follow(self, etcd: Etcd, store: SnapshotStore) -> None:
        delay = 0.1
        while True:
            try:
                if not self.listed:
                    await self._list(etcd, store)
                async with contextlib.aclosing(
                    etcd.watch(self.layout.root, self.revision + 1, self.liveness)
                ) as batches:
                    async for batch in batches:
                        store.heard()
                        store.source_state = "connected"
                        await self._check_same_etcd(etcd, batch)
                        delay = 0.1
                        if batch.changes:
                            await self._apply(batch.changes, store)
            except CompactedError as exc:
                self.relists += 1
                log.warning("etcd_compacted_relisting", resume_from=self.revision + 1, error=str(exc))
                self.listed = False
                continue
            except EtcdMovedError as exc:
                self.relists += 1
                log.warning("etcd_replaced_relisting", applied_revision=self.revision, error=str(exc))
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

    async def _list(self, etcd: Etcd, store: SnapshotStore) -> None:
        listing = await etcd.listing(self.layout.root)
        if self.cluster_id and (listing.cluster_id != self.cluster_id or listing.revision < self.revision):
            self.generation += 1
            log.warning(
                "etcd_replaced",
                cluster_id=f"{self.cluster_id:x}",
                now_cluster_id=f"{listing.cluster_id:x}",
                applied_revision=self.revision,
                now_revision=listing.revision,
            )
        self.revision, self.cluster_id = listing.revision, listing.cluster_id
        consumed = self.layout.consumed
        self.kv = {kv.key: kv.value for kv in listing.kvs if not kv.key.startswith(consumed)}
        self.listed = True
        store.heard()
        self._tell(None)
        await self._rebuild(store)
        store.advance(self.revision)

    async def _check_same_etcd(self, etcd: Etcd, batch: WatchBatch) -> None:
        """Raise EtcdMovedError if the etcd answering is not the one self.kv was read from.

        A member behind its cluster can also answer with a lower revision for a moment; only a
        linearizable read tells the two apart, so one is made before listing everything again."""
        other_cluster = bool(batch.cluster_id) and batch.cluster_id != self.cluster_id
        if not other_cluster and batch.revision >= self.revision:
            return
        listing_revision, cluster_id = await etcd.current(self.layout.root)
        if cluster_id != self.cluster_id:
            raise EtcdMovedError(f"cluster id {self.cluster_id:x} is now {cluster_id:x}")
        if listing_revision < self.revision:
            raise EtcdMovedError(f"etcd is at revision {listing_revision}, below the {self.revision} applied")
        raise WatchLostError(f"the watched member is behind (revision {batch.revision} < {self.revision})")

    async def _apply(self, changes: list[Change], store: SnapshotStore) -> None:
        before = self.builder.referenced(self.kv)
        consumed = self.layout.consumed
        for change in changes:
            if change.key.startswith(consumed):
                continue
            if change.value is None:
                self.kv.pop(change.key, None)
            else:
                self.kv[change.key] = change.value
        self.revision = max(self.revision, *(c.mod_revision for c in changes))
        self._tell(changes)
        if self._matters(changes, before | self.builder.referenced(self.kv)):
            await self._rebuild(store)
        store.advance(self.revision)

    def _matters(self, changes: list[Change], versions: set[str]) -> bool:
        """Whether a change touches a pointer, a catalog or a version the pointers name, or a chunk
        one of them names (writes of chunks for a version nobody points at yet, or whose head is
        not written yet, do not need a rebuild)."""
        lay = self.layout
        chunks: set[str] = set()
        for change in changes:
            key = change.key
            if key in (lay.active, lay.shadows) or key.startswith(lay.catalogs):
                return True
            if any(key == lay.head(v) or key.startswith(lay.head(v) + "/") for v in versions):
                return True
            if key.startswith(lay.chunks):
                chunks.add(key)
        if not chunks:
            return False
        named = any(not chunks.isdisjoint(self._chunk_keys(v)) for v in versions)
        self._heads = {v: known for v, known in self._heads.items() if v in versions}
        return named

    def _chunk_keys(self, version: str) -> set[str]:
        """The chunk keys `version`'s head names (decoded once per head value)."""
        value = self.kv.get(self.layout.head(version))
        known = self._heads.get(version)
        if known is not None and known[0] is value:
            return known[1]
        keys: set[str] = set()
        if value is not None:
            with contextlib.suppress(DocumentError):
                keys = set(self.layout.chunk_keys(layout.decode_head(value, self.layout.head(version), version)))
            self._heads[version] = (value, keys)
        return keys

    async def _rebuild(self, store: SnapshotStore) -> None:
        assembly, keys = await asyncio.to_thread(self.builder.build, dict(self.kv), self.revision, self.last)
        if self.last.active is None and (assembly.snapshot is None or assembly.refusals):
            # The first build since start did not go through whole: the disk copy's documents
            # are the last good ones to fall back on.
            disk = await self._disk_copy()
            if disk is not None:
                self.last = disk.last_good.from_disk()
                assembly, keys = await asyncio.to_thread(self.builder.build, dict(self.kv), self.revision, self.last)
        store.refusals(assembly.refusals)
        if assembly.snapshot is None:
            store.unavailable(assembly.waiting or "nothing to serve")
            return
        self.last = assembly.last_good
        if assembly.stale:
            log.warning(
                "serving_disk_copy",
                path=str(self.disk.path) if self.disk else None,
                documents=sorted(assembly.last_good.unconfirmed),
                revision=self.revision,
            )
        store.install(assembly.snapshot, stale=assembly.stale)
        if self.disk is not None and keys and (self.generation, self.revision) != self._saved:
            self._saved = (self.generation, self.revision)
            task = asyncio.create_task(self._save(self.disk, keys, self.revision, self.generation))
            self._saves.add(task)
            task.add_done_callback(self._saves.discard)

    async def _save(self, disk: DiskCopy, keys: dict[str, bytes], revision: int, generation: int) -> None:
        try:
            await asyncio.to_thread(disk.save, keys, revision, generation=generation)
        except OSError as exc:
            log.warning("disk_copy_not_saved", path=str(disk.path), error=str(exc))

    async def _disk_copy(self) -> Assembly | None:
        """The disk copy, assembled on its own (read once; None if absent or unusable)."""
        if self.disk is None or self._disk_read:
            return self._disk_assembly
        self._disk_read = True
        loaded = await asyncio.to_thread(self.disk.load)
        if loaded is None:
            return None
        kv, revision = loaded
        assembly, _keys = await asyncio.to_thread(self.builder.build, kv, revision, LastGood())
        if assembly.snapshot is None:
            log.warning("disk_copy_invalid", path=str(self.disk.path), error=assembly.waiting)
            return None
        self._disk_assembly = assembly
        return assembly

    async def _serve_disk_copy(self, store: SnapshotStore) -> None:
        """etcd is out of reach and nothing serves: serve the disk copy whole, marked stale."""
        disk = await self._disk_copy()
        if disk is None or disk.snapshot is None:
            return
        if self.last.active is None:
            self.last = disk.last_good.from_disk()
        log.warning(
            "serving_disk_copy", path=str(self.disk.path) if self.disk else None, revision=disk.snapshot.revision
        )
        store.install(disk.snapshot, stale=True)
