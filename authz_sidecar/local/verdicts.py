"""Judging the scenario's traffic: which sets could have decided each request, and whether its
answer is one of theirs.

A request is sent at `sent` and answered at `answered`; a sidecar chose the set that decided it
somewhere in between, from the snapshot it held then. The audit says when each pointer moved (a
shadow's weights per region, the active set), and sidecars follow within milliseconds. So the sets
that could have decided a request are the ones in force for its region at some time in
``[sent - slack, answered + slack]``, a shadow only for the principals its sticky bucket puts
under its weight there (the selection rule itself, :func:`authz_sidecar.model.selection.stable_bucket`).

An answer that none of those sets gives, with the reason it gives, is what a half-written set, a
set applied in the wrong region or to the wrong principals, or a mixed-up snapshot would produce:
the scenario asserts there is none. Pure: the scenario gathers the evidence, this judges it.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from authz_sidecar.model.engine import CompiledSet
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import stable_bucket


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # "{id}" stands for any number
    handle: str
    scope: str | None
    weight: float  # its share of the traffic, relative to the other routes

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the client saw it."""

    sent: float
    answered: float
    region: str
    principal: str
    route: Route
    status: int  # 0: no answer at all
    version: str  # the set version the upstream was told decided (allowed requests)
    reason: str  # x-authz-reason (denied requests)


@dataclass
class Timeline:
    """When each set could decide, as the audit records the pointer moves: the active version from
    each time on, and each shadow's canary weights from each time on (``{}`` once it left)."""

    active: list[tuple[float, str]] = field(default_factory=list)
    weights: dict[str, list[tuple[float, dict[str, int]]]] = field(default_factory=dict)

    def set_active(self, at: float, version: str) -> None:
        self.active.append((at, version))
        self.active.sort()

    def set_weights(self, version: str, at: float, weights: Mapping[str, int]) -> None:
        steps = self.weights.setdefault(version, [])
        steps.append((at, dict(weights)))
        steps.sort(key=lambda s: s[0])

    @staticmethod
    def _during(steps: Sequence[tuple[float, object]], start: float, end: float) -> list[int]:
        """Indices of the steps in force at some time in [start, end]."""
        times = [at for at, _ in steps]
        first = max(0, bisect_right(times, start) - 1)
        return [i for i in range(first, len(steps)) if steps[i][0] <= end]

    def active_during(self, start: float, end: float) -> set[str]:
        return {self.active[i][1] for i in self._during(self.active, start, end)}

    def weight_during(self, version: str, region: str, start: float, end: float) -> int:
        """The largest weight `version` had in `region` at any time in [start, end]."""
        steps = self.weights.get(version, [])
        return max((steps[i][1].get(region, 0) for i in self._during(steps, start, end)), default=0)


def in_cohort(principal: str, version: str, weight: int) -> bool:
    """Whether `version`'s canary at `weight` percent decides for `principal` (stickiness by
    principal, the default)."""
    return stable_bucket(principal, version) < weight * 100


@dataclass(frozen=True, slots=True)
class Verdict:
    request: Request
    candidates: tuple[str, ...]  # the sets that could have decided it
    explained_by: tuple[str, ...]  # those whose answer (and reason) it is
    error: bool  # no decision reached the client: no answer, a 5xx, a 403 Envoy made itself
    expected_allow: bool  # every active set in force allows it
    decided_by: str | None  # the one set whose answer it is, when only one candidate gives it

    @property
    def wrongly_denied(self) -> bool:
        return self.expected_allow and not self.error and self.request.status == 403

    @property
    def unexplained(self) -> bool:
        return not self.error and not self.explained_by


def judge(request: Request, sets: Mapping[str, CompiledSet], timeline: Timeline, slack: float) -> Verdict:
    start, end = request.sent - slack, request.answered + slack
    active = timeline.active_during(start, end)
    shadows = [
        version
        for version in timeline.weights
        if in_cohort(request.principal, version, timeline.weight_during(version, request.region, start, end))
    ]
    candidates = tuple(sorted(active | set(shadows)))
    route = request.route
    answers = {v: sets[v].decide(request.principal, route.handle, route.scope) for v in candidates if v in sets}
    expected_allow = bool(active) and all(answers.get(v) is Reason.ALLOWED for v in active)
    # A 403 without the sidecar's reason is Envoy's own (status_on_error: the sidecar did not answer).
    error = request.status not in (200, 403) or (request.status == 403 and not request.reason)
    if error:
        explained: tuple[str, ...] = ()
    elif request.status == 200:
        ok = request.version in answers and answers[request.version] is Reason.ALLOWED
        explained = (request.version,) if ok else ()
    else:
        explained = tuple(v for v, answer in answers.items() if answer.value == request.reason)
    return Verdict(
        request=request,
        candidates=candidates,
        explained_by=explained,
        error=error,
        expected_allow=expected_allow,
        decided_by=explained[0] if len(explained) == 1 else None,
    )


def judge_all(
    requests: Iterable[Request], sets: Mapping[str, CompiledSet], timeline: Timeline, slack: float
) -> list[Verdict]:
    return [judge(r, sets, timeline, slack) for r in requests]


@dataclass(frozen=True)
class SidecarView:
    """What one sidecar's /status said, recorded when it changed."""

    polled: float
    installed_at: float
    active: str
    weight: float | None  # the watched shadow's weight here; None: not live in its snapshot


@dataclass(frozen=True)
class ReportPoint:
    at: float  # when the sidecar published it
    region: str
    evaluations: int
    unexpected: int


@dataclass
class Observed:
    """What the scenario saw of one shadow while it was live, polled ten times a second."""

    version: str
    views: dict[str, list[SidecarView]] = field(default_factory=dict)
    reports: dict[str, list[ReportPoint]] = field(default_factory=dict)
    plan: list[tuple[float, str, int, str]] = field(default_factory=list)  # (polled, state, step, message)

    @property
    def state(self) -> str:
        return self.plan[-1][1] if self.plan else ""

    def everywhere(self, predicate: Callable[[SidecarView], bool]) -> bool:
        return bool(self.views) and all(views and predicate(views[-1]) for views in self.views.values())


def timeline_of(records: Sequence[dict[str, Any]]) -> Timeline:
    """The pointer moves of the audit: the active set, and each shadow's weights over time."""
    timeline = Timeline()
    for record in records:
        action, version, at = record.get("action"), record.get("version") or record.get("subject"), record["at"]
        if action == "init":
            timeline.set_active(at, str(version))
        elif action == "canary":
            timeline.set_weights(str(version), at, record.get("weights") or {})
        elif action in ("rollback", "promote"):
            timeline.set_weights(str(version), at, {})
            if action == "promote":
                timeline.set_active(at, str(version))
    return timeline


def first_rise(points: Sequence[ReportPoint], since: float) -> tuple[ReportPoint, int] | None:
    """The first report published after `since` whose unexpected count exceeds the one in force at
    `since` (the counts are cumulative per sidecar), with that count."""
    base = 0
    for point in points:
        if point.at <= since:
            base = point.unexpected
        elif point.unexpected > base:
            return point, base
    return None


@dataclass(frozen=True, slots=True)
class LoggedMismatch:
    """A sidecar's ``mismatch`` log line: the set it enforced for one request, and when."""

    at: float
    sidecar: str
    principal: str
    permission: str
    scope: str | None
    decision: str
    enforced_version: str

    @staticmethod
    def parse(line: str, sidecar: str) -> LoggedMismatch | None:
        try:
            entry = json.loads(line)
            if entry.get("event") != "mismatch":
                return None
            at = datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()
            return LoggedMismatch(
                at,
                sidecar,
                str(entry["principal"]),
                str(entry["permission"]),
                entry.get("scope"),
                str(entry["decision"]),
                str(entry["enforced_version"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def confirmed_by_log(verdicts: Iterable[Verdict], logged: Iterable[LoggedMismatch]) -> list[Verdict]:
    """The verdicts whose deciding set a sidecar's mismatch log confirms: a line for the same
    principal, permission and scope, logged between the request's sending and its answer, naming
    the set the verdict says decided, and the answer the client got.

    Joined by time because the sidecar logs Envoy's stream id, which the client never sees."""
    index: dict[tuple[str, str, str | None], list[LoggedMismatch]] = {}
    for entry in logged:
        index.setdefault((entry.principal, entry.permission, entry.scope), []).append(entry)
    confirmed = []
    for verdict in verdicts:
        r = verdict.request
        decision = "allow" if r.status == 200 else "deny"
        if any(
            r.sent <= e.at <= r.answered and e.enforced_version == verdict.decided_by and e.decision == decision
            for e in index.get((r.principal, r.route.handle, r.route.scope), ())
        ):
            confirmed.append(verdict)
    return confirmed


def share_bound(weight: int, principals: int, requests: int, sigmas: float = 3.0) -> int:
    """The most requests of `requests` a canary at `weight` percent may decide, with a tolerance.

    The canary's cohort is drawn by hash from `principals`, so its share of principals is itself a
    draw around `weight` (standard deviation sqrt(p(1-p)/principals)); which principals send the
    `requests` is another (sqrt(p(1-p)/requests)). `sigmas` standard deviations of the two
    together bound the share a correct canary shows more than 99.8% of the time."""
    p = weight / 100
    spread = math.sqrt(p * (1 - p) / max(principals, 1) + p * (1 - p) / max(requests, 1))
    return math.ceil(requests * min(1.0, p + sigmas * spread))
