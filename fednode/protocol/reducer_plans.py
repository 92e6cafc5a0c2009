"""Protocol layer: whom the reducer's plans (``reducer``) hold, and how an amendment moves orphans.

A :class:`Roster` is what the machine knows of the eligible peers, as its driver last reported
them: clients and combiners with their loads, or the election's candidates (then a fresh plan's
tree is elected by load, :func:`~fednode.protocol.election.build_tree`). It also holds the
orphans of a dead combiner that no combiner had room for: they wait, and move as soon as one has
(``protocols/rounds.md``, Healing). An amended plan keeps its deadline unless less than
:data:`ORPHAN_GRACE` of a round is left (:func:`amended_deadline`). Sans-IO: no trio, no
libp2p, no clock reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fednode.protocol.election import (
    Candidate,
    Policy,
    Tree,
    assign_by_election,
    build_tree,
)
from fednode.protocol.partials import Tally
from fednode.protocol.rounds import CombinerLoad
from fednode.wire import Assignment, PeerId, RoundPlan

#: An amended plan that moves orphans leaves at least this fraction of the round deadline.
ORPHAN_GRACE = 0.5


class Roster:
    """The peers the next plan may use, and the orphans waiting for room (module docstring).

    Args:
        peer: our own peer ID, never a candidate of ours.
    """

    def __init__(self, peer: PeerId) -> None:
        self.peer = peer
        self.clients: set[PeerId] = set()
        self.combiners: dict[PeerId, CombinerLoad] = {}
        self.candidates: dict[PeerId, Candidate] | None = None  # given by set_candidates
        self.waiting: set[PeerId] = set()  # orphans no combiner had room for

    def set_peers(self, clients: Iterable[PeerId], combiners: Iterable[CombinerLoad]) -> None:
        """The eligible clients and combiners; a waiting orphan no longer eligible stops
        waiting."""
        self.candidates = None
        self.clients = set(clients)
        self.combiners = {c.peer: c for c in combiners}
        self.waiting &= self.clients

    def set_candidates(self, candidates: Iterable[Candidate]) -> None:
        """The live members as the election sees them: a client is a candidate with data, a
        combiner one that stands."""
        found = {c.peer: c for c in candidates if c.peer != self.peer}
        self.candidates = found
        self.clients = {p for p, c in found.items() if c.has_data}
        self.combiners = {
            p: CombinerLoad(peer=p, capacity=c.capacity, attached=c.attached)
            for p, c in found.items()
            if c.stands
        }
        self.waiting &= self.clients

    def drop(self, peer: PeerId) -> None:
        """``peer`` died: no longer eligible, nor waiting."""
        self.clients.discard(peer)
        self.combiners.pop(peer, None)
        if self.candidates is not None:
            self.candidates.pop(peer, None)
        self.waiting.discard(peer)

    def tree(self, previous: RoundPlan | None, policy: Policy) -> tuple[Assignment, ...]:
        """A fresh attempt's assignment, kept close to ``previous`` plan's: elected from the
        candidates if given, else assigned by election among the clients and combiners."""
        tree = None if previous is None else Tree.from_assignments(previous.assignments)
        if self.candidates is not None:
            return build_tree(self.candidates.values(), tree, policy=policy).assignments()
        return assign_by_election(self.clients, self.combiners.values(), tree, policy=policy)

    def place(self, orphans: frozenset[PeerId], tally: Tally) -> set[PeerId]:
        """Give the eligible ``orphans`` to combiners with room in ``tally``; the others wait.
        Returns the orphans placed."""
        alive = orphans & self.clients
        placed = tally.place(alive, self.combiners.values())
        self.waiting |= alive - placed
        return placed

    def place_waiting(self, tally: Tally) -> set[PeerId]:
        """Give waiting orphans to combiners that have room now; returns those placed."""
        placed = tally.place(self.waiting, self.combiners.values())
        self.waiting -= placed
        return placed


def amended_deadline(plan: RoundPlan, created_ms: int, round_deadline_ms: int) -> int:
    """The deadline of an amendment of ``plan`` made at ``created_ms``: ``plan``'s, unless less
    than :data:`ORPHAN_GRACE` of a round is left."""
    grace = math.ceil(round_deadline_ms * ORPHAN_GRACE)
    return max(plan.deadline_ms, created_ms + grace)


__all__ = ["ORPHAN_GRACE", "Roster", "amended_deadline"]
