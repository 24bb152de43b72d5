"""Where a long computation lets the threads answering Checks run through: :func:`pause`.

A large set is read, compiled and compared in the same process as the threads that answer Checks,
and a Check needs the GIL several times on its way (grpc's poller, the handler, the reply). While
a build keeps the GIL busy, Python hands it to a waiting thread only after the switch interval,
at each of those acquisitions: through Envoy, a Check's 99th percentile was 3-4x its steady one
whenever a pure-Python loop ran beside it, at a switch interval of 0.1 ms as at any other. The
same loop stopping for a millisecond after each millisecond of work let Checks through at
1.09-1.15x (docs/performance.md, "Fourth round").

So the model's long loops call :func:`pause` between pieces of work, which does nothing unless the
calling thread has a pacer: the etcd source's builder sets one (:class:`Pacer`) for its builds.
The model itself still does no I/O; a pacer decides whether to sleep.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_here = threading.local()


def pause() -> None:
    """A point between two pieces of a long computation where it may stop for a while."""
    pacer = getattr(_here, "pacer", None)
    if pacer is not None:
        pacer()


@contextmanager
def pacing(pacer: Callable[[], None]) -> Iterator[None]:
    """Calls to :func:`pause` on this thread go to `pacer` within the block."""
    before = getattr(_here, "pacer", None)
    _here.pacer = pacer
    try:
        yield
    finally:
        _here.pacer = before


Demand = Callable[[], int]


class Pacer:
    """Rests the calling thread for `rest` seconds after each `work` seconds of work, while other
    threads of this process want to run; otherwise lets it run at full speed.

    That others want to run shows two ways. `demand`, when given, counts the requests the process
    has answered: a count that moved since the last slice means Checks are arriving. And in this
    thread's own clocks: over a slice of work in which it had the GIL (and a core) to itself, its
    CPU time grows as the wall clock does; when it waited for another thread, the wall clock ran
    ahead. The clocks alone miss Checks that hold the GIL briefly (a Check the lane answers holds
    it for microseconds, a few times, and still waits for each): with the lane, a 1M-grant build
    beside 500 Checks/s rested too rarely, p99 3.8x of steady (docs/performance.md, "The Check
    lane"). Once either shows, the pacer rests after every slice for `memory` seconds, so that a
    steady stream of Checks keeps it resting while a build with nobody to serve (a sidecar
    starting, a benchmark) runs unslowed.
    """

    def __init__(
        self,
        work: float = 0.001,
        rest: float = 0.001,
        memory: float = 0.1,
        *,
        wall: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.thread_time,
        sleep: Callable[[float], None] = time.sleep,
        demand: Demand | None = None,
    ) -> None:
        self.work, self.rest, self.memory = work, rest, memory
        self._wall, self._cpu, self._sleep = wall, cpu, sleep
        self._demand = demand
        self._since, self._cpu_since = wall(), cpu()
        self._asked = demand() if demand is not None else 0
        self._resting_until = float("-inf")
        self.rests = 0  # how often it rested (for tests and benchmarks)

    def __call__(self) -> None:
        now = self._wall()
        if now - self._since < self.work:
            return
        cpu = self._cpu()
        asked = self._demand() if self._demand is not None else 0
        # Requests were answered, or others ran for more than a tenth of the slice.
        if asked != self._asked or (now - self._since) - (cpu - self._cpu_since) > self.work / 10:
            self._resting_until = now + self.memory
            self._asked = asked
        if now < self._resting_until:
            self._sleep(self.rest)
            self.rests += 1
            now, cpu = self._wall(), self._cpu()
        self._since, self._cpu_since = now, cpu


# Seconds a thread may hold the GIL while another waits, during a big build or a big etcd response
# taken in (Handover; Python's default: 0.005). 0.1 ms rather than 0.5: through Envoy, with a
# million-grant shadow arriving, the Checks' p99 during the build was 1.35-1.91x of steady at
# 0.1 ms against 1.72-2.60x at 0.5 for a 3-principal change, and 2.07-2.51x against 2.59-3.35x
# for a set sharing nothing (bench/rebuild.py, two runs each, alternating; docs/performance.md).
QUICK_SWITCH_INTERVAL = 0.0001


class Handover:
    """While any holder is in, Python hands the GIL to a waiting thread after 0.1 ms instead of 5.

    A Check needs the GIL several times on its way; behind a thread busy in Python (a build's
    loops, the event loop decoding etcd's responses one after another), it would wait up to the
    switch interval at each. Lower all the time, it costs the threads answering Checks when they
    are the only ones busy: a 1 ms interval took CPU per Check called directly from 1.10x to 1.21x
    of the floor's (docs/performance.md, "Sixth round"). So it is lowered only while such work runs,
    process-wide: a build and a watch taking in a set's chunks at the same time share it, and the
    interval comes back when the last of them is done."""

    def __init__(self, interval: float = QUICK_SWITCH_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.interval))
            self._holders += 1

    def leave(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                sys.setswitchinterval(self._saved)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()


HANDOVER = Handover()
