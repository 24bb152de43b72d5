"""The disk copy of the last good snapshot: whole, one writer at a time, newest last, and only what is
new written again."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import threading
from pathlib import Path

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
    assert sorted(_files(disk)) == [hashlib.sha256(payload + b"96").hexdigest()]


def test_an_older_revision_never_replaces_a_newer_one(tmp_path: Path) -> None:
    disk = DiskCopy(tmp_path / "copy.json", "/authz")
    disk.save({"/authz/a": b"new"}, 10)
    disk.save({"/authz/a": b"old"}, 9)
    assert disk.load() == ({"/authz/a": b"new"}, 10)


def _files(disk: DiskCopy) -> dict[str, int]:
    """The values' files, by name, with their inode numbers (a file written again has a new one)."""
    return {entry.name: entry.inode() for entry in os.scandir(disk.values)}


def test_a_save_writes_only_the_values_that_are_new(tmp_path: Path) -> None:
    """A proposal shares most of its chunks with the set it was made from; the save after its
    install must not write again what the copy already holds (it rewrote ~150 MB for two
    million-grant sets, while Checks waited for the cores). Big values are files named by their
    digest, kept while named; small ones are inline; what no copy names is removed."""
    disk = DiskCopy(tmp_path / "copy.json", "/authz")
    chunks = {f"/authz/sets/v1/abc/{i:05d}": bytes([i]) * 300_000 for i in range(20)}
    kv = {**chunks, "/authz/pointers/active": b'{"version": "v1"}'}
    assert disk.save(kv, 7)
    first = _files(disk)
    assert len(first) == 20  # the pointer is inline
    changed = dict(kv)
    changed["/authz/sets/v1/abc/00005"] = b"y" * 300_000
    del changed["/authz/sets/v1/abc/00019"]
    changed["/authz/pointers/active"] = b'{"version": "v2"}'
    assert disk.save(changed, 8)
    second = _files(disk)
    gone = ("/authz/sets/v1/abc/00005", "/authz/sets/v1/abc/00019")
    old = {hashlib.sha256(kv[key]).hexdigest() for key in gone}
    new = hashlib.sha256(b"y" * 300_000).hexdigest()
    assert set(second) == (set(first) - old) | {new}
    assert all(second[name] == first[name] for name in second if name != new)  # not written again
    assert disk.load() == (changed, 8)


def test_a_copy_missing_or_altering_a_value_is_not_served(tmp_path: Path) -> None:
    """The copy is served whole or not at all: a value's file gone or changed on disk makes it
    unreadable (the sidecar then waits for etcd, denying), never a set with a hole in it."""
    disk = DiskCopy(tmp_path / "copy.json", "/authz")
    kv = {"/authz/sets/v1/abc/00000": b"a" * 100_000, "/authz/sets/v1/abc/00001": b"b" * 100_000}
    disk.save(kv, 3)
    a, b = (disk.values / hashlib.sha256(v).hexdigest() for v in kv.values())
    b.write_bytes(b"c" * 100_000)
    assert disk.load() is None
    b.unlink()
    assert disk.load() is None
    a.unlink()
    disk.save(kv, 4)  # a save puts back what is missing
    assert disk.load() == (kv, 4)


def test_a_copy_written_by_the_previous_format_still_loads(tmp_path: Path) -> None:
    """A sidecar upgraded while etcd is down still has its copy to serve."""
    path = tmp_path / "copy.json"
    kv = {"/authz/pointers/active": b'{"version": "v1"}', "/authz/sets/v1/abc/00000": b"x" * 70_000}
    encoded = {k: base64.b64encode(v).decode() for k, v in kv.items()}
    path.write_text(json.dumps({"format": 1, "prefix": "/authz", "revision": 5, "saved_at": 0, "kvs": encoded}))
    assert DiskCopy(path, "/authz").load() == (kv, 5)
    assert DiskCopy(path, "/other").load() is None
