"""The one rule every cache on the request path follows: bounded, and emptied whole when full.

Caches here hold answers that are cheap to recompute (a parsed route, a rendered response, a
verified token, a decision): clearing everything when the bound is reached costs one burst of
misses, needs no bookkeeping per hit (an LRU would add work to every request) and keeps memory
bounded whatever a client sends. Lookups stay plain ``dict.get``; only a miss calls :func:`remember`.
"""

from __future__ import annotations

from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


def remember(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> _V:
    """Store `value` under `key`, emptying `cache` first if it holds `limit` entries; return `value`."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
