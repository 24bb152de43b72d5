"""Leader election among controllers, through etcd: one key, created only if absent, on a lease.

The controller that creates ``<prefix>/controller/leader`` leads until its lease lapses (it stops
renewing: it died, hung, or lost etcd) or it resigns. Its term is identified by the key's create
revision: every action a leader takes is a transaction that compares that revision
(:meth:`Leadership.compare`), so a leader deposed without noticing (paused past its lease, cut off)
can never write again, whatever it believes. That compare is the fencing token; the lease is only
how a dead leader's term ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
from etcd3aio._protobuf import Compare

from authz_sidecar.store.etcd import Etcd

log = structlog.get_logger("authz_sidecar.store.election")


class LostLeadershipError(Exception):
    """This controller's term ended (its lease lapsed, or the key is another's)."""


@dataclass(frozen=True, slots=True)
class Leadership:
    key: str
    ident: str
    lease: int
    # The election key's create revision: this term's fencing token.
    term: int

    def compare(self) -> Compare:
        """True in a transaction only while this term lasts."""
        return Compare(result=Compare.EQUAL, target=Compare.CREATE, key=self.key.encode(), create_revision=self.term)


class Election:
    def __init__(self, etcd: Etcd, key: str, ident: str, ttl: int = 5) -> None:
        self.etcd = etcd
        self.key = key
        self.ident = ident
        self.ttl = max(2, ttl)

    async def leader(self) -> tuple[str, int] | None:
        """Who leads now and their term, as etcd says."""
        found = await self.etcd.call(self.etcd.kv.get, self.key)
        if not found.kvs:
            return None
        return found.kvs[0].value.decode("utf-8", "replace"), found.kvs[0].create_revision

    async def try_lead(self) -> Leadership | None:
        """Become the leader if nobody is; None if someone is."""
        lease = await self.etcd.call(self.etcd.lease.grant, self.ttl)
        kv = self.etcd.kv
        response = await self.etcd.call(
            kv.txn,
            [kv.txn_compare_create_revision(self.key, 0)],
            [kv.txn_op_put(self.key, self.ident, lease=lease.ID)],
        )
        if not response.succeeded:
            with contextlib.suppress(Exception):
                await self.etcd.call(self.etcd.lease.revoke, lease.ID)
            return None
        held = Leadership(self.key, self.ident, lease.ID, response.header.revision)
        log.info("leader_elected", controller=self.ident, term=held.term, ttl=self.ttl)
        return held

    async def campaign(self, poll: float | None = None) -> Leadership:
        """Wait until this controller leads. etcd being away is waited out, not raised."""
        poll = poll if poll is not None else self.ttl / 3
        while True:
            try:
                held = await self.try_lead()
                if held is not None:
                    return held
            except Exception as exc:
                log.warning("election_failed", controller=self.ident, error=str(exc) or type(exc).__name__)
            await asyncio.sleep(poll)

    async def renew(self, held: Leadership) -> None:
        """Renew the lease once; LostLeadershipError if the term is over."""
        call = self.etcd.lease.keep_alive(held.lease)
        try:
            async with asyncio.timeout(self.etcd.options.timeout):
                response = await call.read()
        finally:
            call.cancel()
        if response is None or getattr(response, "TTL", 0) <= 0:
            raise LostLeadershipError(f"the lease of term {held.term} lapsed")
        now = await self.leader()
        if now is None or now[1] != held.term:
            raise LostLeadershipError(f"the election key is no longer term {held.term}'s")

    async def keep(self, held: Leadership) -> None:
        """Renew every third of the lease until the term ends (LostLeadershipError). A renewal that
        cannot reach etcd is retried until the lease would have lapsed: then the term is over."""
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew(held)
                last_renewed = asyncio.get_running_loop().time()
            except LostLeadershipError:
                raise
            except Exception as exc:
                if asyncio.get_running_loop().time() - last_renewed >= self.ttl:
                    raise LostLeadershipError(f"etcd unreachable for the lease's {self.ttl}s: {exc}") from None
                log.warning("lease_not_renewed", controller=self.ident, error=str(exc) or type(exc).__name__)

    async def resign(self, held: Leadership) -> None:
        """End the term now (the key goes with the lease), so another takes over at once."""
        with contextlib.suppress(Exception):
            await self.etcd.call(self.etcd.lease.revoke, held.lease)
