"""Node layer: an ``auto`` node, which holds data, serves as a combiner when elected, and stands
for reducer.

``fednode start --role auto`` runs three drivers in one process, on one blob store:

- a :class:`~fednode.node.client.ClientDriver`: it trains on its share of the data every round
  that plans it, like any client;
- a :class:`~fednode.node.combiner.CombinerDriver`: idle in the rounds whose tree does not elect
  it; in those that do, it aggregates the clients placed under it, itself first (the election
  puts an elected ``auto`` node under itself, ``fednode.protocol.election``). Its own update
  reaches it without a stream (:meth:`CombinerDriver.deliver_local`: a libp2p host does not dial
  itself), through the same admission and counting as a pushed one, so it is counted once; the
  round's model is fetched once for both halves (:meth:`RoleContext.fetch`);
- a :class:`~fednode.node.leader.ReducerSeat` of role ``auto``: a standby that takes over when
  the reducer dies (explicit reducers rank first). Given a session (``--session FILE``), it may
  also start that session itself when no explicit reducer is in sight once its grace period
  ends (the initial election, ``protocols/rounds.md``). A seat serves one session; the next
  seat ignores the sessions already seen to end.

A reducer's tree never holds the reducer itself: an ``auto`` node that leads trains nothing
while it leads.
"""

from __future__ import annotations

import logging

import trio

from fednode.node.client import ClientDriver
from fednode.node.combiner import CombinerDriver
from fednode.node.context import RoleContext
from fednode.node.leader import ReducerSeat
from fednode.task.runner import TaskRunner
from fednode.wire import SessionConfig, SessionEnded

log = logging.getLogger(__name__)


class AutoDriver:
    """Runs an ``auto`` node until cancelled or, with ``exit_after_session``, until the session
    it follows ended (and, if it led that session, its reducer is done with it).

    Args:
        ctx: the node's role equipment.
        runner: trains this node's updates, and evaluates global models while it leads.
        partition_index, partition_count: which share of the task's data this node holds.
        session: ``(name, config)`` this node may start if no explicit reducer is around.
        wait_for, wait_for_combiners, lease: as :class:`~fednode.node.leader.ReducerSeat`.
    """

    def __init__(
        self,
        ctx: RoleContext,
        runner: TaskRunner,
        *,
        partition_index: int = 0,
        partition_count: int = 1,
        session: tuple[str, SessionConfig] | None = None,
        wait_for: int | None = None,
        wait_for_combiners: int = 1,
        lease: float | None = None,
        exit_after_session: bool = False,
    ) -> None:
        self.ctx = ctx
        self.runner = runner
        self.session = session
        self.wait_for = wait_for
        self.wait_for_combiners = wait_for_combiners
        self.lease = lease
        self.exit_after_session = exit_after_session
        self.combiner = CombinerDriver(ctx)
        self.client = ClientDriver(
            ctx,
            runner,
            partition_index=partition_index,
            partition_count=partition_count,
            exit_after_session=exit_after_session,
            local_combiner=self.combiner,
        )
        self.seat: ReducerSeat | None = None
        self.ended: SessionEnded | None = None  #: the last session a seat of ours saw end
        self.led: SessionEnded | None = None  #: the end of the last session we led

    async def run(self) -> SessionEnded | None:
        """Run (see the class docstring); returns the end of the session we led last, if any."""
        done = trio.Event()

        async def client() -> None:
            await self.client.run()  # returns only with exit_after_session
            if not self._leading():  # else the seat ends us, once the reducer is done
                done.set()

        async def seats() -> None:
            await self._seats()  # returns only with exit_after_session
            if self.led is not None and self.led is self.ended:
                done.set()  # a follower ends with its client half (it waits for the results)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.combiner.run)
            nursery.start_soon(client)
            nursery.start_soon(seats)
            await done.wait()
            nursery.cancel_scope.cancel()
        return self.led

    def _leading(self) -> bool:
        seat = self.seat
        return seat is not None and seat.driver is not None and seat.ended is None

    async def _seats(self) -> None:
        """One reducer seat per session, in turn; with ``exit_after_session``, returns once a
        seat saw its session end. (A node that led a session ends by its seat: gossip never
        hands it its own session end, so its client half does not see one.)"""
        seen: set[str] = set()
        session = self.session
        while True:
            seat = self.seat = ReducerSeat(
                self.ctx,
                session=session,
                runner=self.runner,
                wait_for=self.wait_for,
                wait_for_combiners=self.wait_for_combiners,
                lease=self.lease,
                ignore=frozenset(seen),
            )
            ended = await seat.run()
            session = None  # a session of our own is started once at most
            if ended is None:  # (a seat returns once it saw a session end)
                return
            self.ended = ended
            seen.add(ended.session)
            if seat.led:
                self.led = ended
            if self.exit_after_session:
                return


__all__ = ["AutoDriver"]
