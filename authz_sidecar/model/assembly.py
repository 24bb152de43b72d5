"""Which documents make the next snapshot: each one taken or refused on its own.

Pure: no I/O. A source (files, etcd) reads its documents, parses each one into a value or a
:class:`Refusal`, and hands them to :func:`assemble` together with the documents that served last
time (:class:`LastGood`). One bad document never blocks the others:

- a catalog that does not parse keeps that document's last good catalog (if there was one);
- a catalog change that drops handles the active set grants is refused the same way (the catalog
  keeps its last good version), so the active set never loses the catalog its handles come from;
- an active set that does not parse or uses handles no catalog has keeps the last good active set;
  before there is one there is nothing to serve (the sidecar stays NOT_SERVING and denies);
- a shadow that does not parse, reuses a live version, uses handles no catalog has (any more),
  pushes a region's canary weights over 100 (shadows are taken in version order, so the later one
  is left out), or, while it is not stale, names in a cohort a role the active set does not have
  (a combination that matches nobody would move nobody, silently) is left out;
- what the source found wrong outside the documents (a pointer that does not parse or names a
  missing version) comes in as refusals of its own.

Every refusal is returned, so /status, the ``authz_invalid_documents_total{kind}`` counter and the
``document_invalid`` log event can name the document and the reason while it lasts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from authz_sidecar.errors import DocumentError
from authz_sidecar.model.cohorts import describe_missing, missing_roles
from authz_sidecar.model.selection import regions_over_100
from authz_sidecar.model.snapshot import CompileCache, Snapshot, build_snapshot, is_stale, version_key
from authz_sidecar.model.values import Catalog, PermissionSet, ShadowSet

# The kinds of document a refusal names (a bounded set: they are metric label values).
KINDS = ("active", "shadow", "catalog", "pointer")
# The slot of the active set in LastGood.unconfirmed (catalogs are named by their document).
ACTIVE_SLOT = "active"

_D = TypeVar("_D")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A document left out (or kept at its last good version), and why."""

    kind: str
    document: str
    reason: str

    @classmethod
    def of(cls, kind: str, error: DocumentError, document: str = "") -> Refusal:
        """The refusal of `document` (the error's own document by default) for `error`."""
        document = document or error.document
        text = str(error)
        prefix = f"{document}: "
        return cls(kind, document, text.removeprefix(prefix) if document else text)

    def __str__(self) -> str:
        return f"{self.document}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Read(Generic[_D]):
    """One document as the source read it: its name (a path, an etcd key) and its parsed value,
    or the refusal that says why it has none."""

    document: str
    value: _D | Refusal


@dataclass(frozen=True, slots=True)
class LastGood:
    """The documents that served last: what an invalid active set or catalog falls back to."""

    active: Read[PermissionSet] | None = None
    catalogs: Mapping[str, Catalog] = field(default_factory=dict)
    # Slots (ACTIVE_SLOT, or a catalog's document) whose value came from a disk copy and has not
    # been confirmed by the source since: while one serves, the snapshot is stale.
    unconfirmed: frozenset[str] = frozenset()

    def from_disk(self) -> LastGood:
        """The same documents, every one marked as not yet confirmed by the source."""
        slots = set(self.catalogs)
        if self.active is not None:
            slots.add(ACTIVE_SLOT)
        return LastGood(self.active, self.catalogs, frozenset(slots))


@dataclass(frozen=True, slots=True)
class Assembly:
    """What to serve (None: nothing can be served yet, `waiting` says why), every refusal, and
    the documents to fall back on next time."""

    snapshot: Snapshot | None
    refusals: tuple[Refusal, ...]
    last_good: LastGood
    # The shadows taken, by document (the etcd source writes its disk copy from them).
    shadows: Mapping[str, ShadowSet] = field(default_factory=dict)
    waiting: str | None = None

    @property
    def stale(self) -> bool:
        """Serving something only a disk copy vouches for."""
        return self.snapshot is not None and bool(self.last_good.unconfirmed)


def unknown_handles(permissions: PermissionSet, catalogs: Iterable[Catalog]) -> list[str]:
    """The handles `permissions` uses that none of `catalogs` has, sorted."""
    known = frozenset(h for c in catalogs for h in c.handles())
    return sorted(permissions.handles() - known)


def _unknown(handles: Iterable[str]) -> str:
    return f"handles not in any catalog: {', '.join(handles)} (register them in the owning service's catalog)"


def check_handles(permissions: PermissionSet, catalogs: Iterable[Catalog], document: str) -> None:
    """Refuse `permissions` (named `document`, e.g. "shadow set v2") if a catalog lacks a handle it uses."""
    unknown = unknown_handles(permissions, catalogs)
    if unknown:
        raise DocumentError(_unknown(unknown), document=document, field="roles", value=unknown)


def _restore(
    unknown: list[str], chosen: Mapping[str, Catalog], last: LastGood, version: str
) -> tuple[dict[str, Catalog], list[Refusal]] | None:
    """The catalogs with those that dropped `unknown` handles put back to their last good
    version, and the refusals that say so; None if last good catalogs do not cover them all."""
    missing = set(unknown)
    restored = dict(chosen)
    refusals = []
    for document, catalog in last.catalogs.items():
        current = chosen.get(document)
        if current is catalog or not (catalog.handles() & missing):
            continue
        dropped = sorted(catalog.handles() & missing)
        restored[document] = catalog
        missing -= catalog.handles()
        what = "was removed" if current is None else f"drops {', '.join(dropped)}"
        refusals.append(
            Refusal(
                "catalog",
                document,
                f"{what}, but the active set {version} grants {', '.join(dropped)}; "
                "take them out of the active set first (the last good catalog stays)",
            )
        )
    return (restored, refusals) if not missing else None


def _take_catalogs(
    catalogs: Iterable[Read[Catalog]], last: LastGood, refusals: list[Refusal]
) -> tuple[dict[str, Catalog], set[str]]:
    """Each parsed catalog is taken; a refused one keeps its document's last good catalog.
    Returns the catalogs by document and the documents that fell back."""
    chosen: dict[str, Catalog] = {}
    fallen_back: set[str] = set()
    for read in catalogs:
        if isinstance(read.value, Refusal):
            refusals.append(read.value)
            kept = last.catalogs.get(read.document)
            if kept is not None:
                chosen[read.document] = kept
                fallen_back.add(read.document)
        else:
            chosen[read.document] = read.value
    return chosen, fallen_back


@dataclass(slots=True)
class _Active:
    read: Read[PermissionSet]
    permissions: PermissionSet
    catalogs: dict[str, Catalog]


def _take_active(
    active: Read[PermissionSet] | None,
    chosen: dict[str, Catalog],
    last: LastGood,
    refusals: list[Refusal],
    fallen_back: set[str],
) -> _Active | str:
    """The active set read if every handle it grants is in a catalog (putting back catalogs that
    dropped some), else the last good one on the same terms; else why there is none."""
    candidates: list[tuple[Read[PermissionSet], PermissionSet]] = []
    waiting = ""
    if active is not None:
        if isinstance(active.value, Refusal):
            refusals.append(active.value)
            waiting = str(active.value)
        else:
            candidates.append((active, active.value))
    if last.active is not None and not isinstance(last.active.value, Refusal):
        candidates.append((last.active, last.active.value))
    for candidate, permissions in candidates:
        unknown = unknown_handles(permissions, chosen.values())
        restored = _restore(unknown, chosen, last, permissions.version) if unknown else (chosen, [])
        if restored is None:
            refusal = Refusal("active", candidate.document, _unknown(unknown))
            if candidate is active:
                refusals.append(refusal)
            waiting = waiting or str(refusal)
            continue
        catalogs, restoring = restored
        refused = {r.document for r in refusals}
        refusals.extend(r for r in restoring if r.document not in refused)
        fallen_back.update(r.document for r in restoring)
        return _Active(candidate, permissions, catalogs)
    return waiting


def _take_shadows(
    shadows: Iterable[Read[ShadowSet]], active: PermissionSet, known: frozenset[str], refusals: list[Refusal]
) -> dict[str, ShadowSet]:
    """In version order, each shadow against the active set, the catalogs and the shadows taken
    before it: a repeated version, an unknown handle, a region's weights over 100 or a cohort's
    role the active set lacks leave it out."""
    parsed: list[tuple[str, ShadowSet]] = []
    for read in shadows:
        if isinstance(read.value, Refusal):
            refusals.append(read.value)
        else:
            parsed.append((read.document, read.value))
    seen = {active.version}
    totals: dict[str, int] = {}
    taken: dict[str, ShadowSet] = {}
    for document, shadow in sorted(parsed, key=lambda item: (version_key(item[1].version), item[0])):
        reason = _shadow_problem(shadow, active, seen, known, totals)
        if reason is not None:
            refusals.append(Refusal("shadow", document, reason))
            continue
        seen.add(shadow.version)
        for region, weight in shadow.rollout.weights.items():
            totals[region] = totals.get(region, 0) + weight
        taken[document] = shadow
    return taken


def _shadow_problem(
    shadow: ShadowSet, active: PermissionSet, seen: set[str], known: frozenset[str], totals: Mapping[str, int]
) -> str | None:
    if shadow.version == active.version:
        return f"version {shadow.version!r} is the active set's"
    if shadow.version in seen:
        return f"version {shadow.version!r} is used by another shadow"
    unknown = sorted(shadow.permissions.handles() - known)
    if unknown:
        return f"roles: {_unknown(unknown)}"
    over = regions_over_100(totals, shadow.rollout.weights)
    if over:
        region, total = over[0]
        return (
            f"weights.{region}: canary weights in region {region!r} sum to {total} (over 100) "
            "with the shadows before it in version order"
        )
    # A stale shadow's cohort decides nobody: what roles it names no longer matters.
    missing = [] if is_stale(shadow, active.version) else missing_roles(shadow.rollout.cohorts, active.roles)
    if missing:
        return f"cohorts.{missing[0][0]}: {describe_missing(missing, active.roles, active.version)}"
    return None


def assemble(
    active: Read[PermissionSet] | None,
    shadows: Iterable[Read[ShadowSet]],
    catalogs: Iterable[Read[Catalog]],
    *,
    last: LastGood | None = None,
    found: Iterable[Refusal] = (),
    service: str | None = "",
    region: str = "",
    revision: int = 0,
    source: str = "",
    cache: CompileCache | None = None,
    no_active: str = "no active set yet",
    no_catalog: str = "no catalog registered yet",
) -> Assembly:
    """Take or refuse each document (see the module docstring) and build the snapshot.

    `active` None: there is no active set (`no_active` says so). `found` are refusals the source
    made before parsing (pointers). `service` None means the service of the first catalog (the
    policy directory's own ``catalog.yaml``).
    """
    last = last if last is not None else LastGood()
    refusals = list(found)
    chosen, fallen_back = _take_catalogs(catalogs, last, refusals)
    if active is None and last.active is None:
        return Assembly(None, tuple(refusals), last, waiting=no_active)
    if not chosen and not last.catalogs:
        if active is not None and isinstance(active.value, Refusal):
            refusals.append(active.value)
        return Assembly(None, tuple(refusals), last, waiting=no_catalog)
    taken = _take_active(active, chosen, last, refusals, fallen_back)
    if isinstance(taken, str):
        return Assembly(None, tuple(refusals), last, waiting=taken or no_active)
    chosen = taken.catalogs
    known = frozenset(h for c in chosen.values() for h in c.handles())
    kept_shadows = _take_shadows(shadows, taken.permissions, known, refusals)
    unconfirmed = {d for d in fallen_back if d in last.unconfirmed}
    if taken.read is not active and ACTIVE_SLOT in last.unconfirmed:
        unconfirmed.add(ACTIVE_SLOT)
    try:
        snapshot = build_snapshot(
            taken.permissions,
            kept_shadows.values(),
            chosen.values(),
            service=service if service is not None else next(iter(chosen.values())).service,
            region=region,
            revision=revision,
            source=source,
            cache=cache,
        )
    except DocumentError as exc:
        # Every rule build_snapshot checks was checked above; a rule added there alone must still
        # leave the last good snapshot serving rather than end the source.
        return Assembly(None, tuple(refusals), last, waiting=str(exc))
    good = LastGood(active=taken.read, catalogs=chosen, unconfirmed=frozenset(unconfirmed))
    return Assembly(snapshot, tuple(refusals), good, kept_shadows)
