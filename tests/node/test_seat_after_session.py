"""The reducer seat of an ``auto`` node. Its own rank score is the one its peers compute from its
heartbeats. A seat whose session ended stays registered with its node (an ``auto`` node runs one
seat per session, in turn): it must take nothing the node still hands it. A checkpoint arriving
late used to make the ended seat prefetch its model in its closed nursery, which crashed the
node's gossip task and with it the whole ``auto`` node."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from federation_kit import open_federation, session_config

from fednode.crypto import seal_bytes
from fednode.node.checkpoint import make_checkpoint
from fednode.node.leader import ReducerSeat
from fednode.protocol.leader_actions import reducer_score
from fednode.wire import Digest, Envelope, decode


async def test_an_ended_seat_ignores_a_late_checkpoint(tmp_path: Path) -> None:
    # Prepare: an auto node's seat that ran, then saw its session end
    async with open_federation(tmp_path) as fed:
        reducer = await fed.add("reducer", "reducer", 1)
        auto = await fed.add("auto-0", "auto", 40)
        seat = ReducerSeat(auto.ctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(seat.run)
            await trio.testing.wait_all_tasks_blocked()
            seat._finished.set()  # as _session_over does when the session's end is heard
        late = make_checkpoint(
            reducer.ctx,
            config=session_config(),
            session="s1",
            term=1,
            progress=(1, Digest(bytes(32)), 100, ()),  # a model the auto node does not hold
            optimizer=None,
            members=(reducer.ctx.peer, auto.ctx.peer),
            lease_ms=5000,
            now=trio.current_time(),
        )
        envelope = decode(seal_bytes(reducer.key, late), Envelope)
        # Execute: the node's gossip task hands it over, as it does every control message
        seat._on_control(envelope, reducer.ctx.peer)
        seat._on_membership([])
        # Assert: nothing taken, nothing started (no RuntimeError from a closed nursery)
        assert seat.machine.checkpoint is None


async def test_a_seat_ranks_itself_by_the_score_its_peers_see(tmp_path: Path) -> None:
    # Prepare: peers rank a standby by its heartbeats (reducer_score); so must the standby, or
    # every auto standby puts all the others first and all claim the same term at once
    async with open_federation(tmp_path) as fed:
        await fed.add("reducer", "reducer", 1)
        auto = await fed.add("auto-0", "auto", 40)
        seat = ReducerSeat(auto.ctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(seat.run)
            await trio.testing.wait_all_tasks_blocked()
            # Execute
            seat._on_membership([])
            heartbeat = auto.ctx.node.last_heartbeat
            # Assert
            assert heartbeat is not None
            assert seat.machine.score == reducer_score(heartbeat) > 0
            nursery.cancel_scope.cancel()
