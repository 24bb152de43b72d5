"""FilterManifest's decisions: a principal, an action, and for each origin account of a manifest's
blocks, allowed or why not.

A manifest is judged per account, not per block: every block of one account gets the same answer
from the same set, so a request takes the snapshot and selects the enforced set once (all its blocks
are judged by one set version, the one its summary names), then decides each account the first time
a block names it. What a block adds is a dict lookup; the gRPC front does that loop over protobuf
messages itself (:mod:`authz_sidecar.fronts.manifest`), and this module holds what the loop reads
and what the request leaves behind: counters, the dark launch's observations, the audit log.

What is cached, and why not the manifest's digest: the answer for a block depends only on
(principal, handle, account, snapshot), so that is the key. Within a request, :attr:`ManifestRequest.accounts`
keeps each account's verdict (bounded by :data:`MAX_ACCOUNTS`); across requests, the verdict is kept
in the snapshot's own memo (the one Check uses, bounded by the decider's ``MEMO_LIMIT`` and emptied
whole when full), so a new set version, which always comes in a new snapshot, starts from nothing
without a TTL. A digest of the whole manifest is known only after its last block, when every block
has already been answered; keyed per account, the cache hits for manifests never seen before too.

Telemetry is per account, never per block: each account's decision is counted and observed by the
dark launch once per request (the decision counters, shadow reports, the decision log and the
mismatch log, as for a Check), and when the request ends each account leaves one audit record
(``manifest_account``) and the request one (``manifest_request``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import structlog

from authz_sidecar.caches import remember
from authz_sidecar.decision.decider import MEMO_LIMIT, Decider
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.documents import MAGIC_WORDS, SCOPE_RE
from authz_sidecar.documents.checks import is_principal
from authz_sidecar.model.engine import CompiledSet
from authz_sidecar.model.evaluation import Outcome, judge
from authz_sidecar.model.reasons import Reason
from authz_sidecar.model.selection import Selection, select
from authz_sidecar.model.snapshot import Snapshot
from authz_sidecar.telemetry.metrics import Metrics

# The handle asked is "snapshots:<action>"; the action is a handle's action part.
RESOURCE = "snapshots"
ACTION_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
# Blocks per request: past it the request ends (RESOURCE_EXHAUSTED), with no summary.
MAX_BLOCKS = 10_000_000
# Distinct origin accounts per request: each keeps a verdict and leaves an audit record.
MAX_ACCOUNTS = 10_000
# An account longer than a scope's value may be (SCOPE_RE) makes no scope.
MAX_ACCOUNT_CHARS = 256
# Each of a block's other string fields (block_id, origin_volume, checksum).
MAX_FIELD_CHARS = 512
_SCOPE_PREFIX = "account:"

log = structlog.get_logger("authz_sidecar.manifest")


class ManifestError(Exception):
    """A request refused whole: `result` is how it is counted (telemetry.metrics.MANIFEST_RESULTS)."""

    def __init__(self, result: str, message: str, *, code: Any = None) -> None:
        super().__init__(message)
        self.result = result
        self.message = message
        # The gRPC status to end the call with, when the front's default for `result` is not it.
        self.code = code


def handle_for(action: str) -> str:
    """The handle an action asks for, or ManifestError: the action is checked as a handle's action
    part (lower-case, no wildcard, no magic word), so a typo never becomes a deny per block."""
    if not ACTION_RE.fullmatch(action) or action in MAGIC_WORDS:
        raise ManifestError(
            "invalid",
            f"action {action[:64]!r} is not an action (lower-case letters, digits, '-' and '_', such as "
            f"'export'; no wildcards or magic words)",
        )
    return f"{RESOURCE}:{action}"


def account_scope(account: str) -> str | None:
    """The scope an origin account is judged in, or None when it makes none (empty, too long, a
    control character, whitespace, a wildcard or a magic word): a grant could never be scoped to it."""
    if not account or len(account) > MAX_ACCOUNT_CHARS or account in MAGIC_WORDS:
        return None
    scope = _SCOPE_PREFIX + account
    return scope if SCOPE_RE.fullmatch(scope) else None


@dataclass(slots=True, eq=False)
class AccountTally:
    """One origin account within one request: its verdict, and how many of its blocks were seen.

    The front's loop reads `allowed` and `reason` and counts into `blocks` (judged by the verdict)
    or `malformed` (refused as malformed whatever the verdict)."""

    account: str | None
    allowed: bool
    reason: str
    outcome: Outcome | None = None
    blocks: int = 0
    malformed: int = 0

    @property
    def refused(self) -> int:
        return self.malformed + (0 if self.allowed else self.blocks)

    @property
    def refused_malformed(self) -> int:
        """Blocks refused as malformed: all of them for the accounts that make no scope."""
        return self.malformed + (self.blocks if self.reason == Reason.MALFORMED_BLOCK.value else 0)


class ManifestJudge:
    """What every FilterManifest request of one sidecar shares: the snapshot holder, the decider
    (its memo and telemetry), the metrics."""

    def __init__(
        self, store: SnapshotStore, decider: Decider, metrics: Metrics, *, stickiness: str = "principal"
    ) -> None:
        self._store = store
        self.decider = decider
        self.metrics = metrics
        self._by_request_id = stickiness == "request_id"

    def begin(self, principal: str, action: str, at_least_revision: int = 0) -> ManifestRequest:
        """Take the snapshot and select the set for a whole request, or ManifestError before any
        block is read: a bad principal or action, an action no catalog names, no snapshot, or one
        older than the revision asked for."""
        if not is_principal(principal):
            raise ManifestError("invalid", "the header names no principal, or one that is not a principal name")
        handle = handle_for(action)
        if at_least_revision < 0:
            raise ManifestError("invalid", f"at_least_revision {at_least_revision} is negative")
        snapshot = self._store.snapshot
        if snapshot is None:
            raise ManifestError("unavailable", "no policy snapshot is loaded yet")
        if at_least_revision > self._store.applied_revision:
            raise ManifestError(
                "stale",
                f"the sidecar has applied etcd up to revision {self._store.applied_revision}, not "
                f"{at_least_revision}; try again once it has caught up",
            )
        if handle not in snapshot.handles:
            raise ManifestError("invalid", f"action {action!r}: {handle} is not in any registered catalog")
        request_id = uuid.uuid4().hex
        key = request_id if self._by_request_id else principal
        enforced, selection = select(snapshot, principal, None, key)
        # As for a Check: answers are reused across requests only when the selection depends on the
        # principal alone.
        reusable = key == principal or not snapshot.canaries
        return ManifestRequest(
            self,
            snapshot,
            principal=principal,
            handle=handle,
            enforced=enforced,
            selection=selection,
            request_id=request_id,
            reusable=reusable,
        )


class ManifestRequest:
    """One FilterManifest request's state, bounded whatever the manifest's length: a verdict per
    distinct account (at most :data:`MAX_ACCOUNTS`) and a count of blocks."""

    __slots__ = (
        "_judge",
        "_malformed",
        "_reusable",
        "accounts",
        "blocks",
        "enforced",
        "handle",
        "principal",
        "request_id",
        "selection",
        "snapshot",
    )

    def __init__(
        self,
        judge_: ManifestJudge,
        snapshot: Snapshot,
        *,
        principal: str,
        handle: str,
        enforced: CompiledSet,
        selection: Selection,
        request_id: str,
        reusable: bool,
    ) -> None:
        self._judge = judge_
        self.snapshot = snapshot
        self.principal = principal
        self.handle = handle
        self.enforced = enforced
        self.selection = selection
        self.request_id = request_id
        self._reusable = reusable
        # Origin account as sent -> its tally; accounts that make no scope share one tally.
        self.accounts: dict[str, AccountTally] = {}
        self._malformed = AccountTally(None, False, Reason.MALFORMED_BLOCK.value)
        self.blocks = 0

    @property
    def version(self) -> str:
        return self.enforced.meta.version

    def admit(self, count: int) -> None:
        """Count `count` more blocks before they are judged; past :data:`MAX_BLOCKS` the request
        ends (none of those blocks is answered, and no summary follows)."""
        self.blocks += count
        if self.blocks > MAX_BLOCKS:
            raise ManifestError("too_large", f"a manifest has at most {MAX_BLOCKS:,} blocks; split it")

    def account(self, account: str) -> AccountTally:
        """The tally of an account seen for the first time in this request: judged now, its
        decision counted and observed once."""
        scope = account_scope(account)
        if scope is None:
            if len(account) <= MAX_ACCOUNT_CHARS:
                self._keep(account, self._malformed)
            return self._malformed
        outcome = self._decide(scope)
        tally = AccountTally(account, outcome.allowed, outcome.reason.value, outcome)
        self._keep(account, tally)
        self._judge.decider.record(self.snapshot, outcome, self.principal, scope, self.request_id)
        return tally

    def _keep(self, account: str, tally: AccountTally) -> None:
        if len(self.accounts) >= MAX_ACCOUNTS:
            raise ManifestError("too_large", f"a manifest's blocks come from at most {MAX_ACCOUNTS:,} accounts")
        self.accounts[account] = tally

    def _decide(self, scope: str) -> Outcome:
        if not self._reusable:
            return self._judged(scope)
        memo: dict[tuple[str, str, str, str], Outcome] = self.snapshot.memo
        key = ("manifest", self.principal, self.handle, scope)
        found = memo.get(key)
        if found is None:
            found = remember(memo, key, self._judged(scope), MEMO_LIMIT)
        return found

    def _judged(self, scope: str) -> Outcome:
        ev = judge(self.snapshot, self.enforced, self.principal, self.handle, scope, selection=self.selection)
        return Outcome(ev.reason, ev, self.handle)

    def tallies(self) -> list[AccountTally]:
        """Each account's tally once, the shared one for unusable accounts last if it counted any."""
        found = [t for t in self.accounts.values() if t is not self._malformed]
        if self._malformed.blocks or self._malformed.malformed:
            found.append(self._malformed)
        return found

    def counts(self) -> tuple[int, int]:
        """(allowed, refused) blocks so far."""
        allowed = refused = 0
        for tally in self.tallies():
            if tally.allowed:
                allowed += tally.blocks
            refused += tally.refused
        return allowed, refused

    def finish(self, result: str) -> None:
        """Count the request and its blocks, and leave one audit record per account and one for the
        request. Called once, however the request ended."""
        tallies = self.tallies()
        self._judge.metrics.manifest(
            result,
            [
                (reason, n)
                for t in tallies
                for reason, n in ((t.reason, t.blocks), (Reason.MALFORMED_BLOCK.value, t.malformed))
                if n
            ],
        )
        common = {
            "request_id": self.request_id,
            "principal": self.principal,
            "permission": self.handle,
            "version": self.version,
            "revision": self.snapshot.revision,
            "result": result,
        }
        allowed_total = refused_total = 0
        for tally in tallies:
            evaluation = tally.outcome.evaluation if tally.outcome is not None else None
            allowed = tally.blocks if tally.allowed else 0
            allowed_total += allowed
            refused_total += tally.refused
            log.info(
                "manifest_account",
                account=tally.account,
                allowed=allowed,
                refused=tally.refused,
                reason=tally.reason,
                malformed=tally.refused_malformed,
                decided_by=evaluation.decided_by if evaluation is not None else None,
                selection=self.selection.value,
                mismatch=evaluation.mismatch if evaluation is not None else False,
                **common,
            )
        log.info(
            "manifest_request",
            accounts=len(tallies),
            blocks=allowed_total + refused_total,
            allowed=allowed_total,
            refused=refused_total,
            **common,
        )
