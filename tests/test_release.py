"""The releaser frees a large value in pieces only once nothing but it holds the value."""

from __future__ import annotations

import time

from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.values import Grant, Grants, PermissionSet
from authz_sidecar.store.sources.release import Releaser


def _wait(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.01)
    return False


def test_a_value_still_held_elsewhere_is_left_whole_then_freed_in_pieces_once_dropped() -> None:
    grants = Grants([tuple(Grant(f"p{i}-{j}", ("r",)) for j in range(3)) for i in range(5)])
    permissions = PermissionSet(roles={"r": ("a:view",)}, grants=grants)
    compiled = compile_set(permissions)
    releaser = Releaser(poll=0.01, between=0)
    releaser.keep(grants)
    releaser.keep(compiled)
    releaser.keep(compiled)  # once, however often given
    assert releaser.held() == 2
    time.sleep(0.1)  # several polls: both are held elsewhere
    assert len(grants) == 15 and grants[0] == Grant("p0-0", ("r",))
    assert compiled.decide("p4-2", "a:view", None) is Reason.ALLOWED
    pieces, shards = grants.pieces, compiled.unscoped
    del grants, permissions
    assert _wait(lambda: releaser.released == 1)
    assert pieces == []  # drained, piece by piece
    assert compiled.decide("p4-2", "a:view", None) is Reason.ALLOWED  # still held here: untouched
    del compiled
    assert _wait(lambda: releaser.released == 2)
    assert all(not shard for shard in shards)
    assert _wait(lambda: releaser._thread is None)  # the thread ends when nothing is held
