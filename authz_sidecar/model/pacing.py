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
