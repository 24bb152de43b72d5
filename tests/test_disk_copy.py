"""The disk copy of the last good snapshot is written whole, one writer at a time, newest last."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import IO

import pytest

from authz_sidecar.store.sources.diskcopy import DiskCopy


def test_racing_saves_leave_the_newest_revision_whole(tmp_path: Path) -> None:
    """Eight threads save 96 revisions in a shuffled order at once: the file ends at the newest
    revision, parses, holds that revision's keys, and no temporary file is left behind."""
    path = tmp_path / "copy.json"
    disk = DiskCopy(path, "/authz")
    revisions = list(range(1, 97))
    random.Random(13).shuffle(revisions)  # noqa: S311 - a fixed order, not a secret
    # Big enough values that writes overlap in time.
    payload = b"x" * 300_000
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(mine: list[int]) -> None:
        barrier.wait()
        for revision in mine:
            try:
                disk.save({"/authz/pointers/active": payload + str(revision).encode()}, revision)
            except BaseException as exc:  # every failure is reported by the assertion below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(revisions[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    loaded = disk.load()
    assert loaded is not None
    kv, revision = loaded
    assert revision == 96 and kv["/authz/pointers/active"] == payload + b"96"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_an_older_revision_never_replaces_a_newer_one(tmp_path: Path) -> None:
    disk = DiskCopy(tmp_path / "copy.json", "/authz")
    disk.save({"/authz/a": b"new"}, 10)
    disk.save({"/authz/a": b"old"}, 9)
    assert disk.load() == ({"/authz/a": b"new"}, 10)


def test_a_large_copy_is_written_a_value_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy of a million-grant set is ~150 MB of JSON. Encoded and written as one string it
    was one C call holding the GIL for 0.2-0.5 s after every install, while Checks waited; so no
    write (and no string built for one) may be much more than one value, and the file still loads
    as the keys saved."""
    writes: list[int] = []
    real_fdopen = os.fdopen

    class Recording:
        def __init__(self, out: IO[str]) -> None:
            self.out = out

        def write(self, text: str) -> int:
            writes.append(len(text))
            return self.out.write(text)

        def __getattr__(self, name: str) -> object:
            return getattr(self.out, name)

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.out.close()

    def fdopen(fd: int, mode: str = "r", encoding: str | None = None) -> Recording:
        return Recording(real_fdopen(fd, mode, encoding=encoding))

    monkeypatch.setattr(os, "fdopen", fdopen)
    kv = {f"/authz/sets/v1/abc/{i:05d}": bytes([i]) * 300_000 for i in range(20)} | {"/authz/pointers/active": b"v1"}
    disk = DiskCopy(tmp_path / "copy.json", "/authz")
    assert disk.save(kv, 7)
    assert writes and max(writes) <= 500_000  # one value's base64 (400,000 characters) and its key
    assert disk.load() == (kv, 7)
