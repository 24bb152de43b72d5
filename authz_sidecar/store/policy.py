"""Reads and writes of the policy in etcd, for the control plane and for registration.

Every write that changes what is live is a transaction with a compare on what was read, so two
operators (or an operator and a sidecar registering its catalog) can never silently overwrite each
other: the loser gets :class:`ConflictError` and reads again. Set documents are written chunks first,
head last (:mod:`authz_sidecar.store.layout`), and only then pointed at.

The lifecycle issue extends this module (promote, rollback, history); sidecars use only
:meth:`PolicyStore.register_catalog`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from etcd3aio._protobuf import Compare
from etcd3aio.kv import prefix_range_end

from authz_sidecar.documents import (
    MAX_CATALOG_PERMISSIONS,
    MAX_CATALOG_ROUTES,
    check_description,
    check_handle,
    dump_permission_set,
    load_document,
    parse_catalog,
    parse_permission_set,
)
from authz_sidecar.documents.cohorts import cohort_document
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.selection import regions_over_100
from authz_sidecar.model.values import Catalog, Cohort, Permission, PermissionSet, Rollout
from authz_sidecar.store import audit, layout
from authz_sidecar.store.audit import ChainHead
from authz_sidecar.store.etcd import Etcd, KeyValue
from authz_sidecar.store.layout import Layout

log = structlog.get_logger("authz_sidecar.store.policy")
# The shadows pointer is one etcd value, written with an audit record in one request (etcd refuses
# a request over 1.5 MiB by default): cohorts of named principals are what could make it large.
MAX_SHADOWS_POINTER = 1024 * 1024


class StoreError(Exception):
    """A control-plane operation that cannot be done as asked (one line for the CLI)."""


class ConflictError(StoreError):
    """Someone else changed what this operation read; read again and retry."""


class FencedError(StoreError):
    """A fenced write refused because what it was decided on is gone: the controller's term ended,
    or the plan moved since it was read. Never retried: the decision itself is void."""


@dataclass(frozen=True, slots=True)
class Fence:
    """What every write of a fenced store also carries: compares that hold only while the writer's
    decision is still valid (its leadership term, the revision of what it read), and ops written
    with the change in the same transaction (the plan's progress). `holds` says, after a failed
    transaction, whether the fence is why."""

    compares: tuple[Any, ...]
    ops: tuple[Any, ...]
    holds: Callable[[], Awaitable[bool]]


class OwnedElsewhereError(StoreError):
    """A handle another service has registered: a service registers its own permissions only."""


class CatalogTooLargeError(StoreError):
    """A catalog over a bound (permissions, routes, bytes): refused before anything is sent."""


# A catalog is one etcd value: at most this, well under etcd's default 1.5 MiB request limit.
MAX_CATALOG_BYTES = layout.CHUNK_BYTES
# Chunks deleted per transaction of a sweep (etcd allows 128 operations; one more bumps the epoch).
_SWEEP_BATCH = 100


@dataclass(frozen=True, slots=True)
class Pointers:
    """The live world as read from etcd, with the mod revisions a transaction compares against."""

    active: str | None
    shadows: dict[str, Rollout] = field(default_factory=dict)
    active_revision: int = 0
    shadows_revision: int = 0

    def shadow(self, version: str) -> Rollout:
        """The rollout of a live shadow; StoreError naming the live ones if `version` is not one."""
        rollout = self.shadows.get(version)
        if rollout is None:
            live = ", ".join(sorted(self.shadows)) or "none"
            raise StoreError(f"{version!r} is not a live shadow (live: {live})")
        return rollout


@dataclass(frozen=True, slots=True)
class Change:
    """What one control-plane write records and holds beside the pointers it flips: its audit
    record's fields, the request id that makes it idempotent, and the handle locks it takes or
    releases, all in the pointers' own transaction."""

    action: str
    request_id: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    # The request's identity for idempotency: the same request id with other content is refused.
    subject: str = ""
    take_locks: Mapping[str, str] = field(default_factory=dict)  # handle -> holder (the version)
    release_locks: tuple[str, ...] = ()


def catalog_document(catalog: Catalog) -> bytes:
    """A catalog as the JSON stored under ``catalogs/<service>`` (parse_catalog reads it back)."""
    data = {
        "service": catalog.service,
        "permissions": [
            {"handle": p.handle, **({"description": p.description} if p.description else {})}
            for p in catalog.permissions
        ],
        "routes": [
            {
                "method": r.method,
                "path": r.path,
                "permission": r.permission,
                **({"scope": r.scope} if r.scope else {}),
            }
            for r in catalog.routes
        ],
    }
    return json.dumps(data, sort_keys=True).encode()


def catalog_value(catalog: Catalog, key: str) -> bytes:
    """What is written under `key` for `catalog`: refused (CatalogTooLargeError) if it is over a
    bound, and DocumentError if a sidecar would not read it back (checked by reading it back)."""
    for what, count, limit in (
        ("permissions", len(catalog.permissions), MAX_CATALOG_PERMISSIONS),
        ("routes", len(catalog.routes), MAX_CATALOG_ROUTES),
    ):
        if count > limit:
            raise CatalogTooLargeError(
                f"the catalog of {catalog.service!r} would hold {count} {what}; a service has at most {limit}"
            )
    document = catalog_document(catalog)
    if len(document) > MAX_CATALOG_BYTES:
        raise CatalogTooLargeError(
            f"the catalog of {catalog.service!r} would take {len(document) / 2**20:.2f} MiB; a catalog is one "
            f"etcd value of at most {MAX_CATALOG_BYTES / 2**20:g} MiB"
        )
    parse_catalog(load_document(document, key), key)
    return document


def merge_catalogs(stored: Catalog | None, registered: Catalog) -> Catalog:
    """What a registration leaves in etcd: no permission is ever removed (there is no delete), a
    registered description replaces the stored one, and the routes are the registering service's."""
    if stored is None:
        return registered
    mine = {p.handle: p for p in registered.permissions}
    kept = [mine.pop(p.handle, p) for p in stored.permissions]
    return Catalog(service=registered.service, permissions=(*kept, *mine.values()), routes=registered.routes)


class PolicyStore:
    def __init__(self, etcd: Etcd, prefix: str = layout.DEFAULT_PREFIX) -> None:
        self.etcd = etcd
        self.layout = Layout(layout.normalise_prefix(prefix))
        # etcd's revision after this store's last successful pointer change.
        self.last_revision = 0
        self.fence: Fence | None = None

    def fenced(self, fence: Fence) -> PolicyStore:
        """This store, with every write it makes carrying `fence` (see :class:`Fence`)."""
        clone = copy.copy(self)
        clone.fence = fence
        return clone

    async def _commit(self, compares: list[Any], ops: list[Any], conflict: str) -> Any:
        """Run one write transaction with the fence, if any; FencedError if the fence broke,
        ConflictError (with `conflict`) if something else it compared moved."""
        if self.fence is not None:
            compares = [*compares, *self.fence.compares]
            ops = [*ops, *self.fence.ops]
        response = await self.etcd.call(self.etcd.kv.txn, compares, ops)
        if not response.succeeded:
            if self.fence is not None and not await self.fence.holds():
                raise FencedError("refused: the decision was taken on a term or a plan revision that is gone")
            raise ConflictError(conflict)
        return response

    # --- reading -------------------------------------------------------------------------------

    async def pointers(self) -> Pointers:
        active_kv = await self.etcd.get(self.layout.active)
        shadows_kv = await self.etcd.get(self.layout.shadows)
        return Pointers(
            active=layout.decode_active(active_kv.value, active_kv.key) if active_kv else None,
            shadows=layout.decode_shadows(shadows_kv.value, shadows_kv.key) if shadows_kv else {},
            active_revision=active_kv.mod_revision if active_kv else 0,
            shadows_revision=shadows_kv.mod_revision if shadows_kv else 0,
        )

    async def document(self, version: str) -> bytes:
        """The bytes of a stored set version (chunks joined and checked)."""
        found = await self.etcd.get(self.layout.head(version))
        if found is None:
            return layout.join({}, self.layout, version)  # (the refusal that names it)
        head = layout.decode_head(found.value, found.key, version)
        kv = {found.key: found.value}
        for key in self.layout.chunk_keys(head):
            chunk = await self.etcd.get(key)
            if chunk is not None:
                kv[key] = chunk.value
        return layout.join(kv, self.layout, version)

    async def permission_set(self, version: str) -> PermissionSet:
        """A stored set version, read and parsed (DocumentError or StoreError naming it if it cannot be)."""
        return parse_permission_set(load_document(await self.document(version), version), version)

    async def catalogs(self) -> list[Catalog]:
        _revision, kvs = await self.etcd.list_prefix(self.layout.catalogs)
        return [parse_catalog(load_document(kv.value, kv.key), kv.key) for kv in kvs]

    # --- writing -------------------------------------------------------------------------------

    async def write_set(self, permissions: PermissionSet, document: bytes, attempts: int = 5) -> bool:
        """Store `document` (the text `permissions` was parsed from) under its version: the chunks
        etcd does not hold yet, then the head. Returns False if that version already holds exactly
        this document; a different document under an existing version is refused: versions are
        immutable.

        The head is written only if the chunks epoch is what it was before the chunks were looked
        for: a sweep (:meth:`sweep_chunks`) that removed one of them meanwhile moved it, and the
        write looks again."""
        version = permissions.version
        head, chunks = layout.split(version, document)
        lay, kv = self.layout, self.etcd.kv
        for _attempt in range(attempts):
            existing = await self.etcd.get(lay.head(version))
            if existing is not None:
                stored = layout.decode_head(existing.value, existing.key, version)
                if stored.sha256 == head.sha256:
                    return False
                raise StoreError(f"version {version!r} already exists with different content; versions are immutable")
            epoch = await self.etcd.get(lay.chunks_epoch)
            held = set(await self.etcd.keys(lay.chunks))
            for key, chunk in zip(lay.chunk_keys(head), chunks, strict=True):
                if key not in held:
                    await self.etcd.call(kv.put, key, chunk)
                    held.add(key)
            response = await self.etcd.call(
                kv.txn,
                [kv.txn_compare_create_revision(lay.head(version), 0), mod_is(lay.chunks_epoch, _mod(epoch))],
                [kv.txn_op_put(lay.head(version), head.encode()), kv.txn_op_put(lay.chunks_epoch, version.encode())],
            )
            if response.succeeded:
                return True
        raise ConflictError(f"version {version!r}: chunks kept being swept or written meanwhile; gave up")

    async def sweep_chunks(self, attempts: int = 5) -> int:
        """Delete the chunks no set's head names (a pruned set's, those of a write that never
        wrote its head); returns how many. Each deletion compares the chunks epoch with what it
        was when the heads were read, so a head written meanwhile (which moves it) is never left
        naming a deleted chunk: the sweep reads again. Nothing is deleted while a head cannot be
        read (what it names is unknown)."""
        lay, kv = self.layout, self.etcd.kv
        for _attempt in range(attempts):
            epoch = await self.etcd.get(lay.chunks_epoch)
            seen = _mod(epoch)
            named: set[str] = set()
            for key in await self.etcd.keys(lay.sets):
                version = key[len(lay.sets) :]
                if "/" in version:
                    continue  # a chunk of a set written by an earlier release, under its version
                found = await self.etcd.get(key)
                if found is None:
                    continue
                try:
                    named.update(lay.chunk_keys(layout.decode_head(found.value, key, version)))
                except DocumentError as exc:
                    log.warning("chunks_not_swept", head=key, error=str(exc))
                    return 0
            unnamed = [key for key in await self.etcd.keys(lay.chunks) if key not in named]
            swept = 0
            for start in range(0, len(unnamed), _SWEEP_BATCH):
                batch = unnamed[start : start + _SWEEP_BATCH]
                response = await self.etcd.call(
                    kv.txn,
                    [mod_is(lay.chunks_epoch, seen)],
                    [*(kv.txn_op_delete(key) for key in batch), kv.txn_op_put(lay.chunks_epoch, b"sweep")],
                )
                if not response.succeeded:
                    break
                seen = response.header.revision
                swept += len(batch)
            else:
                return swept
        raise ConflictError(f"heads kept being written while sweeping chunks; gave up after {attempts} attempts")

    async def chain_head(self) -> tuple[ChainHead, int]:
        """The audit chain's head and its key's mod revision (0 before the first record)."""
        found = await self.etcd.get(self.layout.audit_head)
        return (ChainHead.decode(found.value), found.mod_revision) if found else (ChainHead(), 0)

    async def done_before(self, change: Change) -> dict[str, Any] | None:
        """What `change.request_id` already did, if it did exactly this; StoreError if it was used
        for something else; None if it is new."""
        if not change.request_id:
            return None
        found = await self.etcd.get(self.layout.request(change.request_id))
        if found is None:
            return None
        done: dict[str, Any] = json.loads(found.value)
        if done.get("action") != change.action or done.get("subject") != change.subject:
            raise StoreError(
                f"request id {change.request_id!r} was already used to {done.get('action')} "
                f"{done.get('subject')!r}; a request id names one change"
            )
        return done

    async def _flip(
        self, seen: Pointers, active: str | None, shadows: Mapping[str, Rollout], change: Change | None = None
    ) -> dict[str, Any] | None:
        """Write both pointers in one transaction, if neither changed since `seen` was read, with
        the change's audit record, request id and locks in the same transaction. Returns the audit
        record written (None without a change)."""
        kv = self.etcd.kv
        compares = []
        for key, revision in ((self.layout.active, seen.active_revision), (self.layout.shadows, seen.shadows_revision)):
            if revision:
                compares.append(mod_is(key, revision))
            else:
                compares.append(kv.txn_compare_create_revision(key, 0))
        pointer = layout.encode_shadows(shadows)
        if len(pointer) > MAX_SHADOWS_POINTER:
            raise StoreError(
                f"the shadows pointer would be {len(pointer):,} bytes (at most {MAX_SHADOWS_POINTER:,}, under etcd's "
                "request limit): name fewer principals in cohorts; a role combination names many in a few bytes"
            )
        ops = [kv.txn_op_put(self.layout.shadows, pointer)]
        if active is not None:
            ops.append(kv.txn_op_put(self.layout.active, layout.encode_active(active)))
        entry = None
        if change is not None:
            entry = await self._recorded(change, compares, ops)
        response = await self._commit(compares, ops, "the live pointers changed while this command ran; run it again")
        self.last_revision = response.header.revision
        if entry is not None:
            log.info("audit", **{k: v for k, v in entry.items() if k != "at"})
        return entry

    async def _recorded(self, change: Change, compares: list[Any], ops: list[Any]) -> dict[str, Any]:
        """Add to a transaction what every audited change carries: the next audit record and the
        head (compared, so that two writers never fork the chain), its request id (create-only, so
        that it is done once) and the locks it takes (create-only) or releases. Returns the record."""
        kv = self.etcd.kv
        head, head_revision = await self.chain_head()
        fields = {"request_id": change.request_id, "subject": change.subject, **change.fields}
        trace_id = audit.trace_id()
        if trace_id:
            fields["trace_id"] = trace_id
        entry = audit.record(head, change.action, fields)
        compares.append(
            mod_is(self.layout.audit_head, head_revision)
            if head_revision
            else kv.txn_compare_create_revision(self.layout.audit_head, 0)
        )
        ops.append(kv.txn_op_put(self.layout.audit_record(entry["seq"]), json.dumps(entry, sort_keys=True)))
        ops.append(kv.txn_op_put(self.layout.audit_head, ChainHead(entry["seq"], entry["hash"]).encode()))
        if change.request_id:
            request_key = self.layout.request(change.request_id)
            compares.append(kv.txn_compare_create_revision(request_key, 0))
            done = {
                "action": change.action,
                "subject": change.subject,
                "seq": entry["seq"],
                "version": change.fields.get("version", ""),
            }
            ops.append(kv.txn_op_put(request_key, json.dumps(done, sort_keys=True)))
        handed_over = set(change.take_locks) & set(change.release_locks)  # a rebase keeps these locked
        for handle, holder in sorted(change.take_locks.items()):
            lock_key = self.layout.lock(handle)
            if handle not in handed_over:
                compares.append(kv.txn_compare_create_revision(lock_key, 0))
            lock = {"version": holder, "request_id": change.request_id}
            ops.append(kv.txn_op_put(lock_key, json.dumps(lock, sort_keys=True)))
        ops.extend(
            kv.txn_op_delete(self.layout.lock(handle)) for handle in sorted(set(change.release_locks) - handed_over)
        )
        return entry

    async def record(
        self, change: Change, ops: list[Any] | None = None, compares: list[Any] | None = None
    ) -> dict[str, Any]:
        """An audited change that moves no pointer (dropping a dead letter, pausing a plan), with
        `ops` in its transaction, made only if `compares` hold."""
        compares = list(compares or [])
        ops = list(ops or [])
        entry = await self._recorded(change, compares, ops)
        response = await self._commit(compares, ops, "the audit chain moved while this command ran; run it again")
        self.last_revision = response.header.revision
        log.info("audit", **{k: v for k, v in entry.items() if k != "at"})
        return entry

    # --- the dead-letter queue in etcd ----------------------------------------------------------

    async def dead_letters(self) -> dict[str, dict[str, Any]]:
        _revision, kvs = await self.etcd.list_prefix(self.layout.dead_letters)
        return {kv.key.removeprefix(self.layout.dead_letters): json.loads(kv.value) for kv in kvs}

    async def add_dead_letter(self, request_id: str, letter: Mapping[str, Any]) -> None:
        await self.etcd.call(self.etcd.kv.put, self.layout.dead_letter(request_id), json.dumps(letter, sort_keys=True))

    async def remove_dead_letter(self, request_id: str) -> None:
        await self.etcd.call(self.etcd.kv.delete, self.layout.dead_letter(request_id))

    async def locks(self) -> dict[str, dict[str, str]]:
        """Every held lock: handle -> the version holding it and its request id."""
        _revision, kvs = await self.etcd.list_prefix(self.layout.locks)
        return {kv.key.removeprefix(self.layout.locks): json.loads(kv.value) for kv in kvs}

    async def audit_records(self) -> list[tuple[str, bytes]]:
        _revision, kvs = await self.etcd.list_prefix(self.layout.audit_records)
        return sorted((kv.key, kv.value) for kv in kvs)

    async def init(self, permissions: PermissionSet, document: bytes, change: Change | None = None) -> None:
        """Make `permissions` the first active set. Refused once any active set exists."""
        seen = await self.pointers()
        if seen.active is not None:
            raise StoreError(f"an active set already exists ({seen.active}); changes go through 'ctl propose'")
        await self.write_set(permissions, document)
        change = change or Change("init", permissions.meta.request_id, subject=permissions.version)
        await self._flip(
            seen,
            permissions.version,
            seen.shadows,
            replace(
                change,
                fields={
                    **change.fields,
                    "after": permissions.version,
                    "after_sha256": await self.digest_of(permissions.version),
                },
            ),
        )

    async def propose(
        self,
        permissions: PermissionSet,
        document: bytes,
        rollout: Rollout,
        change: Change | None = None,
        *,
        replaces: str | None = None,
    ) -> dict[str, Any]:
        """Store a shadow version and make it live beside the active set with `rollout`, taking the
        locks of the handles it changes. Run again with the same request id and content, it does
        nothing and says so (``repeated``)."""
        version = permissions.version
        change = change or Change("propose", permissions.meta.request_id, subject=version)
        done = await self.done_before(change)
        if done is not None:
            return {"repeated": True, "seq": done.get("seq")}
        seen = await self.pointers()
        if seen.active is None:
            raise StoreError("no active set yet; start with 'ctl init'")
        if version == seen.active or version in seen.shadows:
            raise StoreError(f"version {version!r} is already live")
        parent = permissions.meta.parent
        if parent and parent != seen.active:
            raise StoreError(f"this change was made against {parent!r} but the active set is {seen.active!r}")
        # A rebase: the stale shadow it replaces leaves, and hands over its locks, in this transaction.
        live = {v: r for v, r in seen.shadows.items() if v != replaces}
        if replaces:
            seen.shadow(replaces)
            change = replace(change, release_locks=await self.locks_of(replaces))
        _check_weights({**live, version: rollout})
        held = {
            h: lock
            for h, lock in (await self.locks()).items()
            if h in change.take_locks and lock.get("version") != replaces
        }
        if held:
            handle, lock = sorted(held.items())[0]
            raise StoreError(
                f"{handle!r} is locked by {lock.get('version')!r} (request {lock.get('request_id')!r}); "
                "promote or roll that back first"
            )
        await self.write_set(permissions, document)
        entry = await self._flip(seen, None, {**live, version: rollout}, change)
        return {"repeated": False, "seq": entry["seq"] if entry else None}

    async def canary(
        self,
        version: str,
        weights: Mapping[str, int],
        change: Change | None = None,
        *,
        cohorts: Mapping[str, Cohort] | None = None,
    ) -> Rollout:
        """Set a live shadow's canary weight in the given regions (0 takes it out of a region), and
        its cohort in the regions `cohorts` names (an empty cohort takes it out); the other regions
        keep theirs. The audit record carries every weight and the cohorts this call changed."""
        seen = await self.pointers()
        current = seen.shadow(version)
        if current.state == "stale":
            raise StoreError(f"{version!r} is stale (another change was promoted over its parent); rebase it")
        merged = {**current.weights, **weights}
        merged = {r: w for r, w in merged.items() if w > 0}
        groups = {r: c for r, c in {**current.cohorts, **(cohorts or {})}.items() if c}
        rollout = Rollout(
            weights=merged,
            testers=current.testers,
            state="canary" if merged or groups else "proposed",
            cohorts=groups,
        )
        _check_weights({**seen.shadows, version: rollout})
        change = change or Change("canary", subject=version)
        fields: dict[str, Any] = {**change.fields, "weights": merged}
        if cohorts:
            fields["cohorts"] = {r: cohort_document(c) if c else None for r, c in sorted(cohorts.items())}
        await self._flip(seen, None, {**seen.shadows, version: rollout}, replace(change, fields=fields))
        return rollout

    async def promote(self, version: str, parent: str, change: Change, attempts: int = 5) -> dict[str, Any]:
        """Make a live shadow the active set in one transaction that compares the pointers it read:
        the shadow leaves the live ones, its locks are released, every other live shadow becomes
        stale with its weights zeroed (enforcing one would revert this change for its cohort), and
        the audit record is appended. `parent` is the version the shadow was made against; a shadow
        whose parent is no longer active is refused as stale. Idempotent by request id."""
        for _ in range(attempts):
            done = await self.done_before(change)
            if done is not None:
                return {"repeated": True, "seq": done.get("seq"), "active": version}
            seen = await self.pointers()
            rollout = seen.shadow(version)
            if rollout.state == "stale" or parent != seen.active:
                raise StoreError(
                    f"{version!r} was made against {parent!r} but the active set is {seen.active!r}: it is stale; "
                    f"rebase it onto {seen.active!r} with 'ctl propose --rebase {version}'"
                )
            others = {
                v: Rollout(weights={}, testers=r.testers, state="stale")
                for v, r in seen.shadows.items()
                if v != version
            }
            fields = {
                **change.fields,
                "before": seen.active,
                "after": version,
                "after_sha256": await self.digest_of(version),
                "made_stale": sorted(others),
            }
            releasing = replace(change, fields=fields, release_locks=await self.locks_of(version))
            try:
                entry = await self._flip(seen, version, others, releasing)
            except ConflictError:
                continue  # someone else wrote first: read again, and decide again on what is there now
            return {
                "repeated": False,
                "seq": entry["seq"] if entry else None,
                "active": version,
                "stale": sorted(others),
            }
        raise ConflictError(f"the live pointers kept changing; {version!r} was not promoted")

    async def restore(self, former: PermissionSet, change: Change, attempts: int = 5) -> dict[str, Any]:
        """The emergency path: make `former` (an earlier active set, re-versioned by the caller, its
        parent the active set it replaces) the active set at once, without a shadow phase. Every live
        shadow becomes stale, as on a promotion. Idempotent by request id."""
        for _ in range(attempts):
            done = await self.done_before(change)
            if done is not None:
                return {"repeated": True, "seq": done.get("seq"), "active": former.version}
            seen = await self.pointers()
            if former.meta.parent != seen.active:
                raise ConflictError(f"the active set moved to {seen.active!r} while the restore was prepared")
            await self.write_set(former, dump_permission_set(former))
            others = {v: Rollout(weights={}, testers=r.testers, state="stale") for v, r in seen.shadows.items()}
            fields = {
                **change.fields,
                "before": seen.active,
                "after": former.version,
                "after_sha256": await self.digest_of(former.version),
                "made_stale": sorted(others),
            }
            try:
                entry = await self._flip(seen, former.version, others, replace(change, fields=fields))
            except ConflictError:
                continue
            return {"repeated": False, "seq": entry["seq"] if entry else None, "active": former.version}
        raise ConflictError(f"the live pointers kept changing; {former.version!r} was not restored")

    async def digest_of(self, version: str) -> str:
        """The SHA-256 of a stored set's document (what its head says): kept in the audit record,
        so a pruned set can still be recognised."""
        found = await self.etcd.get(self.layout.head(version))
        return layout.decode_head(found.value, found.key, version).sha256 if found else ""

    async def history(self) -> list[dict[str, Any]]:
        """The active sets in order, oldest first, from the audit chain: who made each active, when,
        why, with what impact, and whether its document is still stored."""
        entries = []
        for _key, value in await self.audit_records():
            record = json.loads(value)
            if record.get("action") in ("init", "promote", "restore"):
                entries.append(record)
        sets = f"{self.layout.prefix}/sets/"
        stored = {name for name in (key.removeprefix(sets) for key in await self.etcd.keys(sets)) if "/" not in name}
        return [
            {
                "version": r.get("after"),
                "action": r.get("action"),
                "at": r.get("at"),
                "who": r.get("who", ""),
                "request_id": r.get("request_id", ""),
                "reason": r.get("reason", ""),
                "before": r.get("before"),
                "impact": r.get("impact", {}),
                "sha256": r.get("after_sha256", ""),
                "stored": r.get("after") in stored,
                "audit_seq": r.get("seq"),
            }
            for r in entries
        ]

    async def prune(self, keep: int) -> list[str]:
        """Delete the documents of former active sets beyond the newest `keep` (their audit records
        and digests stay): etcd's space quota must never fill with old sets. A set any pointer
        still names is never deleted."""
        seen = await self.pointers()
        live = {seen.active, *seen.shadows}
        former = [h["version"] for h in await self.history() if h["stored"] and h["version"] not in live]
        # Newest first, without repeats (a version can have been active twice after a restore).
        order = list(dict.fromkeys(reversed(former)))
        pruned = []
        for version in order[keep:]:
            head = self.layout.head(version)
            # The head first: a reader then sees the set gone, never a head without its chunks.
            await self.etcd.call(self.etcd.kv.delete, head)
            await self.etcd.call(self.etcd.kv.delete, f"{head}/", prefix_range_end(f"{head}/".encode()))
            pruned.append(version)
        if pruned:
            await self.sweep_chunks()
        return pruned

    async def discard(self, version: str, change: Change, attempts: int = 5) -> dict[str, Any]:
        """Roll back a live shadow: it leaves the live ones (no traffic reaches it again) and its
        locks are released, with the audit record, in one transaction. Idempotent by request id."""
        for _ in range(attempts):
            done = await self.done_before(change)
            if done is not None:
                return {"repeated": True, "seq": done.get("seq"), "discarded": version}
            seen = await self.pointers()
            seen.shadow(version)
            remaining = {v: r for v, r in seen.shadows.items() if v != version}
            releasing = replace(change, release_locks=await self.locks_of(version))
            try:
                entry = await self._flip(seen, None, remaining, releasing)
            except ConflictError:
                continue
            return {"repeated": False, "seq": entry["seq"] if entry else None, "discarded": version}
        raise ConflictError(f"the live pointers kept changing; {version!r} was not rolled back")

    async def locks_of(self, version: str) -> tuple[str, ...]:
        """The handles `version` holds locks on."""
        return tuple(sorted(h for h, lock in (await self.locks()).items() if lock.get("version") == version))

    async def register_catalog(self, catalog: Catalog, attempts: int = 5) -> Catalog:
        """Merge a service's catalog into etcd (see :func:`merge_catalogs`), compare-and-swap."""
        return await self.update_catalog(catalog.service, lambda stored: merge_catalogs(stored, catalog), attempts)

    async def check_owner(self, service: str, handles: Iterable[str]) -> None:
        """Refuse, before writing, any of `handles` that another service's catalog holds: the rule
        the Registry answers ALREADY_EXISTS for and ctl refuses by, one service cannot claim (or
        describe again) another's permission."""
        wanted = frozenset(handles)
        for catalog in await self.catalogs():
            taken = sorted(wanted & catalog.handles()) if catalog.service != service else []
            if taken:
                raise OwnedElsewhereError(f"{taken[0]!r} is owned by service {catalog.service!r}")

    async def register_permission(self, service: str, permission: Permission) -> Catalog:
        """Add (or describe again) one permission of `service`, keeping its routes; refused if
        another service owns it (:meth:`check_owner`)."""
        where = f"catalog of {service!r}"
        check_handle(permission.handle, where, "handle")
        check_description(permission.description, where, f"{permission.handle} description")
        await self.check_owner(service, (permission.handle,))

        def add(stored: Catalog | None) -> Catalog:
            base = stored or Catalog(service=service, permissions=())
            return merge_catalogs(base, Catalog(service=service, permissions=(permission,), routes=base.routes))

        return await self.update_catalog(service, add)

    async def update_catalog(
        self, service: str, change: Callable[[Catalog | None], Catalog], attempts: int = 5
    ) -> Catalog:
        kv = self.etcd.kv
        key = self.layout.catalog(service)
        for _ in range(attempts):
            existing = await self.etcd.get(key)
            stored = None
            if existing is not None:
                try:
                    stored = parse_catalog(load_document(existing.value, key), key)
                except DocumentError as exc:
                    # A broken catalog is replaced by a good one, not merged with; say so, since what
                    # it held (handles other sets may grant) is gone from etcd after this write.
                    log.warning("catalog_replaced_unparseable", key=key, service=service, error=str(exc))
                    stored = None
            updated = change(stored)
            if updated.service != service:
                raise StoreError(f"catalog for {updated.service!r} cannot be written under {service!r}")
            value = catalog_value(updated, key)
            compare = mod_is(key, existing.mod_revision) if existing else kv.txn_compare_create_revision(key, 0)
            response = await self.etcd.call(kv.txn, [compare], [kv.txn_op_put(key, value)])
            if response.succeeded:
                self.last_revision = response.header.revision
                return updated
        raise ConflictError(f"catalog of {service!r} kept changing; gave up after {attempts} attempts")


def _mod(found: KeyValue | None) -> int:
    return found.mod_revision if found is not None else 0


def mod_is(key: str, revision: int) -> Compare:
    """True in a transaction while `key` is as it was at `revision`."""
    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key.encode(), mod_revision=revision)


def _check_weights(shadows: Mapping[str, Rollout]) -> None:
    over = regions_over_100(*(rollout.weights for rollout in shadows.values()))
    if over:
        region, total = over[0]
        raise StoreError(f"canary weights in region {region!r} would sum to {total}% (at most 100)")
