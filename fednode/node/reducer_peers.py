"""Node layer: the live peers a reducer's driver plans rounds with, and its waits for them.

What the membership view says, as the election sees it: the members that are not dead (a suspect
peer is most likely slow, not gone), with their load, CPU, bandwidth, RTT and region. A client is
a member with data (role ``client`` or ``auto``), a combiner one that stands (role ``combiner``
or ``auto``, with a capacity). The driver waits here for its first plan's peers, and before a
later plan for peers the failure detector declared dead too soon (see
:meth:`PlanningPeers.wait_for_enough`).
"""

from __future__ import annotations

import logging

import trio

from fednode.node.context import RoleContext
from fednode.protocol.election import Candidate, candidates_of
from fednode.protocol.rounds import CombinerLoad
from fednode.wire import PeerId

# The reducer driver's log: these waits are its own.
log = logging.getLogger("fednode.node.reducer")


class PlanningPeers:
    """The peers a session's plans can use (see the module docstring).

    Args:
        ctx: the node's shared role equipment (its membership view).
        session: the session: a member's load is read for it.
        min_clients: fewer eligible clients than this make a plan that can only fall short.
        plan_wait: the longest :meth:`wait_for_enough` waits (default: the failure detector's
            time from a peer's last heartbeat to its death).
    """

    def __init__(
        self, ctx: RoleContext, session: str, *, min_clients: int, plan_wait: float | None = None
    ) -> None:
        self.ctx = ctx
        self.session = session
        self.min_clients = min_clients
        interval = ctx.node.config.heartbeat_interval
        detector = ctx.node.view.config
        #: How long a plan waits for peers to come back (:meth:`wait_for_enough`): the failure
        #: detector's time from a last heartbeat to a death.
        self.plan_wait = (
            (detector.suspect_after_missed + detector.dead_after_missed) * interval
            if plan_wait is None
            else plan_wait
        )
        self._changed = trio.Event()

    def changed(self) -> None:
        """The membership changed: wake the waits, which look again."""
        self._changed.set()
        self._changed = trio.Event()

    def candidates(self) -> tuple[Candidate, ...]:
        """The live members as the election sees them (load, CPU, bandwidth, RTT, region). A
        suspect peer is most likely slow, not gone: only the detector's "dead" excludes."""
        members = self.ctx.node.view.members()
        return candidates_of(members, session=self.session, exclude=[self.ctx.peer])

    def eligible(self) -> tuple[list[PeerId], list[CombinerLoad]]:
        """The clients and the combiners (with their loads) a plan made now could use."""
        clients: list[PeerId] = []
        combiners: list[CombinerLoad] = []
        for c in self.candidates():
            if c.has_data:
                clients.append(c.peer)
            if c.stands:
                combiners.append(
                    CombinerLoad(peer=c.peer, capacity=c.capacity, attached=c.attached)
                )
        return clients, combiners

    async def wait_for(
        self, clients: int, combiners: int
    ) -> tuple[list[PeerId], list[CombinerLoad]]:
        """Wait, however long it takes, until ``clients`` clients and ``combiners`` combiners
        are eligible; returns them."""
        logged = False
        while True:
            eligible, standing = self.eligible()
            if len(eligible) >= clients and len(standing) >= combiners:
                return eligible, standing
            if not logged:
                log.info(
                    "waiting for %d client(s) and %d combiner(s) (%d and %d alive)",
                    clients,
                    combiners,
                    len(eligible),
                    len(standing),
                )
                logged = True
            await self._changed.wait()

    def too_few(self) -> bool:
        """Whether a plan made now would hold fewer clients than ``min_clients``, or no
        combiner: it could only fall short."""
        clients, combiners = self.eligible()
        return len(clients) < self.min_clients or not combiners

    async def wait_for_enough(self) -> None:
        """Before the machine plans (the next round, or a re-plan), wait up to
        :attr:`plan_wait` while :meth:`too_few`. A peer the failure detector declared dead
        because its heartbeats were late (a loaded machine) is back within that; a plan made
        without it could not reach ``min_clients`` and would stand, unfinishable, until its
        deadline. Returns at once when enough peers are eligible."""
        if not self.too_few():
            return
        started = trio.current_time()
        log.info("waiting up to %.1f s for enough live peers to plan with", self.plan_wait)
        with trio.move_on_after(self.plan_wait):
            while self.too_few():
                await self._changed.wait()
        clients, combiners = self.eligible()
        log.info(
            "planning after %.2f s, with %d client(s) and %d combiner(s) alive",
            trio.current_time() - started,
            len(clients),
            len(combiners),
        )


__all__ = ["PlanningPeers"]
