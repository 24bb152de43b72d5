"""OTLP's wire format for ``authz.check`` spans, written by hand: one precompiled struct per span
shape and attributes serialised once per outcome, because building the SDK's span objects cost more
than the Check itself (docs/decisions/0005-tracing.md).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from authz_sidecar.telemetry.tracecontext import Parent

SPAN_NAME = "authz.check"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


_FIXED64 = struct.Struct("<Q")
# What the hot path queues: trace id, span id, parent, start and end (ns), serialised attributes.
QueuedSpan = tuple[int, int, Parent | None, int, int, bytes]

# A span is the same sequence of fields every time: written with one precompiled struct per shape
# (with or without a parent), then the attributes (field 9, serialised once per outcome).
_HEAD = length_delimited(1, bytes(16))[:2]  # tag and length of the 16-byte trace id
_SPAN_ID = length_delimited(2, bytes(8))[:2]
_PARENT = length_delimited(4, bytes(8))[:2]
_MIDDLE = length_delimited(5, SPAN_NAME.encode()) + _varint(6 << 3) + _varint(trace_pb2.Span.SPAN_KIND_SERVER)
_START, _END = _varint(7 << 3 | 1), _varint(8 << 3 | 1)
_ROOT = struct.Struct(f"<2s16s2s8s{len(_MIDDLE)}s{len(_START)}sQ{len(_END)}sQ")
_CHILD = struct.Struct(f"<2s16s2s8s2s8s{len(_MIDDLE)}s{len(_START)}sQ{len(_END)}sQ")


def encode_span(span: QueuedSpan) -> bytes:
    """One opentelemetry.proto.trace.v1.Span, written field by field."""
    trace_id, span_id, parent, start_ns, end_ns, attributes = span
    tid, sid = trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big")
    if parent is None:
        head = _ROOT.pack(_HEAD, tid, _SPAN_ID, sid, _MIDDLE, _START, start_ns, _END, end_ns)
    elif parent.trace_state:  # rare: keep field order simple rather than fast
        head = (
            length_delimited(1, tid)
            + length_delimited(2, sid)
            + length_delimited(3, parent.trace_state.encode())
            + length_delimited(4, parent.span_id.to_bytes(8, "big"))
            + _MIDDLE
            + _START
            + _FIXED64.pack(start_ns)
            + _END
            + _FIXED64.pack(end_ns)
        )
    else:
        pid = parent.span_id.to_bytes(8, "big")
        head = _CHILD.pack(_HEAD, tid, _SPAN_ID, sid, _PARENT, pid, _MIDDLE, _START, start_ns, _END, end_ns)
    return head + attributes


_LENGTHS: dict[int, bytes] = {}


def spans_field(items: list[QueuedSpan]) -> bytes:
    """Field 2 of ScopeSpans, repeated: each span with its tag and length (lengths repeat, so their
    varints are cached)."""
    parts = []
    for item in items:
        span = encode_span(item)
        n = len(span)
        prefix = _LENGTHS.get(n)
        if prefix is None:
            prefix = _LENGTHS[n] = b"\x12" + _varint(n)
        parts.append(prefix)
        parts.append(span)
    return b"".join(parts)


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    return AnyValue(string_value=str(value))


def encode_attributes(attributes: Mapping[str, Any]) -> bytes:
    """Field 9 of a Span: the repeated KeyValue entries, serialised once."""
    message = trace_pb2.Span(attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()])
    return message.SerializeToString()
