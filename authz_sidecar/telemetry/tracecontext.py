"""The trace a request belongs to, read from its headers as Envoy forwards them: W3C ``traceparent``
(and ``tracestate``), B3 single (``b3``) or B3 multi (``x-b3-traceid``, ``x-b3-spanid``,
``x-b3-sampled``). A malformed header starts a new trace rather than fail the Check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Parent:
    trace_id: int
    span_id: int
    sampled: bool
    trace_state: str = ""


def _hex_id(text: str, digits: int) -> int | None:
    text = text.strip().lower()
    if len(text) == 16 and digits == 32:  # B3 allows 64-bit trace ids
        text = text.rjust(32, "0")
    if len(text) != digits or not _HEX.issuperset(text):
        return None
    value = int(text, 16)
    return value or None


def parent_from(headers: Mapping[str, str]) -> Parent | None:
    """The remote parent named by W3C or B3 headers, or None (also for malformed ones: a bad
    header starts a new trace rather than fail the Check)."""
    traceparent = headers.get("traceparent")
    if traceparent:
        parts = traceparent.strip().split("-")
        if len(parts) >= 4 and parts[0] != "ff" and len(parts[3]) == 2 and _HEX.issuperset(parts[3].lower()):
            trace_id, span_id = _hex_id(parts[1], 32), _hex_id(parts[2], 16)
            if trace_id and span_id:
                return Parent(trace_id, span_id, bool(int(parts[3], 16) & 1), headers.get("tracestate", ""))
    b3 = headers.get("b3")
    if b3 and "-" in b3:
        parts = b3.strip().split("-")
        trace_id, span_id = _hex_id(parts[0], 32), _hex_id(parts[1], 16)
        if trace_id and span_id:
            sampled = len(parts) < 3 or parts[2] in ("1", "d")
            return Parent(trace_id, span_id, sampled)
    b3_trace = headers.get("x-b3-traceid")
    if b3_trace:
        trace_id, span_id = _hex_id(b3_trace, 32), _hex_id(headers.get("x-b3-spanid", ""), 16)
        if trace_id and span_id:
            flag = headers.get("x-b3-sampled", "1")
            return Parent(trace_id, span_id, flag in ("1", "true") or headers.get("x-b3-flags") == "1")
    return None
