"""The etcd key layout, pure: chunks, heads and pointers written and read back, and every way a
stored value can be wrong is a DocumentError (which keeps the last good snapshot serving)."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from authz_sidecar.documents import dump_permission_set
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import Grant, Metadata, PermissionSet, Rollout
from authz_sidecar.store import layout
from authz_sidecar.store.layout import Layout


def stored(version: str, document: bytes, lay: Layout) -> dict[str, bytes]:
    return lay.set_keys(version, document)


def test_a_document_over_the_value_limit_is_chunked_and_joined_back() -> None:
    lay = Layout("/t")
    document = random.Random(7).randbytes(layout.CHUNK_BYTES * 2 + 7)  # noqa: S311 - no grant to cut at
    kv = stored("v1", document, lay)
    assert len(kv) == 4  # three chunks and the head
    assert all(len(v) <= layout.CHUNK_BYTES for v in kv.values())
    assert layout.join(kv, lay, "v1") == document


def _set_document(version: str, editors: set[int], principals: int = 60_000) -> bytes:
    grants = [
        Grant(f"user-{i:06d}", ("editor",) if i in editors else ("viewer",), f"account:a{i % 7}" if i % 5 else None)
        for i in range(principals)
    ]
    roles = {"viewer": ("things:view",), "editor": ("things:view", "things:edit")}
    meta = Metadata(version=version, parent="v1" if version != "v1" else "", reason=f"make {version}")
    return dump_permission_set(PermissionSet(roles=roles, grants=tuple(grants), meta=meta))


def test_a_proposal_shares_every_chunk_its_changes_do_not_fall_in() -> None:
    """A set is cut where its grants' text says, so three principals changed across a set of
    ~4 MB (what ctl propose writes) leave every other chunk as the parent's: the proposal stores
    and ships those few, not the whole set again."""
    lay = Layout("/t")
    parent = _set_document("v1", set())
    child = _set_document("v2", {10, 30_000, 59_990})
    parent_kv, child_kv = stored("v1", parent, lay), stored("v2", child, lay)
    chunk_keys = [k for k in child_kv if k.startswith(lay.chunks)]
    assert 10 <= len(chunk_keys) <= 30  # ~250 KiB each
    assert all(len(child_kv[k]) <= layout.CHUNK_BYTES for k in chunk_keys)
    new = [k for k in chunk_keys if k not in parent_kv]
    assert 1 <= len(new) <= 4  # (the first holds the metadata, and principal 10)
    assert layout.join({**parent_kv, **child_kv}, lay, "v2") == child


def test_cuts_are_content_defined_and_bounded() -> None:
    document = _set_document("v1", set())
    ends = layout.cuts(document)
    assert ends[-1] == len(document)
    sizes = [end - start for start, end in zip([0, *ends[:-2]], ends[:-1], strict=True)]
    assert all(layout.MIN_CHUNK_BYTES < size <= layout.CHUNK_BYTES for size in sizes)
    # Every cut but the last is between two grants.
    assert all(document[e - 1 : e + 15] == b'},{"principal":"' for e in ends[:-1])
    # Text in front moves no cut after the first: the same grants are cut at the same places.
    shifted = layout.cuts(b" " * 1000 + document)
    assert [e - 1000 for e in shifted[1:]] == ends[1:]


def test_a_set_written_by_the_earlier_release_is_still_read() -> None:
    """Chunks under the set's version, the head naming how many (what sets written before chunks
    were shared look like)."""
    lay = Layout("/t")
    document = _set_document("v1", set())
    digest = hashlib.sha256(document).hexdigest()
    parts = [document[i : i + layout.CHUNK_BYTES] for i in range(0, len(document), layout.CHUNK_BYTES)]
    kv = {lay.indexed_chunk("v1", digest, i): part for i, part in enumerate(parts)}
    head = {"version": "v1", "sha256": digest, "bytes": len(document), "chunks": len(parts)}
    kv[lay.head("v1")] = json.dumps(head).encode()
    assert layout.join(kv, lay, "v1") == document
    kv[lay.indexed_chunk("v1", digest, 1)] = parts[1][:-1] + b" "
    with pytest.raises(DocumentError, match="SHA-256"):
        layout.join(kv, lay, "v1")


@pytest.mark.parametrize("chunks", [[], ["abc"], [1], "x", None])
def test_a_head_naming_chunks_wrongly_is_refused(chunks: object) -> None:
    value = json.dumps({"version": "v1", "sha256": "0" * 64, "bytes": 1, "chunks": chunks}).encode()
    with pytest.raises(DocumentError, match="needs version, sha256, bytes and chunks"):
        layout.decode_head(value, "/t/sets/v1", "v1")


def test_empty_document_still_has_one_chunk() -> None:
    lay = Layout("/t")
    assert layout.join(stored("v1", b"", lay), lay, "v1") == b""


@pytest.mark.parametrize("damage", ["missing_head", "missing_chunk", "changed_chunk", "head_not_json", "head_other"])
def test_every_broken_stored_set_is_refused(damage: str) -> None:
    lay = Layout("/t")
    document = b"x" * (layout.CHUNK_BYTES + 10)
    kv = stored("v1", document, lay)
    head, _ = layout.split("v1", document)
    if damage == "missing_head":
        del kv[lay.head("v1")]
    elif damage == "missing_chunk":
        del kv[lay.chunk(head.chunks[1])]
    elif damage == "changed_chunk":
        kv[lay.chunk(head.chunks[1])] = b"y" * 10
    elif damage == "head_not_json":
        kv[lay.head("v1")] = b"\xff\xfe"
    else:
        kv[lay.head("v1")] = layout.Head("v9", head.sha256, head.size, head.chunks).encode()
    with pytest.raises(DocumentError) as err:
        layout.join(kv, lay, "v1")
    assert err.value.document == lay.head("v1")


def test_pointers_round_trip_and_refuse_garbage() -> None:
    rollouts = {"v2": Rollout(weights={"us-east": 10}, testers=frozenset({"dave"}), state="canary")}
    assert layout.decode_shadows(layout.encode_shadows(rollouts), "k") == rollouts
    assert layout.decode_active(layout.encode_active("v7"), "k") == "v7"
    for bad in (b"v1", b'{"version": "*"}', b'{"version": "v1", "x": 1}', b"\xff"):
        with pytest.raises(DocumentError):
            layout.decode_active(bad, "k")
    for bad in (b"[]", b'{"v2": {"weights": {"us-east": 101}}}', b'{"v2": {"bogus": 1}}', b'{"bad version!": {}}'):
        with pytest.raises(DocumentError):
            layout.decode_shadows(bad, "k")


def test_prefix_is_normalised_and_root_refused() -> None:
    assert layout.normalise_prefix("authz/") == "/authz"
    assert layout.normalise_prefix("/a/b") == "/a/b"
    for bad in ("", "/", " // "):
        with pytest.raises(ValueError, match="empty"):
            layout.normalise_prefix(bad)
