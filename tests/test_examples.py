"""The runnable examples in examples/ run, each against its own real etcd and sidecar, and tell the
story they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(example: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_export_service_exports_only_the_blocks_of_accounts_the_user_may_export() -> None:
    out = run("export/export_service.py")
    assert "exported 8 blocks: acme-0, acme-1, acme-2, acme-3, globex-0" in out
    assert "refused 4 blocks of account initech (missing_permission)" in out


@pytest.mark.parametrize("line", [
    "consumer, event 1: valid=True allowed=True (allowed)",
    "consumer, event 1 delivered again: valid=False (replayed)",
    "consumer, event 2: valid=True allowed=False (missing_permission): refused at consume time",
    "as expected",
])  # fmt: skip
def test_a_permission_revoked_between_signing_and_consuming_is_refused_and_a_replay_too(line: str) -> None:
    assert line in EVENTS.output()


class _Once:
    """The events example run once for all its assertions."""

    def __init__(self) -> None:
        self._out: str | None = None

    def output(self) -> str:
        if self._out is None:
            self._out = run("events/producer_consumer.py")
        return self._out


EVENTS = _Once()
