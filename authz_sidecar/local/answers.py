"""Traffic through both regions' Envoys for ``make demo``, every answer recorded, and how answers
changed between two spans of time: what shows that a canary moved one region and not the other.

A few principals each send the same few requests, round robin and paced, so that every (principal,
request) is asked in every region every round: an answer that changed is then a fact about the
sets, not about which requests happened to be sent.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from authz_sidecar.local.loadgen import send
from authz_sidecar.local.narration import until
from authz_sidecar.local.portplan import REGIONS
from authz_sidecar.local.processes import LOOPBACK
from authz_sidecar.local.tokens import DemoIssuer

REQUESTS = (("GET", "/things/{id}"), ("PUT", "/things/{id}"), ("GET", "/things"), ("GET", "/accounts/acme/things"))


@dataclass(frozen=True)
class Answer:
    sent: float
    answered: float
    region: str
    principal: str
    request: str  # "GET /things/{id}"
    status: int
    decided: str  # the set version the upstream was told (allowed), or the sidecar's reason

    @property
    def key(self) -> tuple[str, str]:
        return self.principal, self.request

    def shown(self) -> str:
        return f"{self.status} {self.decided}".strip()


class Traffic:
    """Requests through each region's Envoy, round robin over every (principal, request), paced,
    on one keep-alive connection per region; every answer recorded with the wall clock the audit
    uses. Bounded by `limit` seconds whatever the demo does."""

    def __init__(
        self,
        envoys: Mapping[str, str],
        issuer: DemoIssuer,
        principals: Sequence[str],
        rate: float,
        limit: float = 600.0,
    ) -> None:
        self.envoys = envoys  # region -> Envoy's base URL
        self.combos = [(p, m, path) for p in principals for m, path in REQUESTS]
        self.tokens = {p: issuer.token(p, ttl=3600) for p in principals}
        self.rate = rate
        self.limit = limit
        self.stop = threading.Event()
        self.rounds = dict.fromkeys(REGIONS, 0)
        self.last_round_started = dict.fromkeys(REGIONS, 0.0)  # of the last complete round, wall clock
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(r,), daemon=True) for r in REGIONS]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)

    def answers(self, region: str | None = None, since: float = 0.0, until: float = float("inf")) -> list[Answer]:
        """Answers sent at or after `since` and answered before `until`."""
        with self._lock:
            found = list(self._answers)
        return [a for a in found if (region is None or a.region == region) and a.sent >= since and a.answered < until]

    def wait_rounds(self, rounds: int, timeout: float) -> None:
        """Until every region has sent every (principal, request) `rounds` more times."""
        target = {r: n + rounds for r, n in self.rounds.items()}
        until(lambda: all(self.rounds[r] >= target[r] for r in REGIONS), timeout, "traffic through both Envoys")

    def wait_round_since(self, since: float, timeout: float) -> None:
        """Until every region has sent a whole round begun at or after `since` (wall clock)."""
        until(
            lambda: all(self.last_round_started[r] >= since for r in REGIONS),
            timeout,
            "a round of traffic through both Envoys",
        )

    def _run(self, region: str) -> None:
        url = urlsplit(self.envoys[region])
        conn = http.client.HTTPConnection(url.hostname or LOOPBACK, url.port or 80, timeout=5)
        start = time.monotonic()
        slot = 0
        try:
            while not self.stop.is_set() and time.monotonic() - start < self.limit:
                began = time.time()
                for n, (principal, method, path) in enumerate(self.combos):
                    delay = start + slot / self.rate - time.monotonic()
                    slot += 1
                    if (delay > 0 and self.stop.wait(delay)) or self.stop.is_set():
                        return
                    headers = {"authorization": f"Bearer {self.tokens[principal]}", "content-length": "0"}
                    sent = time.time()
                    status, version, reason = send(conn, method, path.replace("{id}", str(40 + n)), headers)
                    decided = version if status == 200 else reason
                    answer = Answer(sent, time.time(), region, principal, f"{method} {path}", status, decided)
                    with self._lock:
                        self._answers.append(answer)
                self.last_round_started[region] = began
                self.rounds[region] += 1
        finally:
            conn.close()


def changed(before: Sequence[Answer], during: Sequence[Answer]) -> dict[tuple[str, str], Counter[str]]:
    """Per (principal, request), the answers in `during` whose status none in `before` had."""
    usual: dict[tuple[str, str], set[int]] = {}
    for answer in before:
        usual.setdefault(answer.key, set()).add(answer.status)
    found: dict[tuple[str, str], Counter[str]] = {}
    for answer in during:
        statuses = usual.get(answer.key)
        if statuses is not None and answer.status not in statuses:
            was = "/".join(str(s) for s in sorted(statuses))
            found.setdefault(answer.key, Counter())[f"{was} -> {answer.shown()}"] += 1
    return found


def describe_changes(found: Mapping[tuple[str, str], Counter[str]]) -> list[str]:
    return [
        f"{principal} {request}: {what} (x{n})"
        for (principal, request), counts in sorted(found.items())
        for what, n in counts.most_common()
    ]


def usual_answers(answers: Sequence[Answer], principal: str) -> str:
    counts = Counter(f"{a.request}: {a.shown()}" for a in answers if a.principal == principal)
    return "; ".join(f"{what} (x{n})" for what, n in sorted(counts.items()))
