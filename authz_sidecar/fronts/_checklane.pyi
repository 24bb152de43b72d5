"""Types of the C extension built from _checklane.c (the Check lane)."""

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from authz_sidecar.decision.decider import Counted
from authz_sidecar.model.evaluation import Evaluation

class Lane:
    def __init__(
        self,
        limit: int,
        bounds: Sequence[float],
        log: tuple[deque[Any], int, int, Callable[[], None], dict[str, int]] | None = None,
        sample: Callable[[str, str, str | None, Evaluation, str], None] | None = None,
        rate: float = 0.0,
    ) -> None: ...
    def answer(self, raw: bytes, /) -> bytes | None: ...
    def learn(self, raw: bytes, response: bytes, args: Counted, /) -> bool: ...
    def drain(self) -> tuple[list[tuple[Counted, int]], list[int], float, int]: ...
    def __len__(self) -> int: ...

def fields(
    raw: bytes, /
) -> tuple[bytes | None, bytes, bytes, bytes, bytes | None, bytes | None, bytes | None] | None: ...
def calls() -> int: ...
