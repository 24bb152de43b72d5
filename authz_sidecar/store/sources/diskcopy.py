"""The disk copy of the last good snapshot: the etcd keys it was made of, in one JSON file.

A sidecar restarted while etcd is unreachable, or while etcd's data does not build, serves from it
(marked stale) instead of denying everything (see :mod:`authz_sidecar.store.sources.etcd`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog

from authz_sidecar.model.pacing import Demand, Pacer, pacing, pause
from authz_sidecar.store.sources.files import write_atomically

log = structlog.get_logger("authz_sidecar.store.sources.diskcopy")

CACHE_FORMAT = 1


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


# Bytes of a value encoded at a time (a multiple of 3, so that the pieces' base64 is the whole's).
_SLICE = 3 * 64 * 1024


def _json_parts(head: Mapping[str, object], kv: Mapping[str, bytes]) -> Iterator[str]:
    """The copy's JSON, ``head`` with the keys under "kvs" (base64), a slice of a value at a time:
    the copy of a million-grant set is ~150 MB, and ``json.dumps`` of it whole held the GIL
    0.2-0.5 s after every install while Checks waited (a 1 MiB value at a time, 3-5 ms). Base64
    needs no escaping in JSON."""
    yield json.dumps(head)[:-1] + ', "kvs": {'
    for i, (key, value) in enumerate(kv.items()):
        yield f'{", " if i else ""}{json.dumps(key)}: "'
        view = memoryview(value)
        for at in range(0, len(view), _SLICE):
            pause()
            yield base64.b64encode(view[at : at + _SLICE]).decode("ascii")
        yield '"'
    yield "}}"


class DiskCopy:
    """The keys of the last good snapshot, in one JSON file replaced atomically.

    Saves run in worker threads, several at once when changes come fast. Each writes a temporary
    file of its own and renames it over the copy while holding the copy's locks (this object's,
    and an ``flock`` on a lock file beside the copy, for another process given the same file),
    and a save older than the newest this object has written is dropped: racing saves never leave
    an older revision, nor a half-written file. Order is (generation, revision): the source starts
    a new generation when it finds etcd replaced or restored, whose revisions start again lower.
    """

    def __init__(self, path: Path, prefix: str, *, demand: Demand | None = None) -> None:
        self.path = path
        self.prefix = prefix
        self.demand = demand
        self._lock = threading.Lock()
        self._newest: tuple[int, int] | None = None

    def save(self, kv: Mapping[str, bytes], revision: int, *, generation: int = 0) -> bool:
        """Write the copy; False if a newer one was written already (this save is dropped)."""
        order = (generation, revision)
        with self._lock:
            if self._newest is not None and order < self._newest:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            head = {"format": CACHE_FORMAT, "prefix": self.prefix, "revision": revision, "saved_at": time.time()}
            # Paced: a save follows every install, beside the threads answering Checks.
            with _exclusive(self.path.with_name(f".{self.path.name}.lock")), pacing(Pacer(demand=self.demand)):
                write_atomically(self.path, _json_parts(head, kv), durable=True)
            self._newest = order
            return True

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
