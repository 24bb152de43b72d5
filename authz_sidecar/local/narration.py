"""How ``make demo`` tells its story: narration wrapped for a terminal, ``authz-sidecar ctl`` run in
this process and shown as the command a person would type with what it printed, and a rollout plan
watched through ``ctl status`` with each message the controller writes, timed. Every wait is bounded
and ends in a :class:`DemoError` that says what did not happen.
"""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

from authz_sidecar import cli
from authz_sidecar.local.mesh import run_ctl
from authz_sidecar.local.processes import interruptibly

WIDTH = 110  # narration wraps here; command output is printed as the command printed it
FINISHED = ("promoted", "rolled_back", "aborted", "dead_letter", "ended", "paused")


class DemoError(Exception):
    """A step did not happen (in time, or as the story says): the demo stops there."""


def until(done: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    """Poll `done` until it holds; a DemoError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(poll)


class Narrator:
    """Prints the story; times are seconds since the demo began."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def step(self, number: int, title: str) -> None:
        self.say()
        self.say(f"[{number}] {title}")

    def note(self, text: str, hang: int = 0) -> None:
        """An indented line of narration, wrapped (continuation lines `hang` further in)."""
        self.say(
            textwrap.fill(
                text,
                width=WIDTH,
                initial_indent="  ",
                subsequent_indent="  " + " " * hang,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _parse_text(text: str) -> dict[str, Any]:
    """ctl's text output (``key: value``, a JSON value for lists and mappings) back into values."""
    parsed: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if value[:1] in "[{":
            with contextlib.suppress(ValueError):
                parsed[key] = json.loads(value)
                continue
        parsed[key] = value
    return parsed


class Ctl:
    """``authz-sidecar ctl`` run in this process (a subprocess would spend a second importing),
    shown as the command a person would type with what it printed."""

    def __init__(self, endpoints: str, narrator: Narrator) -> None:
        self.endpoints = endpoints
        self.narrator = narrator

    def show(self, *args: str, keys: Sequence[str] = (), plan_of: str = "") -> dict[str, Any]:
        """Run and print; with `keys`, only those lines of the output, and with `plan_of` only that
        version's entry of ``plans`` (each said so)."""
        argv = ["ctl", *args, "--etcd", self.endpoints]
        out, err = io.StringIO(), io.StringIO()

        def call() -> int:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return cli.main(argv)

        code = interruptibly(call)
        self.narrator.say(f"$ authz-sidecar {' '.join(argv)}")
        text = out.getvalue()
        lines = text.splitlines()
        if keys:
            lines = [line for line in lines if line.split(":", 1)[0] in keys]
            lines.append(f"  (of its output: {', '.join(keys)})")
        if plan_of:
            one = json.dumps({plan_of: (_parse_text(text).get("plans") or {}).get(plan_of)}, sort_keys=True)
            lines = [f"plans: {one}" if line.startswith("plans: ") else line for line in lines]
            lines.append(f"  (of plans: {plan_of}'s)")
        for line in lines:
            self.narrator.say(line)
        if code != 0:
            raise DemoError(f"ctl {args[0]} failed (exit {code}): {err.getvalue().strip()}")
        return _parse_text(text)

    def json(self, *args: str) -> dict[str, Any]:
        """Run quietly; what it printed with --json."""
        try:
            return interruptibly(lambda: run_ctl(self.endpoints, *args))
        except RuntimeError as exc:
            raise DemoError(str(exc)) from None


class PlanWatch:
    """Polls a shadow's rollout plan (``ctl status``) and narrates each new message the
    controller writes, timed from the canary command."""

    def __init__(self, ctl: Ctl, narrator: Narrator, version: str, started: float) -> None:
        self.ctl = ctl
        self.narrator = narrator
        self.version = version
        self.started = started
        self.plan: dict[str, Any] = {}
        self.active = ""
        self._said = ""

    def poll(self) -> dict[str, Any]:
        status = self.ctl.json("status")
        self.active = str(status.get("active") or "")
        self.plan = dict((status.get("plans") or {}).get(self.version) or {})
        message = str(self.plan.get("message") or "")
        if message and message != self._said:
            self._said = message
            self.narrator.note(f"{time.time() - self.started:+6.1f}s  plan: {message}", hang=15)
        return self.plan

    def until(self, done: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            plan = self.poll()
            if done(plan):
                return plan
            state = plan.get("state")
            if state in FINISHED:
                raise DemoError(f"{what} did not happen: {self.version}'s plan is {state}: {plan.get('message')}")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{what} did not happen within {timeout:.0f}s; {self.version}'s plan is {state}: "
                    f"{plan.get('message')}"
                )
            time.sleep(0.25)
