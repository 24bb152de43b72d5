"""Signed events, the pure part: the bytes a signature covers, the order of a verifier's checks, and
how long a consumed event must be remembered.

The encoding is defined here, not borrowed from protobuf: protobuf promises a deterministic
serialisation within one implementation, not the same bytes across languages and versions, and a
consumer in Go or Java must rebuild exactly what was signed from the fields it received. So every
field is written as an 8-byte big-endian length followed by its bytes, in a fixed order, after a
domain tag (docs/app-api.md#signed-events spells it out for implementers). A length prefix on
every field makes the encoding unambiguous: no choice of field values can make two different
envelopes encode to the same bytes, whatever the values contain.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import StrEnum

# What the signed bytes start with: a signature over an envelope can never be taken for a signature
# over anything else the same key might one day sign.
DOMAIN = b"authz-sidecar.v1.Envelope"
SIGNATURE_BYTES = 64
# Seconds an envelope is still accepted after its expires_at, for clocks that disagree a little
# between the signing and the verifying machine (serve --event-clock-skew; docs/app-api.md).
DEFAULT_CLOCK_SKEW = 5
_LENGTH = struct.Struct(">Q")
_INT64 = struct.Struct(">q")


class EventRefusal(StrEnum):
    """Why an envelope itself is refused, before (or instead of) any permission question. The
    permission's own reasons (``missing_permission``, ...) come from :class:`~.reasons.Reason`."""

    # No key with the envelope's key_id is trusted here (never published, or withdrawn).
    UNKNOWN_KEY = "unknown_key"
    # The signature does not match the fields: a field was changed, or another key signed.
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    # Consumed before, by this or another consumer.
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class EnvelopeFields:
    """Every field of an envelope but its signature, as plain values."""

    payload: bytes
    principal: str
    permission: str
    scope: str
    key_id: str
    issued_at: int
    expires_at: int
    event_id: str
    revision: int


def signed_bytes(envelope: EnvelopeFields) -> bytes:
    """The exact bytes the Ed25519 signature covers."""
    items = (
        DOMAIN,
        envelope.payload,
        envelope.principal.encode("utf-8"),
        envelope.permission.encode("utf-8"),
        envelope.scope.encode("utf-8"),
        envelope.key_id.encode("utf-8"),
        _INT64.pack(envelope.issued_at),
        _INT64.pack(envelope.expires_at),
        envelope.event_id.encode("utf-8"),
        _INT64.pack(envelope.revision),
    )
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def expired(envelope: EnvelopeFields, now: float, skew: float) -> bool:
    """Past its expiry by more than the clocks may disagree."""
    return now > envelope.expires_at + skew


def remembered_for(envelope: EnvelopeFields, now: float, skew: float) -> int:
    """Whole seconds a consumed event must stay recorded: as long as it could still verify (its
    expiry plus the skew), rounded up, and one more so a record never lapses a moment early."""
    return max(1, math.ceil(envelope.expires_at + skew - now) + 1)
