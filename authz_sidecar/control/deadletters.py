"""Rollbacks that cannot complete are never lost: retried with capped exponential backoff and full
jitter, then queued for an operator (``ctl dlq list|retry|drop``).

A rollback is the emergency path, so it must survive the moment it is most likely to fail: etcd
itself in trouble. A dead letter goes to etcd (``<prefix>/dlq/<request id>``) when etcd takes it,
and otherwise to a local file (``--dlq-file``), written atomically; ``dlq retry`` replays the same
request id, which the store does at most once, so a retry after a rollback that did land in the end
changes nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from etcd3aio.errors import EtcdError

from authz_sidecar.store.policy import Change, ConflictError
from authz_sidecar.store.sources.files import write_atomically

# What a retry can outlast: etcd unreachable or slow, a transaction that lost a race.
TRANSIENT: tuple[type[BaseException], ...] = (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError, ConflictError)
_T = TypeVar("_T")


def default_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "authz-sidecar" / "dlq.json"


async def with_retries(
    attempt: Callable[[], Awaitable[_T]], *, attempts: int, base: float = 0.2, cap: float = 5.0
) -> _T:
    """Run `attempt` until it succeeds or `attempts` transient failures; re-raise the last one."""
    for n in range(1, attempts + 1):
        try:
            return await attempt()
        except TRANSIENT:
            if n == attempts:
                raise
            await asyncio.sleep(random.uniform(0, min(cap, base * 2**n)))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


class LocalQueue:
    """Dead letters kept in one JSON file (request id -> letter), replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, letters: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Durable: a dead letter is written because etcd could not take it; it must survive a crash.
        write_atomically(self.path, json.dumps(letters, indent=2, sort_keys=True), durable=True)

    def add(self, request_id: str, letter: dict[str, Any]) -> None:
        self._save({**self.load(), request_id: letter})

    def remove(self, request_id: str) -> None:
        letters = self.load()
        if letters.pop(request_id, None) is not None:
            self._save(letters)


def letter(change: Change, version: str, error: str, attempts: int) -> dict[str, Any]:
    """A failed request as the queue keeps it: enough to replay it with its own request id."""
    return {
        "action": change.action,
        "version": version,
        "request_id": change.request_id,
        "reason": change.fields.get("reason", ""),
        "who": change.fields.get("who", ""),
        "error": error,
        "attempts": attempts,
        "at": round(time.time(), 3),
    }


def replayed(request_id: str, dead: dict[str, Any]) -> Change:
    """The change a dead letter asks for again, under its own request id."""
    fields = {"who": dead.get("who", ""), "reason": dead.get("reason", ""), "version": dead["version"]}
    return Change(dead.get("action", "rollback"), request_id, subject=dead["version"], fields=fields)
