"""The state a successor reducer fetches (``fednode.node.checkpoint``), over the in-memory
transport: a takeover that resumes while a prefetch of the same blob is under way waits for it
(it used to fail "a fetch of blob ... is already running" and lose its term), and a checkpoint's
dead first holder is tried last: a frozen one would hold the fetch up for good."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
from federation_kit import open_federation

from fednode.node.checkpoint import fetch_state_blob
from fednode.node.runtime import Node
from fednode.protocol.membership import PeerState
from fednode.wire import BlobRef


async def _until(node: Node, condition: Callable[[], bool]) -> None:
    """Wait, on membership changes, until ``condition()`` holds."""
    changed = trio.Event()

    def listener(events: object) -> None:
        changed.set()

    node.on_membership(listener)
    while not condition():
        await changed.wait()
        changed = trio.Event()


async def test_two_fetches_of_one_state_blob_share_one_transfer(tmp_path: Path) -> None:
    # Prepare: the holder has a 2 MB blob; the standby has none
    async with open_federation(tmp_path) as fed:
        holder = await fed.add("reducer", "reducer", 1)
        standby = await fed.add("standby", "reducer", 2)
        data = bytes(range(256)) * 8192
        key = holder.ctx.store.put(data)
        ref = BlobRef(digest=key, size=len(data))
        with trio.fail_after(10):
            await standby.host.connect(holder.host.listen_addrs()[0])
            # Execute: a prefetch and a resume ask for it at once
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(fetch_state_blob, standby.ctx, ref, [holder.ctx.peer])
        # Assert: both got it, one transfer served it, and both hold a pin
        assert standby.ctx.store.has(key) and standby.ctx.fetches == {}
        assert holder.ctx.blobs.statistics().served == 1
        standby.ctx.store.unpin(key)
        assert standby.ctx.store.pinned(key)


async def test_a_dead_first_holder_is_tried_after_the_live_ones(tmp_path: Path) -> None:
    # Prepare: the checkpoint names its reducer first; the reducer is frozen, dead in the view
    async with open_federation(tmp_path) as fed:
        reducer = await fed.add("reducer", "reducer", 1)
        combiner = await fed.add("combiner", "combiner", 10)
        standby = await fed.add("standby", "reducer", 2)
        data = b"model" * 1000
        for member in (reducer, combiner):
            key = member.ctx.store.put(data)
        with trio.fail_after(20):
            for member in (reducer, combiner):
                await standby.host.connect(member.host.listen_addrs()[0])
            view = standby.ctx.node.view
            await _until(standby.ctx.node, lambda: len(view.members()) >= 2)
            # Frozen rather than gone (SIGSTOP, a machine swapping): whatever it is sent waits.
            for other in (combiner, standby):
                fed.net.set_link(reducer.ctx.peer, other.ctx.peer, latency=3600.0)

            def reducer_dead() -> bool:
                member = view.member(reducer.ctx.peer)
                return member is not None and member.state is PeerState.DEAD

            await _until(standby.ctx.node, reducer_dead)
        # Execute
        with trio.fail_after(5):  # a request to the frozen reducer times out after 10 s
            await fetch_state_blob(
                standby.ctx, BlobRef(digest=key, size=len(data)), [reducer.ctx.peer]
            )
        # Assert: the combiner served it (asking the reducer first would wait for an hour)
        assert standby.ctx.store.has(key)
        assert combiner.ctx.blobs.statistics().served == 1
