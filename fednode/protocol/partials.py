"""Protocol layer: the reducer's tally of one plan attempt: which combiner takes which clients,
the partial aggregates accepted so far and the clients they count. Sans-IO, no clock.

The rules it keeps: each client is counted once across partials; a combiner's later partial
replaces its earlier one only if it counts strictly more, everything of the first included; a
combiner that died keeps its accepted partial counted, and the clients no partial counts (its
*orphans*) leave it for other combiners; a combiner given more clients after its partial came in
owes a new partial, but the one it sent stays counted meanwhile.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from fednode.protocol.rounds import CombinerLoad, assign_clients, peer_of
from fednode.wire import Assignment, PartialAggregate, PeerId, PublicKey


class PartialRejection(enum.StrEnum):
    """Why a partial aggregate was not accepted, in the order the checks run."""

    WRONG_SESSION = "wrong-session"  #: another federation or session
    WRONG_ROUND = "wrong-round"  #: a round not planned yet
    STALE = "stale"  #: an earlier round, or this round already closed
    WRONG_PARENT = "wrong-parent"  #: not trained from the plan's parent
    NOT_ASSIGNED = "not-assigned"  #: its combiner has no clients in the plan
    DUPLICATE = "duplicate"  #: its combiner already has a partial in, not a subset of this one
    DOUBLE_COUNT = "double-count"  #: a client already counted in another combiner's partial
    FOREIGN_CLIENT = "foreign-client"  #: a client not assigned to its combiner


class Tally:
    """One plan attempt's assignment and accepted partials (see the module docstring)."""

    __slots__ = ("_awaited", "_dropped", "assigned", "counted", "partials")

    def __init__(self) -> None:
        self.assigned: dict[PeerId, frozenset[PeerId]] = {}  #: combiner -> its clients
        self.partials: dict[PeerId, PartialAggregate] = {}  #: combiner -> accepted partial
        self.counted: dict[PublicKey, PeerId] = {}  #: client key -> combiner that counted it
        self._awaited: set[PeerId] = set()  # assigned combiners whose (next) partial is due
        self._dropped: set[PeerId] = set()  # combiners that died in this attempt

    def reset(self, assignments: Iterable[Assignment]) -> None:
        """A fresh attempt: nothing accepted, every assigned combiner awaited."""
        self.assigned = {a.combiner: frozenset(a.clients) for a in assignments}
        self.partials.clear()
        self.counted.clear()
        self._awaited = set(self.assigned)
        self._dropped.clear()

    @property
    def complete(self) -> bool:
        """Every assigned combiner's partial for its current assignment is in."""
        return not self._awaited

    @property
    def covered(self) -> int:
        return len(self.counted)

    def check(self, partial: PartialAggregate) -> PartialRejection | None:
        """The checks that depend on the tally (the reducer checks session, round, parent)."""
        combiner = peer_of(partial.combiner)
        assigned = self.assigned.get(combiner)
        if assigned is None:
            return PartialRejection.NOT_ASSIGNED
        previous = self.partials.get(combiner)
        signers = {c.signer for c in partial.contributions}
        if previous is not None and not (
            {c.signer for c in previous.contributions} < signers
            and set(previous.contributions) <= set(partial.contributions)
        ):
            return PartialRejection.DUPLICATE
        if any(self.counted.get(s, combiner) != combiner for s in signers):
            return PartialRejection.DOUBLE_COUNT
        if any(peer_of(s) not in assigned for s in signers):
            return PartialRejection.FOREIGN_CLIENT
        return None

    def accept(self, partial: PartialAggregate) -> None:
        """Count a checked partial, replacing its combiner's earlier one."""
        combiner = peer_of(partial.combiner)
        previous = self.partials.get(combiner)
        if previous is not None:
            for c in previous.contributions:
                del self.counted[c.signer]
        self.partials[combiner] = partial
        for c in partial.contributions:
            self.counted[c.signer] = combiner
        self._awaited.discard(combiner)

    def uncounted(self, combiner: PeerId) -> frozenset[PeerId]:
        """``combiner``'s assigned clients that no accepted partial counts."""
        partial = self.partials.get(combiner)
        counted = set() if partial is None else {peer_of(c.signer) for c in partial.contributions}
        return self.assigned.get(combiner, frozenset()) - counted

    def drop(self, combiner: PeerId) -> frozenset[PeerId]:
        """``combiner`` died: it leaves the assignment (its accepted partial stays counted).
        Returns its orphans, the clients no partial counts."""
        orphans = self.uncounted(combiner)
        self.assigned.pop(combiner, None)
        self._awaited.discard(combiner)
        self._dropped.add(combiner)
        return orphans

    def place(self, orphans: Iterable[PeerId], combiners: Iterable[CombinerLoad]) -> set[PeerId]:
        """Give ``orphans`` to the ``combiners`` with room beside the clients they have here,
        least loaded first (:func:`assign_clients`); each owes a partial counting them. A combiner
        that died in this attempt gets none, even if it is back. Returns the orphans placed."""
        loads = [
            CombinerLoad(
                peer=load.peer,
                capacity=load.capacity,
                attached=load.attached + len(self.assigned.get(load.peer, ())),
            )
            for load in combiners
            if load.peer not in self._dropped
        ]
        placed: set[PeerId] = set()
        for a in assign_clients(orphans, loads):
            self.assigned[a.combiner] = self.assigned.get(a.combiner, frozenset()) | set(a.clients)
            self._awaited.add(a.combiner)
            placed.update(a.clients)
        return placed

    def assignments(self) -> tuple[Assignment, ...]:
        """The assignment as a plan carries it: sorted by combiner, each one's clients sorted."""
        return tuple(
            Assignment(combiner=c, clients=tuple(sorted(self.assigned[c])))
            for c in sorted(self.assigned)
            if self.assigned[c]
        )


__all__ = ["PartialRejection", "Tally"]
