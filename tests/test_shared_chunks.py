"""Sets share their chunks in etcd: a proposal writes only the chunks its changes fall in, and a
sweep removes only the chunks no head names, never one a head being written relies on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from authz_sidecar.bench.rebuild import policy
from authz_sidecar.documents import dump_permission_set
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.model.values import PermissionSet
from authz_sidecar.store import layout
from authz_sidecar.store.etcd import Etcd, EtcdOptions
from authz_sidecar.store.policy import PolicyStore

from .helpers import unique_prefix

GRANTS = 60_000  # ~2.6 MB of canonical JSON: ~11 chunks


def _spread(version: str, editors: tuple[int, ...]) -> PermissionSet:
    """The bench's set with the given principals made editors (wherever they fall)."""
    base = policy(GRANTS, version)
    grants = tuple(
        g._replace(roles=("editor",)) if g.principal in {f"user-{i}" for i in editors} else g for g in base.grants
    )
    return PermissionSet(roles=base.roles, grants=grants, meta=base.meta)


async def _chunks(etcd: Etcd, lay: layout.Layout) -> set[str]:
    return set(await etcd.keys(lay.chunks))


def _with_store(endpoints: str, body: Callable[[Etcd, PolicyStore], Awaitable[None]]) -> None:
    async def run() -> None:
        async with Etcd(EtcdOptions(endpoints=(endpoints,))) as etcd:
            await body(etcd, PolicyStore(etcd, unique_prefix()))

    asyncio.run(run())


def test_a_proposal_writes_only_the_chunks_its_changes_fall_in(etcd: EtcdCluster) -> None:
    async def body(client: Etcd, store: PolicyStore) -> None:
        lay = store.layout
        v1 = policy(GRANTS, "v1")
        assert await store.write_set(v1, dump_permission_set(v1))
        first = await _chunks(client, lay)
        v2 = _spread("v2", (5, 30_000, 59_000))
        before = (await client.current(lay.root))[0]
        assert await store.write_set(v2, dump_permission_set(v2))
        after = (await client.current(lay.root))[0]
        added = await _chunks(client, lay) - first
        assert 10 <= len(first) <= 20
        assert 1 <= len(added) <= 4  # the metadata's chunk and those the three principals fall in
        assert after - before == len(added) + 1  # each new chunk, then the head (with the epoch)
        assert await store.document("v2") == dump_permission_set(v2)
        assert not await store.write_set(v2, dump_permission_set(v2))  # the same again: a no-op

    _with_store(etcd.endpoints, body)


def test_a_sweep_removes_only_the_chunks_no_head_names(etcd: EtcdCluster) -> None:
    async def body(client: Etcd, store: PolicyStore) -> None:
        lay = store.layout
        v1, v2 = policy(GRANTS, "v1"), _spread("v2", (5, 30_000))
        await store.write_set(v1, dump_permission_set(v1))
        only_v1 = await _chunks(client, lay)
        await store.write_set(v2, dump_permission_set(v2))
        only_v1 -= set(lay.chunk_keys(layout.split("v2", dump_permission_set(v2))[0]))
        await client.call(client.kv.put, lay.chunk("f" * 64), b"a chunk whose head was never written")
        assert await store.sweep_chunks() == 1
        await client.call(client.kv.delete, lay.head("v1"))
        assert await store.sweep_chunks() == len(only_v1)
        assert await store.document("v2") == dump_permission_set(v2)
        assert await _chunks(client, lay) == set(lay.chunk_keys(layout.split("v2", dump_permission_set(v2))[0]))

    _with_store(etcd.endpoints, body)


def test_a_sweep_while_a_set_is_written_never_leaves_its_head_naming_a_swept_chunk(etcd: EtcdCluster) -> None:
    """The race a shared chunk opens: a writer sees a chunk in etcd and does not write it, a sweep
    (no head names it yet) deletes it, the writer writes its head. Both compare and move the
    chunks epoch, so the writer's head is refused and it looks again."""

    async def body(client: Etcd, store: PolicyStore) -> None:
        lay = store.layout
        v1 = policy(GRANTS, "v1")
        await store.write_set(v1, dump_permission_set(v1))
        await client.call(client.kv.delete, lay.head("v1"))  # pruned: its chunks are no head's
        keys = client.keys
        swept: list[int] = []

        async def keys_then_sweep(prefix: str) -> list[str]:
            found = await keys(prefix)
            if prefix == lay.chunks and not swept:  # the writer has looked; a sweep runs now
                swept.append(0)
                swept[0] = await PolicyStore(client, lay.prefix).sweep_chunks()
            return found

        client.keys = keys_then_sweep  # type: ignore[method-assign]
        v3 = PermissionSet(roles=v1.roles, grants=v1.grants, meta=replace(v1.meta, version="v3"))
        assert await store.write_set(v3, dump_permission_set(v3))
        client.keys = keys  # type: ignore[method-assign]
        assert swept and swept[0] >= 10
        assert await store.document("v3") == dump_permission_set(v3)

    _with_store(etcd.endpoints, body)


def test_a_head_written_while_a_sweep_runs_keeps_its_chunks(etcd: EtcdCluster) -> None:
    """The other order: the sweep has read the heads, a set naming unreferenced chunks is then
    written, and the sweep's deletions are refused; it reads again and keeps them."""

    async def body(client: Etcd, store: PolicyStore) -> None:
        lay = store.layout
        v1 = policy(GRANTS, "v1")
        await store.write_set(v1, dump_permission_set(v1))
        await client.call(client.kv.delete, lay.head("v1"))
        keys = client.keys
        written: list[bool] = []

        async def keys_then_write(prefix: str) -> list[str]:
            found = await keys(prefix)
            if prefix == lay.chunks and not written:  # the sweep has read the heads
                written.append(False)
                written[0] = await PolicyStore(client, lay.prefix).write_set(v1, dump_permission_set(v1))
            return found

        client.keys = keys_then_write  # type: ignore[method-assign]
        await store.sweep_chunks()
        client.keys = keys  # type: ignore[method-assign]
        assert written == [True]
        assert await store.document("v1") == dump_permission_set(v1)

    _with_store(etcd.endpoints, body)
