"""Protocol layer: the membership as the reducer election (``leader``) counts and ranks it.

An :class:`ElectionView` holds what the driver last reported of the membership
(:func:`~fednode.protocol.leader_actions.peers_seen`), every eligible peer ever seen, and since
when each peer that is not standing has been down. From it the :class:`~fednode.protocol.leader.
LeaderMachine` asks whether it sees a strict majority of a checkpoint's members (itself, and
members ALIVE in its view; suspect ones do not count), whether they were heard from lately, and
its rank among the standbys (:func:`~fednode.protocol.leader_actions.rank_key`: explicit reducers
first, then best score, then lowest peer ID). Sans-IO: no trio, no libp2p, no clock reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fednode.protocol.leader_actions import PeerSeen, rank_key
from fednode.protocol.membership import PeerState
from fednode.wire import PeerId


class ElectionView:
    """One node's view of the other peers, for the election (module docstring).

    Args:
        peer: our own peer ID, never in the view: we always see ourselves.
    """

    def __init__(self, peer: PeerId) -> None:
        self.peer = peer
        self.peers: dict[PeerId, PeerSeen] = {}  # the view as last reported, ourselves left out
        self.eligible: dict[PeerId, PeerSeen] = {}  # every eligible peer seen, as last seen
        self.down_since: dict[PeerId, float] = {}  # peers not standing: since when

    def update(self, peers: Iterable[PeerSeen], now: float) -> None:
        """The membership view changed: every peer it holds, with its state. A peer it no
        longer holds, or no longer standing, is down from ``now`` (if it was not already)."""
        view = {p.peer: p for p in peers if p.peer != self.peer}
        for peer in self.peers.keys() - view.keys():  # forgotten
            self.down_since.setdefault(peer, now)
        for seen in view.values():
            if seen.eligible:
                self.eligible[seen.peer] = seen
            else:
                self.eligible.pop(seen.peer, None)
            if seen.standing:
                self.down_since.pop(seen.peer, None)
            else:
                self.down_since.setdefault(seen.peer, now)
        self.peers = view

    def sees(self, peer: PeerId) -> bool:
        """Whether ``peer`` counts towards a majority: ourselves, or ALIVE in the view."""
        if peer == self.peer:
            return True
        seen = self.peers.get(peer)
        return seen is not None and seen.state is PeerState.ALIVE

    def standing(self, peer: PeerId) -> bool:
        """Whether ``peer`` may be acting (alive or suspect in the view)."""
        seen = self.peers.get(peer)
        return seen is not None and seen.standing

    def majority(self, members: Sequence[PeerId]) -> bool:
        """Whether we see a strict majority of ``members``."""
        return 2 * sum(1 for m in members if self.sees(m)) > len(members)

    def heard_since(self, members: Sequence[PeerId], since: float) -> bool:
        """Whether a strict majority of ``members`` (we count) were heard from after ``since``,
        and are seen now."""

        def fresh(peer: PeerId) -> bool:
            if peer == self.peer:
                return True
            seen = self.peers.get(peer)
            return (
                seen is not None
                and seen.state is PeerState.ALIVE
                and seen.heard is not None
                and seen.heard > since
            )

        return 2 * sum(1 for m in members if fresh(m)) > len(members)

    def rank(self, me: PeerSeen, holder: PeerId | None) -> int:
        """Our place among the eligible peers that may be acting (alive or suspect), the lease
        ``holder`` left out: 0 takes over first. A holder that stepped down (us) ranks after
        them all, so every node orders one view the same way."""
        others = [p for p in self.peers.values() if p.eligible and p.standing and p.peer != holder]
        if holder == self.peer:
            return len(others)
        return sum(1 for p in others if rank_key(p) < rank_key(me))

    def initial_rank(self, me: PeerSeen) -> int:
        """Our place among the eligible peers that may be acting, before any term."""
        key = rank_key(me)
        return sum(
            1 for p in self.peers.values() if p.eligible and p.standing and rank_key(p) < key
        )

    def explicit_reducer(self) -> bool:
        """Whether a peer of role ``reducer`` may be acting."""
        return any(p.role == "reducer" and p.standing for p in self.peers.values())

    def ahead(self, me: PeerSeen, holder: PeerId | None, since: float) -> int:
        """The eligible peers besides the lease ``holder`` ranked before us (all of them if we
        hold the lease) that were still standing at ``since``: each may have claimed a term."""
        key = rank_key(me)
        return sum(
            1
            for p in self.eligible.values()
            if p.peer != holder
            and (holder == self.peer or rank_key(p) < key)
            and (self.standing(p.peer) or self.down_since.get(p.peer, since) >= since)
        )


__all__ = ["ElectionView"]
