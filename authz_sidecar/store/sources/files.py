"""A policy source backed by a directory, for local development and tests.

Layout::

    DIR/active.yaml          the active permission set
    DIR/shadows/*.yaml       live shadow sets (one per file), with weights and testers
    DIR/catalog.yaml         this service's catalog (handles it owns, routes)
    DIR/catalogs/*.yaml      other services' catalogs, whose handles sets may also use

``--catalog FILE`` adds one more catalog file. Each file is taken or refused on its own
(:mod:`authz_sidecar.model.assembly`): an invalid shadow file is left out, an invalid ``active.yaml`` or
catalog file keeps its last good version, and the valid files beside them still apply.

The directory is polled: a change to any file's size, mtime or inode (including files appearing
or disappearing) rebuilds the snapshot. Polling is used rather than inotify because it behaves the
same on every filesystem, including bind mounts and ConfigMap symlink swaps, and a directory of a
few files costs microseconds to stat.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import load_document, parse_catalog, parse_permission_set, parse_shadow
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.assembly import Assembly, LastGood, Read, Refusal, assemble
from authz_sidecar.model.snapshot import CompileCache, Snapshot, paused_gc
from authz_sidecar.model.values import PermissionSet

_PATTERNS = ("*.yaml", "*.yml", "*.json")
_Doc = TypeVar("_Doc")


def _files(directory: Path) -> list[Path]:
    return sorted(p for pattern in _PATTERNS for p in directory.glob(pattern))


class FilePolicySource:
    def __init__(
        self,
        directory: Path,
        *,
        service: str = "",
        region: str = "",
        extra_catalogs: tuple[Path, ...] = (),
        interval: float = 0.5,
    ) -> None:
        self.directory = directory
        self.service = service
        self.region = region
        self.extra_catalogs = extra_catalogs
        self.interval = interval
        self._generation = 0
        # The last assembly load() made: the documents behind its snapshot (validate runs cases on them).
        self.assembled: Assembly | None = None
        self._documents: dict[Path, tuple[tuple[int, int, int], object]] = {}
        self._compiled = CompileCache()
        # The documents that served last: an invalid active set or catalog falls back on them.
        self.last = LastGood()

    def describe(self) -> str:
        return f"files:{self.directory}"

    def _watched(self) -> list[Path]:
        d = self.directory
        return [
            d / "active.yaml",
            d / "catalog.yaml",
            *_files(d / "shadows"),
            *_files(d / "catalogs"),
            *self.extra_catalogs,
        ]

    def fingerprint(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        for path in self._watched():
            try:
                st = path.stat()
            except FileNotFoundError:
                out.append((str(path), -1, -1, -1))
            else:
                out.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(out)

    def _read(self, path: Path) -> object:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DocumentError("file not found", document=str(path)) from None
        except OSError as exc:
            raise DocumentError(f"cannot read: {exc.strerror}", document=str(path)) from None
        return load_document(data, str(path))

    def _parsed(self, path: Path, parse: Callable[[Any, str], _Doc], kind: str) -> Read[_Doc]:
        """Parse a file, or return the object parsed last time if the file has not changed since;
        a file that does not parse is returned as its refusal.

        Returning the same object lets the CompileCache skip compiling it again."""
        try:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        cached = self._documents.get(path)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return Read(str(path), cached[1])  # type: ignore[arg-type]
        try:
            document = parse(self._read(path), str(path))
        except DocumentError as exc:
            return Read(str(path), Refusal.of(kind, exc, str(path)))
        if stamp is not None:
            self._documents[path] = (stamp, document)
        return Read(str(path), document)

    def load(self) -> Snapshot:
        """Read and validate every file; raise DocumentError naming the first bad one (``validate``)."""
        assembly = self.assembled = self.assemble()
        if assembly.refusals:
            first = assembly.refusals[0]
            raise DocumentError(first.reason, document=first.document)
        if assembly.snapshot is None:
            raise DocumentError(assembly.waiting or "nothing to serve", document=str(self.directory))
        return assembly.snapshot

    def assemble(self) -> Assembly:
        """Read every file and take or refuse each one on its own (:func:`assemble`), falling back
        on the documents that served last time."""
        with paused_gc():
            return self._assemble()

    def _assemble(self) -> Assembly:
        d = self.directory
        active = self._parsed(d / "active.yaml", _versioned_set, "active")
        shadows = [self._parsed(p, parse_shadow, "shadow") for p in _files(d / "shadows")]
        catalog_paths = [d / "catalog.yaml", *_files(d / "catalogs"), *self.extra_catalogs]
        catalogs = [self._parsed(p, parse_catalog, "catalog") for p in catalog_paths if p.exists()]
        self._generation += 1
        assembly = assemble(
            active,
            shadows,
            catalogs,
            last=self.last,
            service=self.service or None,
            region=self.region,
            revision=self._generation,
            source=self.describe(),
            cache=self._compiled,
            no_catalog=f"no catalog: expected {d / 'catalog.yaml'}",
        )
        if assembly.snapshot is not None:
            self.last = assembly.last_good
        good = self.last.active.value if self.last.active is not None else None
        self._compiled.retain(
            [*([good] if isinstance(good, PermissionSet) else []), *(s.permissions for s in assembly.shadows.values())]
        )
        live = set(catalog_paths) | {d / "active.yaml", *_files(d / "shadows")}
        self._documents = {p: v for p, v in self._documents.items() if p in live}
        return assembly

    async def run(self, store: SnapshotStore) -> None:
        store.source_state = "local"
        seen: tuple[tuple[str, int, int, int], ...] | None = None
        while True:
            current = await asyncio.to_thread(self.fingerprint)
            store.heard()  # the directory answered: nothing to be stale about
            if current != seen:
                seen = current
                # Parse off the loop so Checks keep flowing; install on it, where listeners live.
                assembly = await asyncio.to_thread(self.assemble)
                store.refusals(assembly.refusals)
                if assembly.snapshot is not None:
                    store.install(assembly.snapshot)
                    store.advance(assembly.snapshot.revision)
                else:
                    store.unavailable(assembly.waiting or "nothing to serve")
            await asyncio.sleep(self.interval)


def _versioned_set(data: Any, document: str) -> PermissionSet:
    """The active set, which must name its version."""
    permissions = parse_permission_set(data, document)
    if not permissions.meta.version:
        raise DocumentError("the active set needs a version", document=document, field="version")
    return permissions


def write_atomically(path: Path, text: str | Iterable[str], *, durable: bool = False, mode: int | None = None) -> None:
    """Replace a file in one rename, so a reader never sees a half-written document.

    `text` may come in parts, written one at a time: encoding and writing one string of a hundred
    megabytes is a C call that holds the GIL for as long (the disk copy of a large set).

    The temporary file has a name of its own (in the same directory, so the rename stays on one
    filesystem): writers in several threads or processes never write into each other's file.
    `durable` flushes the bytes to disk before the rename, so a crash leaves the old file or the
    new one, never an empty one. `mode` is set before the rename (mkstemp's is 0o600), so the file
    never appears with another."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for part in (text,) if isinstance(text, str) else text:
                out.write(part)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:  # the rename itself is on disk once the directory is
        fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (files created or renamed in it) to disk."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
