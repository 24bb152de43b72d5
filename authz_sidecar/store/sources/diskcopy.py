"""The disk copy of the last good snapshot: the etcd keys it was made of, on disk.

A sidecar restarted while etcd is unreachable, or while etcd's data does not build, serves from it
(marked stale) instead of denying everything (see :mod:`authz_sidecar.store.sources.etcd`).

A set's chunks are most of it (~56 MB per million grants) and do not change: a set is immutable, and
a proposal shares most of its chunks with the set it was made from. So each value of 64 KiB or more
is a file of its own, named by its SHA-256, written once and kept while a copy names it; a small
manifest (the keys, the small values inline, the big ones by digest) is replaced atomically on
every save. The save after a proposal's install writes the chunks that are new and the manifest,
where it rewrote (and base64-encoded) the whole copy, ~150 MB for two million-grant sets, while
Checks waited for the cores (docs/performance.md, "Seventh round").
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog

from authz_sidecar.model.pacing import Demand, Pacer, pacing, pause
from authz_sidecar.store.layout import is_sha256
from authz_sidecar.store.sources.files import fsync_directory, write_atomically

log = structlog.get_logger("authz_sidecar.store.sources.diskcopy")

# 1: one JSON file, every value in base64 (still read, so that an upgraded sidecar keeps its copy).
CACHE_FORMAT = 2
# Values this big or bigger are files of their own (a set's chunks); smaller ones (pointers,
# catalogs, heads) are inline in the manifest.
OWN_FILE_BYTES = 64 * 1024
# Bytes written to a value's file at a time (each write releases the GIL; between them, a pause).
_SLICE = 1024 * 1024


class CopyError(Exception):
    """A disk copy that cannot be read as a whole (a value's file missing or not its digest)."""


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed): one writer at a time, across
    threads and processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class DiskCopy:
    """The keys of the last good snapshot: a manifest replaced atomically, big values in files of
    their own beside it (``<copy>.values/<sha256>``), written once.

    Saves run in worker threads, several at once when changes come fast. Each runs while holding
    the copy's locks (this object's, and an ``flock`` on a lock file beside the copy, for another
    process given the same file): it writes the values' files it lacks (each durable before the
    manifest that names it), renames a manifest of its own over the copy, then removes the files no
    longer named. A save older than the newest this object has written is dropped: racing saves
    never leave an older revision, nor a half-written copy. Order is (generation, revision): the
    source starts a new generation when it finds etcd replaced or restored, whose revisions start
    again lower.
    """

    def __init__(self, path: Path, prefix: str, *, demand: Demand | None = None) -> None:
        self.path = path
        self.prefix = prefix
        self.demand = demand
        self.values = path.with_name(f"{path.name}.values")
        self._lock = threading.Lock()
        self._newest: tuple[int, int] | None = None
        # id(value) -> (value, its digest): the mirror keeps an unchanged value as the same bytes
        # object, so a save hashes only the values that are new since the last one.
        self._digests: dict[int, tuple[bytes, str]] = {}

    def save(self, kv: Mapping[str, bytes], revision: int, *, generation: int = 0) -> bool:
        """Write the copy; False if a newer one was written already (this save is dropped)."""
        order = (generation, revision)
        with self._lock:
            if self._newest is not None and order < self._newest:
                return False
            self.values.mkdir(parents=True, exist_ok=True)
            # Paced: a save follows every install, beside the threads answering Checks.
            with _exclusive(self.path.with_name(f".{self.path.name}.lock")), pacing(Pacer(demand=self.demand)):
                inline, files = self._write_values(kv)
                manifest = {
                    "format": CACHE_FORMAT,
                    "prefix": self.prefix,
                    "revision": revision,
                    "saved_at": time.time(),
                    "kvs": inline,
                    "files": files,
                }
                write_atomically(self.path, json.dumps(manifest), durable=True)
                self._remove_unnamed(set(files.values()))
            self._newest = order
            return True

    def _digest(self, value: bytes) -> str:
        known = self._digests.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        digest = hashlib.sha256(value).hexdigest()  # (the GIL is released over large values)
        self._digests[id(value)] = (value, digest)
        return digest

    def _write_values(self, kv: Mapping[str, bytes]) -> tuple[dict[str, str], dict[str, str]]:
        """The small values in base64, and the big ones' digests, each big one's file written if
        it is not there yet; durable before the manifest names them."""
        inline: dict[str, str] = {}
        files: dict[str, str] = {}
        digests: dict[int, tuple[bytes, str]] = {}
        written = False
        for key, value in kv.items():
            if len(value) < OWN_FILE_BYTES:
                inline[key] = base64.b64encode(value).decode("ascii")
                continue
            digest = self._digest(value)
            digests[id(value)] = (value, digest)
            files[key] = digest
            target = self.values / digest
            if not target.exists():
                self._write_value(target, value)
                written = True
            pause()
        self._digests = digests  # only what this copy names
        if written:
            fsync_directory(self.values)
        return inline, files

    @staticmethod
    def _write_value(target: Path, value: bytes) -> None:
        tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as out:
                view = memoryview(value)
                for at in range(0, len(view), _SLICE):
                    out.write(view[at : at + _SLICE])
                    pause()
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remove_unnamed(self, named: set[str]) -> None:
        """Files no copy names any more (and temporary ones a crashed save left)."""
        for entry in os.scandir(self.values):
            if entry.name not in named:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def load(self) -> tuple[dict[str, bytes], int] | None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("prefix") != self.prefix:
                return None
            if data.get("format") == 1:
                return {k: base64.b64decode(v) for k, v in data["kvs"].items()}, int(data["revision"])
            if data.get("format") != CACHE_FORMAT:
                return None
            kv = {k: base64.b64decode(v) for k, v in data["kvs"].items()}
            for key, digest in data["files"].items():
                kv[key] = self._read_value(str(digest))
            return kv, int(data["revision"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CopyError) as exc:
            log.warning("disk_copy_unreadable", path=str(self.path), error=str(exc))
            return None

    def _read_value(self, digest: str) -> bytes:
        if not is_sha256(digest):
            raise CopyError(f"the copy names a value {digest!r}, which is no SHA-256")
        try:
            value = (self.values / digest).read_bytes()
        except FileNotFoundError:
            raise CopyError(f"the value {digest} the copy names is missing from {self.values}") from None
        if hashlib.sha256(value).hexdigest() != digest:
            raise CopyError(f"the value {digest} in {self.values} is not what the copy names")
        return value
