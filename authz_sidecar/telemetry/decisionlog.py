"""The decision log (``serve --decision-log FILE``): every decision as one JSON line, for ``ctl replay``.

A line names the principal, the handle, the scope (null when none), the answer (``allow`` or
``deny``), the version of the set that decided, how that set was selected, and the time (unix
seconds)::

    {"principal":"bob","handle":"things:edit","scope":null,"answer":"deny","version":"v1","selection":"default","time":1718000000.123456}

Why it is built this way: a Check must never wait for a disk, nor pay for formatting. The hot path
appends one tuple (the principal, the handle, the scope, the memoised Evaluation and the time) to a
deque after checking its length; a daemon thread formats and writes lines in batches. Measured
here: the put into a deque with a length check costs ~40 ns more than calling a function that does
nothing, ``queue.Queue.put_nowait`` ~720 ns more (it takes a lock and notifies a condition), and
``deque(maxlen)`` alone would silently drop the *oldest* entries, which cannot be counted;
``record()`` as a whole, the clock read and the tuple included, ~350 ns. When the queue is full the
decision is not logged and ``authz_decision_log_dropped_total{reason="queue_full"}`` counts it; a
write the disk refuses is counted as ``write_failed``. Nothing here ever blocks or fails the answer.

The thread writes at least every ``interval`` seconds (and sooner when a batch is waiting), flushes
after every write, and rotates by size on a line boundary: FILE -> FILE.1 -> FILE.2 ..., keeping
``keep`` rotated files. A line is never split across two files. Stopping drains the queue, writes
it, and closes the file. Formatting a line takes ~1.5-2.5 us of the GIL; batches of 1024 lines keep
each stretch of it to a couple of milliseconds before the write, which releases the GIL, so that a
Check thread never waits behind the writer for long.

The JSON of a line, up to its time, depends only on (principal, handle, scope, evaluation); the
evaluations are memoised per snapshot, so the writer caches that prefix and formats only the time.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

import structlog

from authz_sidecar.caches import remember
from authz_sidecar.model.evaluation import Evaluation

log = structlog.get_logger("authz_sidecar.telemetry.decisionlog")

DROP_REASONS: Final = ("queue_full", "write_failed")
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_KEEP: Final = 3
# What the hot path hands over: principal, handle, scope, the evaluation, unix time.
Queued = tuple[str, str, str | None, Evaluation, float]
# Distinct line prefixes kept by the writer thread (emptied whole when full, as every cache here).
PREFIX_CACHE_LIMIT: Final = 65_536


def _quoted(text: str) -> str:
    """A JSON string literal, ASCII only (so a line's length in characters is its length in bytes)."""
    return json.dumps(text)


class DecisionLog:
    """A bounded queue filled by the decision path and a thread that writes it as JSON lines."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        max_queue: int = 65_536,
        batch: int = 1024,
        interval: float = 1.0,
        dropped: dict[str, int] | None = None,
    ) -> None:
        if max_bytes <= 0 or keep < 0 or max_queue < 1 or batch < 1 or interval <= 0:
            raise ValueError("max_bytes, max_queue, batch and interval must be > 0, keep >= 0")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._max_queue = max_queue
        self._batch = min(batch, max_queue)
        self._interval = interval
        self._queue: collections.deque[Queued] = collections.deque()
        # Decisions not logged, by reason (DROP_REASONS); the metrics' dict when there is one.
        self.drops = dropped if dropped is not None else {}
        for reason in DROP_REASONS:
            self.drops.setdefault(reason, 0)
        self.written = 0
        self.rotations = 0
        self._prefixes: dict[tuple[str, str, str | None, int], tuple[Evaluation, str]] = {}
        # Set by forget() (any thread), acted on by the writer thread, which alone owns _prefixes.
        self._forget = False
        self._file: BinaryIO | None = None
        self._size = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_failures = 0

    # --- the hot path ----------------------------------------------------------------------------

    def record(self, principal: str, handle: str, scope: str | None, evaluation: Evaluation) -> None:
        """Queue one decision, or count it dropped: never waits, never raises."""
        queue = self._queue
        if len(queue) < self._max_queue:
            queue.append((principal, handle, scope, evaluation, time.time()))
            if len(queue) == self._batch:  # once per batch, not per request: Event.set takes a lock
                self._wake.set()
        else:
            self.drops["queue_full"] += 1

    def queue_parts(self) -> tuple[collections.deque[Queued], int, int, Callable[[], None], dict[str, int]]:
        """The queue, its bound, the batch, the writer's wake-up and the drop counts: what the Check
        lane (fronts/_checklane.c) appends to, in C, exactly as :meth:`record` does."""
        return self._queue, self._max_queue, self._batch, self._wake.set, self.drops

    # --- start and stop --------------------------------------------------------------------------

    def start(self) -> None:
        """Open the file (OSError if it cannot be: the caller names its flag) and start the writer."""
        if self._thread is not None:
            return
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open by the writer thread until stop()
        self._size = self._file.tell()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, flush, close and end the thread (bounded by `timeout`)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(timeout)
        self._thread = None

    def forget(self) -> None:
        """A new snapshot is serving: the cached prefixes hold evaluations of the old one, and
        through them its compiled sets, which must not outlive it here."""
        self._forget = True

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def status(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "written": self.written,
            "dropped": dict(self.drops),
            "queued": len(self._queue),
            "rotations": self.rotations,
        }

    # --- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.wait(self._interval)
                self._wake.clear()
                self._drain()
            self._drain()
        finally:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    log.warning("decision_log_close_failed", path=str(self.path), error=str(exc))
                self._file = None

    def _drain(self) -> None:
        """Write everything queued, a batch at a time, then flush."""
        if self._forget:
            self._forget = False
            self._prefixes = {}
        queue = self._queue
        while queue:
            items = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
            self._write([self._line(item) for item in items])
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc, 0)

    def _line(self, item: Queued) -> str:
        principal, handle, scope, evaluation, when = item
        key = (principal, handle, scope, id(evaluation))
        cached = self._prefixes.get(key)
        if cached is None or cached[0] is not evaluation:
            prefix = (
                f'{{"principal":{_quoted(principal)},"handle":{_quoted(handle)},'
                f'"scope":{"null" if scope is None else _quoted(scope)},'
                f'"answer":"{"allow" if evaluation.allowed else "deny"}",'
                f'"version":{_quoted(evaluation.enforced.meta.version)},'
                f'"selection":"{evaluation.selection.value}","time":'
            )
            cached = remember(self._prefixes, key, (evaluation, prefix), PREFIX_CACHE_LIMIT)
        return f"{cached[1]}{when:.6f}}}\n"

    def _write(self, lines: list[str]) -> None:
        """Write `lines`, rotating before a line that would take the file past max_bytes (a line
        alone larger than max_bytes still goes whole into a file of its own)."""
        if self._file is None and not self._reopen():
            self.drops["write_failed"] += len(lines)
            return
        pending: list[str] = []
        size = self._size
        for line in lines:
            if size + len(line) > self.max_bytes and size > 0:
                if pending:
                    self._put(pending)
                    pending = []
                self._rotate()
                size = self._size
            pending.append(line)
            size += len(line)
        if pending:
            self._put(pending)

    def _put(self, lines: list[str]) -> None:
        data = "".join(lines).encode()
        if self._file is None:
            self.drops["write_failed"] += len(lines)
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self._failed(exc, len(lines))
            return
        self._size += len(data)
        self.written += len(lines)

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.keep (the oldest falls off), then a new FILE."""
        file = self._file
        try:
            if file is not None:
                file.flush()
                file.close()
            self._file = None
            name = self.path.name
            for index in range(self.keep, 0, -1):
                source = self.path if index == 1 else self.path.with_name(f"{name}.{index - 1}")
                if source.exists():
                    os.replace(source, self.path.with_name(f"{name}.{index}"))
            self._file = open(self.path, "ab" if self.keep else "wb")  # noqa: SIM115
            self._size = self._file.tell()
            self.rotations += 1
        except OSError as exc:
            self._failed(exc, 0)
            if self._file is None:
                self._reopen()

    def _reopen(self) -> bool:
        """Append to FILE again after a failure (a later drain tries again if this one cannot)."""
        try:
            self._file = open(self.path, "ab")  # noqa: SIM115
        except OSError as exc:
            self._failed(exc, 0)
            return False
        self._size = self._file.tell()
        return True

    def _failed(self, exc: OSError, lines: int) -> None:
        self.drops["write_failed"] += lines
        self._write_failures += 1
        if self._write_failures in (1, 10, 100) or self._write_failures % 1000 == 0:
            log.warning(
                "decision_log_write_failed",
                path=str(self.path),
                error=exc.strerror or str(exc),
                failures=self._write_failures,
                dropped=self.dropped,
            )
