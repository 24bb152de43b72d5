"""Where everything lives in etcd, and how documents are split into values and read back.

Pure: no I/O. The writer (:mod:`authz_sidecar.store.policy`) and the reader (the etcd policy source)
both go through these functions, so the layout is defined once. docs/etcd-layout.md describes it
for operators; the rules that matter for correctness:

- A permission set is immutable once written under its version. Its bytes are split into chunks of
  at most :data:`CHUNK_BYTES` (etcd refuses a request over 1.5 MiB by default), cut where the
  grants' own text says (:func:`split`), and each chunk is stored once under its own SHA-256
  (``<prefix>/chunks/<sha256>``), shared by every set that holds it: a proposal made from a set
  of a million grants shares all but the chunks its changes fall in.
- The set's head key (``<prefix>/sets/<version>``) names the document's digest and size and its
  chunks' digests, in order. It is written after every chunk it names, with a compare that it does
  not exist yet, so a head always describes chunks that are all there, and a version is written at
  most once. Chunks no head names are swept by ``ctl prune``; the sweep and the writers of heads
  both compare and bump one key (:attr:`Layout.chunks_epoch`), so a head is never written naming a
  chunk a sweep removed meanwhile.
- Which versions are live is said by two small pointer keys (``pointers/active``,
  ``pointers/shadows``), changed only in transactions that compare their mod revisions: a reader
  sees an old world or a new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz_sidecar.documents import check_version, parse_rollout
from authz_sidecar.documents.bigsets import GRANT_BOUNDARY
from authz_sidecar.documents.cohorts import cohorts_document
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.pacing import pause
from authz_sidecar.model.values import Rollout

# Under etcd's default 1.5 MiB request limit with room for the key and the request's framing.
CHUNK_BYTES = 1024 * 1024
# A chunk ends at the first grant boundary past MIN_CHUNK_BYTES whose next grant's CRC-32 is 0 in
# its low CUT_BITS bits (one grant in 1,024; ~56 KiB of grants further at a million-grant set's
# ~56 bytes a grant), else at the last boundary before CHUNK_BYTES: ~250 KiB a chunk on average.
# The cuts depend on the grants near them only, so a change moves the cuts of the chunk it falls in
# and no other, and a set made from another shares every chunk the change did not touch.
MIN_CHUNK_BYTES = 192 * 1024
CUT_BITS = 10
_DIGEST = re.compile(r"[0-9a-f]{64}")
DEFAULT_PREFIX = "/authz"


def normalise_prefix(prefix: str) -> str:
    """'/authz/' and 'authz' both mean '/authz'; the empty prefix is refused (it would be etcd's root)."""
    cleaned = "/" + prefix.strip().strip("/")
    if cleaned == "/":
        raise ValueError("the etcd prefix cannot be empty or '/'")
    return cleaned


@dataclass(frozen=True, slots=True)
class Layout:
    prefix: str = DEFAULT_PREFIX

    @property
    def root(self) -> str:
        """Every key of this deployment starts with this (the prefix and a slash)."""
        return f"{self.prefix}/"

    @property
    def active(self) -> str:
        return f"{self.prefix}/pointers/active"

    @property
    def shadows(self) -> str:
        return f"{self.prefix}/pointers/shadows"

    @property
    def catalogs(self) -> str:
        return f"{self.prefix}/catalogs/"

    def catalog(self, service: str) -> str:
        return f"{self.prefix}/catalogs/{service}"

    def reports(self, version: str) -> str:
        """Where the sidecars' reports on a shadow version live, one key per sidecar below it."""
        return f"{self.prefix}/reports/{version}/"

    @property
    def sets(self) -> str:
        return f"{self.prefix}/sets/"

    def head(self, version: str) -> str:
        return f"{self.prefix}/sets/{version}"

    @property
    def audit_head(self) -> str:
        """The audit chain's newest record: its sequence number and hash."""
        return f"{self.prefix}/audit/head"

    @property
    def audit_records(self) -> str:
        return f"{self.prefix}/audit/records/"

    def audit_record(self, seq: int) -> str:
        return f"{self.prefix}/audit/records/{seq:012d}"

    @property
    def locks(self) -> str:
        return f"{self.prefix}/locks/"

    def lock(self, handle: str) -> str:
        """Held by the live proposal that changes `handle`, until it is promoted or rolled back."""
        return f"{self.prefix}/locks/{handle}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}/dlq/"

    def dead_letter(self, request_id: str) -> str:
        """A request that failed after its retries (a rollback), waiting for an operator."""
        return f"{self.prefix}/dlq/{request_id}"

    @property
    def cases(self) -> str:
        return f"{self.prefix}/cases/"

    def service_cases(self, service: str) -> str:
        """A service's policy test cases, registered next to its catalog."""
        return f"{self.prefix}/cases/{service}"

    @property
    def plans(self) -> str:
        return f"{self.prefix}/plans/"

    def plan(self, version: str) -> str:
        """A shadow's rollout plan and its progress (the controller's memory lives here, not in it)."""
        return f"{self.prefix}/plans/{version}"

    @property
    def leader(self) -> str:
        """The controllers' election key: held, on its lease, by the one that acts."""
        return f"{self.prefix}/controller/leader"

    def request(self, request_id: str) -> str:
        """What a request id did, so that running it again does nothing twice."""
        return f"{self.prefix}/requests/{request_id}"

    @property
    def event_keys(self) -> str:
        return f"{self.prefix}/eventkeys/"

    def event_key(self, kid: str) -> str:
        """A public key that verifies signed events, under its key id; written once, never on a lease
        (an envelope outlives the sidecar that signed it)."""
        return f"{self.prefix}/eventkeys/{kid}"

    @property
    def consumed(self) -> str:
        return f"{self.prefix}/consumed/"

    def consumed_event(self, event_id: str) -> str:
        """A signed event acted on, created once, on a lease as long as the envelope's life."""
        return f"{self.prefix}/consumed/{event_id}"

    @property
    def chunks(self) -> str:
        return f"{self.prefix}/chunks/"

    def chunk(self, digest: str) -> str:
        """A chunk of one or more sets, under its own SHA-256."""
        return f"{self.prefix}/chunks/{digest}"

    @property
    def chunks_epoch(self) -> str:
        """Bumped by every head written and every sweep of chunks; both compare it."""
        return f"{self.prefix}/chunks-epoch"

    def indexed_chunk(self, version: str, digest: str, index: int) -> str:
        """Where a set written by an earlier release keeps its chunks (still read)."""
        return f"{self.prefix}/sets/{version}/{digest}/{index:05d}"

    def chunk_keys(self, head: Head) -> list[str]:
        """The keys of a set's chunks, in order."""
        if head.indexed:
            return [self.indexed_chunk(head.version, head.sha256, i) for i in range(head.indexed)]
        return [self.chunk(digest) for digest in head.chunks]

    def set_keys(self, version: str, document: bytes) -> dict[str, bytes]:
        """Every key that stores `document` under `version` (its head and its chunks), as etcd
        holds them once the set is written: what a builder is given in benchmarks and tests."""
        head, chunks = split(version, document)
        return {self.head(version): head.encode()} | dict(zip(self.chunk_keys(head), chunks, strict=True))


@dataclass(frozen=True, slots=True)
class Head:
    """What a set's head key says about its chunks: their digests, in order (`indexed`: instead, how
    many chunks a set written by an earlier release keeps under its version)."""

    version: str
    sha256: str
    size: int
    chunks: tuple[str, ...] = ()
    indexed: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {"version": self.version, "sha256": self.sha256, "bytes": self.size, "chunks": list(self.chunks)},
            sort_keys=True,
        ).encode()


def is_sha256(text: str) -> bool:
    """Whether `text` is a SHA-256 as chunks are named: 64 lowercase hex digits."""
    return _DIGEST.fullmatch(text) is not None


def cuts(document: bytes) -> list[int]:
    """Where `document`'s chunks end (the last at its end): at grant boundaries its grants' text
    chooses (see :data:`MIN_CHUNK_BYTES`), so that two sets differing in a few grants are cut
    alike everywhere else. A document with no grant boundary where one is needed is cut every
    :data:`CHUNK_BYTES`."""
    ends = []
    start, size = 0, len(document)
    mask = (1 << CUT_BITS) - 1
    view = memoryview(document)
    while size - start > MIN_CHUNK_BYTES:
        limit = min(start + CHUNK_BYTES, size)
        at = document.find(GRANT_BOUNDARY, start + MIN_CHUNK_BYTES, limit)
        end = -1
        last = -1
        while at >= 0:
            after = document.find(GRANT_BOUNDARY, at + 2, limit)
            if zlib.crc32(view[at + 2 : after if after >= 0 else limit]) & mask == 0:
                end = at + 1
                break
            last, at = at, after
        if end < 0:
            if size - start <= CHUNK_BYTES:
                break
            end = last + 1 if last >= 0 else limit
        ends.append(end)
        start = end
    ends.append(size)
    return ends


def split(version: str, document: bytes) -> tuple[Head, list[bytes]]:
    """The head and chunks that store `document` under `version`."""
    chunks = []
    start = 0
    for end in cuts(document):
        chunks.append(document[start:end])
        start = end
    digests = tuple(hashlib.sha256(chunk).hexdigest() for chunk in chunks)
    head = Head(version, hashlib.sha256(document).hexdigest(), len(document), chunks=digests)
    return head, chunks


def _json(value: bytes, key: str) -> Any:
    try:
        return json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DocumentError(f"not UTF-8 ({exc.reason} at byte {exc.start})", document=key) from None
    except ValueError as exc:
        raise DocumentError(f"not valid JSON: {exc}", document=key) from None


def decode_head(value: bytes, key: str, version: str) -> Head:
    data = _json(value, key)
    if not isinstance(data, dict):
        raise DocumentError("a set head must be a JSON object", document=key)
    try:
        chunks = data["chunks"]
        if isinstance(chunks, list):
            if not chunks or not all(isinstance(c, str) and is_sha256(c) for c in chunks):
                raise ValueError("chunks must be SHA-256 digests, at least one")
            digests, indexed = tuple(chunks), 0
        else:
            digests, indexed = (), int(chunks)
            if indexed < 1:
                raise ValueError("at least one chunk")
        head = Head(str(data["version"]), str(data["sha256"]), int(data["bytes"]), digests, indexed)
    except (KeyError, TypeError, ValueError) as exc:
        raise DocumentError(f"a set head needs version, sha256, bytes and chunks ({exc})", document=key) from None
    if head.version != version:
        raise DocumentError(
            f"head says version {head.version!r} under key for {version!r}", document=key, value=head.version
        )
    if head.size < 0:
        raise DocumentError("a set head needs a size", document=key)
    return head


def chunks_of(kv: Mapping[str, bytes], layout: Layout, version: str) -> tuple[Head, list[bytes]]:
    """The head of `version` and its chunks' values, in order; DocumentError if the head or any
    chunk is missing (the last good snapshot then keeps serving)."""
    head_key = layout.head(version)
    head_value = kv.get(head_key)
    if head_value is None:
        raise DocumentError(f"set version {version!r} is not in etcd (no {head_key})", document=head_key)
    head = decode_head(head_value, head_key, version)
    parts = []
    keys = layout.chunk_keys(head)
    for index, key in enumerate(keys):
        part = kv.get(key)
        if part is None:
            raise DocumentError(f"chunk {index + 1} of {len(keys)} is missing ({key})", document=head_key)
        parts.append(part)
    return head, parts


def joined(head: Head, parts: list[bytes], layout: Layout) -> bytes:
    """The chunks as one document, checked against the head."""
    return bytes(gathered(head, parts, layout))


def gathered(
    head: Head, parts: list[bytes], layout: Layout, verified: dict[int, bytes] | None = None
) -> bytes | mmap.mmap:
    """:func:`joined`, a chunk at a time (a :func:`~authz_sidecar.model.pacing.pause` between
    them): one join of a million-grant set's 56 MB held the GIL ~33 ms, in fresh pages, while
    Checks waited. Into an anonymous mapping of the set's size, whose pages the kernel hands out
    zeroed as they are first written: a bytearray grown a chunk at a time was copied whole once
    (~9 ms, when it outgrew the heap), and one made at its size is zeroed in one call (~25 ms).

    Each chunk is checked against its digest in the head (hashlib releases the GIL), so the whole
    document's digest, which names the version's content, need not be taken again. `verified`
    (id -> chunk) holds chunks checked before: a proposal's chunks shared with the active set are
    the same bytes objects in the mirror, and are not hashed again. (A set written by an earlier
    release is checked against the document's digest, taken a chunk at a time.)"""
    invalid = DocumentError("chunks do not match the head's size and SHA-256", document=layout.head(head.version))
    if sum(map(len, parts)) != head.size:
        raise invalid
    if not head.size:  # (no mapping is empty)
        if hashlib.sha256(b"").hexdigest() != head.sha256:
            raise invalid
        return b""
    document = mmap.mmap(-1, head.size)
    whole = hashlib.sha256() if head.indexed else None
    checked = {} if verified is None else verified
    at = 0
    for index, part in enumerate(parts):
        pause()
        document[at : at + len(part)] = part
        at += len(part)
        if whole is not None:
            whole.update(part)
        elif checked.get(id(part)) is not part:
            if hashlib.sha256(part).hexdigest() != head.chunks[index]:
                raise invalid
            checked[id(part)] = part
    if whole is not None and whole.hexdigest() != head.sha256:
        raise invalid
    return document


def join(kv: Mapping[str, bytes], layout: Layout, version: str) -> bytes:
    """The document stored under `version`, checked against its head."""
    return joined(*chunks_of(kv, layout, version), layout)


def encode_active(version: str) -> bytes:
    return json.dumps({"version": version}).encode()


def decode_active(value: bytes, key: str) -> str:
    data = _json(value, key)
    if not isinstance(data, dict) or set(data) != {"version"}:
        raise DocumentError('the active pointer must be {"version": "..."}', document=key)
    return check_version(data["version"], key)


def rollout_document(rollout: Rollout) -> dict[str, Any]:
    """The rollout as the shadows pointer stores it. ``cohorts`` only when the shadow has one: a
    pointer without cohorts keeps the bytes it had before cohorts existed, which a sidecar of an
    earlier release still reads."""
    weights = dict(sorted(rollout.weights.items()))
    document: dict[str, Any] = {"weights": weights, "testers": sorted(rollout.testers), "state": rollout.state}
    cohorts = cohorts_document(rollout.cohorts)
    if cohorts:
        document["cohorts"] = cohorts
    return document


def encode_shadows(shadows: Mapping[str, Rollout]) -> bytes:
    return json.dumps({v: rollout_document(r) for v, r in sorted(shadows.items())}, sort_keys=True).encode()


def decode_shadows(value: bytes, key: str) -> dict[str, Rollout]:
    """The live shadows and their rollouts (weights and cohorts per region, testers, state)."""
    data = _json(value, key)
    if not isinstance(data, dict):
        raise DocumentError("the shadows pointer must be a JSON object of version -> rollout", document=key)
    shadows: dict[str, Rollout] = {}
    for version, rollout in data.items():
        checked = check_version(version, key, f"shadows.{version}")
        if not isinstance(rollout, dict) or not rollout.keys() <= {"weights", "testers", "state", "cohorts"}:
            raise DocumentError(
                "a rollout is an object with weights, testers, state and cohorts",
                document=key,
                field=version,
                value=rollout,
            )
        shadows[checked] = parse_rollout(rollout, f"{key} {version}")
    return shadows
