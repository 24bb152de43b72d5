"""The audit chain: one record per control-plane write, appended in the same etcd transaction as the
change it records (no change without its record, no record without its change).

Each record carries the hash of the one before it, and its own hash over its canonical JSON, so an
edited record no longer matches its hash and a removed one breaks the chain at its successor.
``audit/head`` names the newest record; ``ctl status`` shows it (and it is logged), so a truncated
tail can be caught against an earlier copy of the head.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The hash the first record points back to.
GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class ChainHead:
    seq: int = 0
    hash: str = GENESIS

    def encode(self) -> bytes:
        return json.dumps({"seq": self.seq, "hash": self.hash}, sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> ChainHead:
        if value is None:
            return cls()
        data = json.loads(value)
        return cls(int(data["seq"]), str(data["hash"]))


def digest(record: Mapping[str, Any]) -> str:
    """The SHA-256 of a record's canonical JSON, its own ``hash`` field left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def trace_id() -> str:
    """The trace this write belongs to, when the caller runs inside one: the W3C ``TRACEPARENT``
    environment variable, as OpenTelemetry propagates context to a command (e.g. a CI job)."""
    parts = os.environ.get("TRACEPARENT", "").strip().split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return ""


def record(head: ChainHead, action: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The next record after `head`: sequence number, time, the link to the previous, its hash."""
    entry: dict[str, Any] = {"seq": head.seq + 1, "at": round(time.time(), 3), "action": action, **fields}
    entry["prev"] = head.hash
    entry["hash"] = digest(entry)
    return entry


def verify(records: Iterable[tuple[str, bytes]], head: ChainHead) -> list[str]:
    """Every break in the chain, each naming the record: edited (its hash does not match), removed
    (a sequence number missing, or a record that does not point at its predecessor), or a head that
    does not name the last record. Empty when the chain holds."""
    problems: list[str] = []
    expected_seq, previous = 1, GENESIS
    for key, value in records:
        try:
            entry = json.loads(value)
            seq, prev, claimed = int(entry["seq"]), str(entry["prev"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            problems.append(f"{key}: not an audit record")
            continue
        if seq != expected_seq:
            missing = ", ".join(str(n) for n in range(expected_seq, seq)) if seq > expected_seq else str(seq)
            problems.append(f"{key}: record(s) {missing} missing before it (removed)")
        elif prev != previous:
            problems.append(f"{key}: does not point at the record before it (that record was removed or edited)")
        if digest(entry) != claimed:
            problems.append(f"{key}: its content does not match its hash (edited)")
        expected_seq, previous = seq + 1, claimed
    if head.seq != expected_seq - 1 or (head.seq and head.hash != previous):
        problems.append(f"audit/head names record {head.seq}, but the chain ends at record {expected_seq - 1}")
    return problems
