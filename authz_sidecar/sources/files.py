"""A policy source backed by a directory, for local development and tests.

Layout::

    DIR/active.yaml          the active permission set
    DIR/shadows/*.yaml       live shadow sets (one per file), with weights and testers
    DIR/catalog.yaml         this service's catalog (handles it owns, routes)
    DIR/catalogs/*.yaml      other services' catalogs, whose handles sets may also use

``--catalog FILE`` adds one more catalog file. The directory is polled: a change to any file's
size, mtime or inode (including files appearing or disappearing) rebuilds the snapshot. Polling is
used rather than inotify because it behaves the same on every filesystem, including bind mounts
and ConfigMap symlink swaps, and a directory of a few files costs microseconds to stat.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from authz_sidecar.documents import (
    Catalog,
    ShadowSet,
    load_document,
    parse_catalog,
    parse_permission_set,
    parse_shadow,
)
from authz_sidecar.errors import DocumentError
from authz_sidecar.snapshot import CompileCache, Snapshot, build_snapshot, paused_gc
from authz_sidecar.state import SnapshotStore

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
        self._documents: dict[Path, tuple[tuple[int, int, int], object]] = {}
        self._compiled = CompileCache()

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

    def _parsed(self, path: Path, parse: Callable[[Any, str], _Doc]) -> _Doc:
        """Parse a file, or return the object parsed last time if the file has not changed since.

        Returning the same object lets the CompileCache skip compiling it again."""
        try:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        cached = self._documents.get(path)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]  # type: ignore[return-value]
        document = parse(self._read(path), str(path))
        if stamp is not None:
            self._documents[path] = (stamp, document)
        return document

    def load(self) -> Snapshot:
        """Read and validate every file; raise DocumentError naming the first bad one."""
        with paused_gc():
            return self._load()

    def _load(self) -> Snapshot:
        d = self.directory
        active = self._parsed(d / "active.yaml", parse_permission_set)
        if not active.meta.version:
            raise DocumentError("the active set needs a version", document=str(d / "active.yaml"), field="version")
        shadows: list[ShadowSet] = [self._parsed(p, parse_shadow) for p in _files(d / "shadows")]
        catalog_paths = [d / "catalog.yaml", *_files(d / "catalogs"), *self.extra_catalogs]
        catalogs: list[Catalog] = [parse_catalog(self._read(p), str(p)) for p in catalog_paths if p.exists()]
        if not catalogs:
            raise DocumentError("no catalog: expected catalog.yaml", document=str(d))
        self._generation += 1
        snapshot = build_snapshot(
            active,
            shadows,
            catalogs,
            service=self.service or catalogs[0].service,
            region=self.region,
            revision=self._generation,
            source=self.describe(),
            cache=self._compiled,
        )
        self._compiled.retain([active, *(s.permissions for s in shadows)])
        live = {d / "active.yaml", *_files(d / "shadows")}
        self._documents = {p: v for p, v in self._documents.items() if p in live}
        return snapshot

    async def run(self, store: SnapshotStore) -> None:
        store.source_state = "local"
        seen: tuple[tuple[str, int, int, int], ...] | None = None
        while True:
            current = await asyncio.to_thread(self.fingerprint)
            store.heard()  # the directory answered: nothing to be stale about
            if current != seen:
                seen = current
                # Parse off the loop so Checks keep flowing; install on it, where listeners live.
                try:
                    snapshot = await asyncio.to_thread(self.load)
                except DocumentError as exc:
                    store.reject(str(exc))
                else:
                    store.install(snapshot)
            await asyncio.sleep(self.interval)


def write_atomically(path: Path, text: str) -> None:
    """Replace a file in one rename, so the poller never reads a half-written document."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
