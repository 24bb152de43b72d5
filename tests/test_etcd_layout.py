"""The etcd key layout, pure: chunks, heads and pointers written and read back, and every way a
stored value can be wrong is a DocumentError (which keeps the last good snapshot serving)."""

from __future__ import annotations

import pytest

from authz_sidecar.errors import DocumentError
from authz_sidecar.model.values import Rollout
from authz_sidecar.store import layout
from authz_sidecar.store.layout import Layout


def stored(version: str, document: bytes, lay: Layout) -> dict[str, bytes]:
    head, chunks = layout.split(version, document)
    kv = {lay.chunk(version, head.sha256, i): c for i, c in enumerate(chunks)}
    kv[lay.head(version)] = head.encode()
    return kv


def test_a_document_over_the_value_limit_is_chunked_and_joined_back() -> None:
    lay = Layout("/t")
    document = bytes(range(256)) * (layout.CHUNK_BYTES // 256 * 2 + 7)
    kv = stored("v1", document, lay)
    assert len(kv) == 4  # three chunks and the head
    assert all(len(v) <= layout.CHUNK_BYTES for v in kv.values())
    assert layout.join(kv, lay, "v1") == document


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
        del kv[lay.chunk("v1", head.sha256, 1)]
    elif damage == "changed_chunk":
        kv[lay.chunk("v1", head.sha256, 1)] = b"y" * 10
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
