"""``authz-sidecar ctl replay VERSION --decisions FILE...``: recorded decisions against a stored set.

Reads the decision logs sidecars write (``serve --decision-log``, rotated files and globs
included), counts the distinct questions in them, and replays those against the active set and
the set VERSION (a live shadow, or any version still stored) with :mod:`authz_sidecar.model.replay`.
A line that is not a decision (torn by a crash, edited, from another tool) is counted and skipped:
a log is evidence, and one bad line must not hide the rest of it.

Registered on ``ctl`` by :func:`add_replay_command`, so that this command lives apart from ctl.py.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authz_sidecar.documents import load_document, parse_permission_set
from authz_sidecar.errors import AuthzError, ConfigError, DocumentError
from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.plan import plan
from authz_sidecar.model.replay import Decision, Replay, replay
from authz_sidecar.model.values import PermissionSet
from authz_sidecar.store.policy import PolicyStore, StoreError

# Flips listed (the counts cover them all).
REPLAY_PAGE = 50
# Malformed lines named as FILE:LINE (all are counted).
MALFORMED_LISTED = 10
_GLOB = frozenset("*?[")


@dataclass
class Recorded:
    """What a set of decision logs holds: the distinct decisions and how often each was made."""

    files: list[str] = field(default_factory=list)
    decisions: Counter[Decision] = field(default_factory=Counter)
    records: int = 0
    malformed: int = 0
    # The first malformed lines (MALFORMED_LISTED), as FILE:LINE, so that an operator can look at them.
    malformed_at: list[str] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    versions: Counter[str] = field(default_factory=Counter)


def decision_files(patterns: Iterable[str]) -> list[Path]:
    """Each argument as a path, or a glob when it has glob characters; a path that is not there, or a
    glob that matches nothing, is an error (a replay of less than was asked for would mislead)."""
    found: list[Path] = []
    for pattern in patterns:
        if _GLOB & set(pattern):
            matched = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not matched:
                raise AuthzError(f"--decisions {pattern}: no file matches")
            found.extend(matched)
        else:
            path = Path(pattern)
            if not path.is_file():
                why = "not a file" if path.exists() else "no such file"
                raise AuthzError(f"--decisions {pattern}: {why}")
            found.append(path)
    # A file named twice (a path and a glob, relative and absolute) is read once, where first named.
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_decisions(paths: Iterable[Path], recorded: Recorded | None = None) -> Recorded:
    """Parse every line of every file into `recorded`; malformed lines are counted, never raised."""
    recorded = recorded if recorded is not None else Recorded()
    for path in paths:
        try:
            with path.open("rb") as file:
                _read(file, str(path), recorded)
        except OSError as exc:
            raise AuthzError(f"--decisions {path}: {exc.strerror or exc}") from None
        recorded.files.append(str(path))
    return recorded


# The writer puts the time last (telemetry/decisionlog.py), so a line is a prefix that many lines
# share, and a number. Per line, only the prefix is counted (one dict lookup and one store: with
# tens of thousands of distinct prefixes each lookup is a cache miss, so fewer per line is what
# makes this fast) and the number read; a prefix is parsed the first time it is seen. A line of
# another shape (fields in another order, another writer) is parsed whole, the slow way.
_TIME = b',"time":'


def _decision(record: Any) -> tuple[Decision, str] | None:
    """The decision and the set version a parsed line holds, or None if it is not a decision."""
    if type(record) is not dict:
        return None
    principal, handle, scope = record.get("principal"), record.get("handle"), record.get("scope", 0)
    answer, version = record.get("answer"), record.get("version")
    if (
        type(principal) is not str
        or type(handle) is not str
        or not (scope is None or type(scope) is str)
        or answer not in ("allow", "deny")
        or type(version) is not str
    ):
        return None
    return (principal, handle, scope, answer == "allow"), version


def _parsed(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        return None


def _whole(line: bytes) -> tuple[Decision, str, float] | None:
    """A line parsed as one JSON object, whatever the order of its fields; None if no decision."""
    record = _parsed(line)
    found = _decision(record)
    when = record.get("time") if found is not None else None
    if found is None or not isinstance(when, float | int) or isinstance(when, bool):
        return None
    return found[0], found[1], float(when)


def _read(lines: Iterable[bytes], name: str, recorded: Recorded) -> None:
    counts: dict[bytes, int] = {}
    prefixes: dict[bytes, tuple[Decision, str]] = {}
    first = recorded.first if recorded.first is not None else float("inf")
    last = recorded.last if recorded.last is not None else float("-inf")
    for number, line in enumerate(lines, 1):
        head, sep, tail = line.rpartition(_TIME)
        end = tail.rstrip()
        counted = False
        # float() also reads "1_000", "inf" and "nan", which JSON does not: those go the slow way.
        if sep and end[-1:] == b"}" and end[:1].isdigit() and b"_" not in end:
            n = counts.get(head)
            if n is None and (found := _decision(_parsed(head + b"}"))) is not None:
                prefixes[head] = found
                n = 0
            if n is not None:
                try:
                    when = float(end[:-1])
                except ValueError:
                    pass
                else:
                    counts[head] = n + 1
                    counted = True
        if not counted:  # not the writer's shape, or not a decision: the slow way
            whole = _whole(line)
            if whole is None:
                if line.strip():  # an empty line is no record, and no error either
                    recorded.malformed += 1
                    if len(recorded.malformed_at) < MALFORMED_LISTED:
                        recorded.malformed_at.append(f"{name}:{number}")
                continue
            decision, version, when = whole
            recorded.records += 1
            recorded.decisions[decision] += 1
            recorded.versions[version] += 1
        # Comparisons, not min() and max(): a builtin call per line is measurably slower.
        if when < first:  # noqa: PLR1730
            first = when
        if when > last:  # noqa: PLR1730
            last = when
    for head, n in counts.items():
        decision, version = prefixes[head]
        recorded.records += n
        recorded.decisions[decision] += n
        recorded.versions[version] += n
    if recorded.records:
        recorded.first, recorded.last = first, last


def _utc(when: float | None) -> str | None:
    if when is None:
        return None
    try:
        return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # a time no calendar holds, from an edited line
        return None


def report(recorded: Recorded, result: Replay, limit: int = REPLAY_PAGE) -> dict[str, Any]:
    """The replay as ctl prints it."""
    return {
        "active": result.active,
        "proposed": result.proposed,
        "files": recorded.files,
        "records": recorded.records,
        "malformed": recorded.malformed,
        "malformed_at": recorded.malformed_at,
        "first_time": recorded.first,
        "last_time": recorded.last,
        "first_utc": _utc(recorded.first),
        "last_utc": _utc(recorded.last),
        "recorded_versions": dict(sorted(recorded.versions.items())),
        "distinct": result.distinct,
        "flipped_requests": result.flipped_requests,
        "flipped_principals": result.flipped_principals,
        "by_handle": {
            handle: {
                "allow_to_deny": {"requests": f.allow_to_deny_requests, "principals": f.allow_to_deny_principals},
                "deny_to_allow": {"requests": f.deny_to_allow_requests, "principals": f.deny_to_allow_principals},
            }
            for handle, f in result.by_handle.items()
        },
        "flips": len(result.flips),
        "listed": [flip.describe() for flip in result.flips[:limit]],
        "drift": result.drift,
        "changed_handles_not_requested": list(result.changed_not_requested),
        "changed_handles_not_exercised": list(result.changed_not_exercised),
    }


async def _stored(store: PolicyStore, version: str) -> PermissionSet:
    try:
        document = await store.document(version)
    except (StoreError, DocumentError):
        raise StoreError(
            f"{version!r} is not stored (pruned, or never written); see 'ctl status' and 'ctl history'"
        ) from None
    return parse_permission_set(load_document(document, version), version)


def replay_sets(recorded: Recorded, active: PermissionSet, proposed: PermissionSet) -> Replay:
    """Compile both sets and replay; the plan names the handles the change moves."""
    changed = plan(active, proposed).by_handle()
    return replay(recorded.decisions, compile_set(active), compile_set(proposed), changed)


async def cmd_replay(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    """Replay the decision logs against VERSION; the files are checked before etcd is asked."""
    if ns.limit < 0:
        raise ConfigError("--limit must be at least 0")
    files = decision_files(ns.decisions)
    pointers = await store.pointers()
    if pointers.active is None:
        raise StoreError("no active set yet; start with 'ctl init'")
    active = await _stored(store, pointers.active)
    proposed = await _stored(store, ns.version)
    # Reading a million lines takes seconds: off the event loop, which keeps the etcd channel alive.
    recorded = await asyncio.to_thread(read_decisions, files)
    result = await asyncio.to_thread(replay_sets, recorded, active, proposed)
    return report(recorded, result, ns.limit)


def add_replay_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ctl replay`` through ctl's own `command` (connection flags, --json, the handler)."""
    parser = command(
        "replay",
        "replay recorded decisions (serve --decision-log) against a stored set: what would flip, for whom",
        cmd_replay,
    )
    parser.add_argument("version", help="a live shadow, or any stored version")
    parser.add_argument(
        "--decisions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="decision logs (rotated ones too); a glob in quotes is expanded here",
    )
    parser.add_argument("--limit", type=int, default=REPLAY_PAGE, help="flips listed (all are counted)")
