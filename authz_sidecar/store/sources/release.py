"""Large values a build made, freed a piece at a time once nothing else holds them.

When a million-grant version is dropped (a shadow removed, a proposal replaced, a set promoted
past), its last reference goes in one statement, wherever that is (the event loop installing the
next snapshot, the builder forgetting a set), and CPython frees everything it holds in that one
call: measured at 20-250 ms holding the GIL (a million grants and their principals, the compiled
set's dict shards, the predicted impact of two million principals) while every Check waits.

So the builder hands its large values here as well (:meth:`Releaser.keep`). A thread looks at them
every :data:`POLL` seconds; once the only reference left to one is this list's, no other thread can
reach it, and it is emptied a piece at a time (a shard, a piece of grants) with the GIL handed over
between pieces, then let go. Memory comes back up to a poll later than it would have.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Protocol

# Seconds between looks at what is held, and between two pieces freed (a piece is well under a
# millisecond; Checks get the GIL in between).
POLL = 0.1
BETWEEN = 0.0005


class Drainable(Protocol):
    def drain(self) -> Iterator[None]: ...


class Releaser:
    """Holds large values beside their owners and frees each, piece by piece, once it is the last
    holder. The thread runs only while something is held."""

    def __init__(self, *, poll: float = POLL, between: float = BETWEEN) -> None:
        self._poll = poll
        self._between = between
        self._held: list[Drainable] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.released = 0  # values freed so far

    def keep(self, value: Drainable) -> None:
        """Free `value` in pieces when nothing else holds it (it is kept once, however often given)."""
        with self._lock:
            if any(held is value for held in self._held):
                return
            self._held.append(value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="authz-release", daemon=True)
                self._thread.start()

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _run(self) -> None:
        while True:
            time.sleep(self._poll)
            with self._lock:
                unused = self._unused()
                if not self._held and not unused:
                    self._thread = None
                    return
            for value in unused:
                for _ in value.drain():
                    time.sleep(self._between)
                self.released += 1
            del unused

    def _unused(self) -> list[Drainable]:
        """Take out what only this list holds. (sys.getrefcount counts the list's reference and its
        own argument's: 2 means nobody else's.)"""
        held = self._held
        unused = [held[i] for i in range(len(held)) if sys.getrefcount(held[i]) == 2]
        if unused:
            self._held = [v for v in held if not any(v is u for u in unused)]
        return unused
