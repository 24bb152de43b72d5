"""Where everything lives in etcd, and how documents are split into values and read back.

Pure: no I/O. The writer (:mod:`authz_sidecar.store.policy`) and the reader (the etcd policy source)
both go through these functions, so the layout is defined once. docs/etcd-layout.md describes it
for operators; the rules that matter for correctness:

- A permission set is immutable once written under its version. Its bytes are split into chunks of
  at most :data:`CHUNK_BYTES` (etcd refuses a request over 1.5 MiB by default), stored under a path
  that contains the document's SHA-256, so two writers racing on one version can never mix chunks.
- The set's head key (``<prefix>/sets/<version>``) names the digest, size and chunk count. It is
  written after every chunk, with a compare that it does not exist yet, so a head always describes
  chunks that are all there, and a version is written at most once.
- Which versions are live is said by two small pointer keys (``pointers/active``,
  ``pointers/shadows``), changed only in transactions that compare their mod revisions: a reader
  sees an old world or a new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz_sidecar.documents import check_version, parse_rollout
from authz_sidecar.documents.cohorts import cohorts_document
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.pacing import pause
from authz_sidecar.model.values import Rollout

# Under etcd's default 1.5 MiB request limit with room for the key and the request's framing.
CHUNK_BYTES = 1024 * 1024
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

    def chunk(self, version: str, digest: str, index: int) -> str:
        return f"{self.prefix}/sets/{version}/{digest}/{index:05d}"

    def set_keys(self, version: str, document: bytes) -> dict[str, bytes]:
        """Every key that stores `document` under `version` (its head and its chunks), as etcd
        holds them once the set is written: what a builder is given in benchmarks and tests."""
        head, chunks = split(version, document)
        return {self.head(version): head.encode()} | {
            self.chunk(version, head.sha256, i): c for i, c in enumerate(chunks)
        }


@dataclass(frozen=True, slots=True)
class Head:
    """What a set's head key says about its chunks."""

    version: str
    sha256: str
    size: int
    chunks: int

    def encode(self) -> bytes:
        return json.dumps(
            {"version": self.version, "sha256": self.sha256, "bytes": self.size, "chunks": self.chunks},
            sort_keys=True,
        ).encode()


def split(version: str, document: bytes) -> tuple[Head, list[bytes]]:
    """The head and chunks that store `document` under `version`."""
    digest = hashlib.sha256(document).hexdigest()
    chunks = [document[i : i + CHUNK_BYTES] for i in range(0, len(document), CHUNK_BYTES)] or [b""]
    return Head(version=version, sha256=digest, size=len(document), chunks=len(chunks)), chunks


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
        head = Head(str(data["version"]), str(data["sha256"]), int(data["bytes"]), int(data["chunks"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DocumentError(f"a set head needs version, sha256, bytes and chunks ({exc})", document=key) from None
    if head.version != version:
        raise DocumentError(
            f"head says version {head.version!r} under key for {version!r}", document=key, value=head.version
        )
    if head.chunks < 1 or head.size < 0:
        raise DocumentError("a set head needs at least one chunk and a size", document=key)
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
    for index in range(head.chunks):
        key = layout.chunk(version, head.sha256, index)
        part = kv.get(key)
        if part is None:
            raise DocumentError(f"chunk {index + 1} of {head.chunks} is missing ({key})", document=head_key)
        parts.append(part)
    return head, parts


def joined(head: Head, parts: list[bytes], layout: Layout) -> bytes:
    """The chunks as one document, checked against the head's size and digest."""
    return bytes(gathered(head, parts, layout))


def gathered(head: Head, parts: list[bytes], layout: Layout) -> bytes | mmap.mmap:
    """:func:`joined`, a chunk at a time (a :func:`~authz_sidecar.model.pacing.pause` between
    them): one join of a million-grant set's 56 MB held the GIL ~33 ms, in fresh pages, while
    Checks waited. Into an anonymous mapping of the set's size, whose pages the kernel hands out
    zeroed as they are first written: a bytearray grown a chunk at a time was copied whole once
    (~9 ms, when it outgrew the heap), and one made at its size is zeroed in one call (~25 ms).
    The digest is taken a chunk at a time too, with the GIL released."""
    invalid = DocumentError("chunks do not match the head's size and SHA-256", document=layout.head(head.version))
    if sum(map(len, parts)) != head.size:
        raise invalid
    if not head.size:  # (no mapping is empty)
        if hashlib.sha256(b"").hexdigest() != head.sha256:
            raise invalid
        return b""
    document = mmap.mmap(-1, head.size)
    digest = hashlib.sha256()
    at = 0
    for part in parts:
        pause()
        document[at : at + len(part)] = part
        at += len(part)
        digest.update(part)
    if digest.hexdigest() != head.sha256:
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
