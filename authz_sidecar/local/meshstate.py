"""The state file of a running ``mesh up`` (``.authz-mesh/state.json`` by default): where its
endpoints are and the pid of everything it started, for ``make demo`` and the tests to find the
mesh and check that a stop left nothing behind. Written whole or not at all, removed by the process
that wrote it; one whose writer is gone is a leftover, not a running mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_STATE = Path(".authz-mesh") / "state.json"


def running(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc's field 22): with the pid, it names one
    process for good, where a pid alone may since have been given to another."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def stop_leftovers(path: Path, timeout: float = 10.0) -> int:
    """Stop what a ``mesh up`` killed without its cleanup (SIGKILL) left running, as its state file
    recorded it: each process only if it is still the one recorded (same pid, same start time).
    Returns how many were stopped; the leftover state file is removed."""
    state = _recorded(path)
    if state is None or running(state["pid"]):
        return 0
    started = state.get("started") or {}
    ours = [
        pid
        for name, pid in (state.get("processes") or {}).items()
        if isinstance(pid, int) and started.get(name) is not None and process_start(pid) == started[name]
    ]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in ours:
        if running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        path.unlink()
    return len(ours)


def read_state(path: Path) -> dict[str, Any] | None:
    """The state of the mesh running from `path`, or None: no file, not one of ours, or its
    ``mesh up`` is gone (killed without its cleanup; the file is then a leftover)."""
    state = _recorded(path)
    if state is None or not running(state["pid"]):
        return None
    return state


def _recorded(path: Path) -> dict[str, Any] | None:
    """The state file at `path` if it is one of ours (a mapping with the writer's pid), whether or
    not its writer still runs; None when missing or unreadable."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    return state


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """Written whole or not at all: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def remove_state(path: Path, *, directory: bool) -> None:
    """Remove the state file if this process wrote it, and with `directory` (this process created
    it) its directory if that leaves it empty."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
            if directory:
                path.parent.rmdir()  # only if empty
