"""Protocol layer: electing combiners by load and building each round's aggregation tree.

Pure functions over a snapshot of the membership view: no trio, no libp2p, no clock reads, no I/O.
The same candidates, in any order, with the same previous tree and policy, give the same tree on
every node: everything is sorted by peer ID before it is used, and no set or dict order reaches
the result. The candidates, the policy and the score are in :mod:`fednode.protocol.candidates`
(and importable from here); this module elects and places.

Inputs. A :class:`Candidate` is one live member as its heartbeats describe it (role, capacity,
clients attached for other sessions, CPU, memory, bandwidth, region) plus the round-trip time to
the reducer if one was measured (:func:`candidates_of` builds them from
``MembershipView.members()``; the reducer itself and ``reducer`` / ``bootstrap`` nodes are not
candidates). Roles: ``client`` holds data and never combines; ``combiner`` (started with
``--role combiner``) combines and holds no data; ``auto`` holds data and stands for combiner.

Score. How well a node would serve as a combiner, in [0, 1]::

    score = 0.35 * S + 0.25 * (1 - cpu) + 0.20 * B + 0.20 * P
    S = spare / (spare + T)         spare = capacity - attached (other sessions), T = target
    B = bandwidth / (bandwidth + bandwidth_ref)              bandwidth_ref = 12.5 MB/s
    P = rtt_ref / (rtt_ref + rtt)    rtt to the reducer, rtt_ref = 50 ms, if measured;
        else 1 in the reducer's region, 0 in another, 0.5 (as rtt = rtt_ref) if unknown

Why: a combiner's job is taking clients, so spare capacity weighs most, but saturating (room
beyond one target's worth of clients adds little); CPU next, since folding each update into the
running sum costs CPU per client; bandwidth because every client's update crosses the combiner's
link (saturating at a link that moves a small model in well under a second); proximity to the
reducer least, since only the one partial travels that path. Memory is not scored (a streaming
combiner holds O(model) whatever its clients) but gates, like CPU. Ties go to the smaller peer ID.

How many combiners. ``k = ceil(n / target)`` for ``n`` clients, at least one if any node can
combine; then more while the chosen combiners' room falls short of the clients. Hysteresis: with
a previous tree of ``k'`` combiners, ``k'`` stands while
``ceil(n / target) <= k' <= ceil(n / (target * shrink_fill))``.

Which nodes. Every healthy ``--role combiner`` node with room is used, first. ``auto`` nodes fill
the other seats in score order; an incumbent (a combiner of the previous tree) counts its score
plus ``margin``, so a challenger must beat it by that much. A node's room is ``capacity -
attached``; a node that is overloaded (``cpu > max_cpu`` or ``memory > max_memory``) or suspect
has none unless it is an incumbent, which keeps its previous clients but sheds
``ceil(shed_fraction * its clients)`` of them (at least one) while overloaded. A node whose room
drops below its previous clients sheds just the excess. A node that left the view is gone.
When that room cannot take every client (a busy machine: every node reports its CPU saturated),
loaded nodes serve rather than leave clients out: incumbents get their shed room back first,
then the others by score, so under uniform load the tree holds.

Self-assignment. An ``auto`` node elected combiner is still a client with data: it is assigned
under itself (it folds its own update into its running sum locally, no transfer) and that takes
one slot of its capacity.

Which clients where. Incumbents keep their previous clients (up to their room and to ``1 + skew``
times the fair share), keeping the nearest if they must shed. The other clients are placed by
water-filling: every combiner is filled up to a common level (never above its room), so the tree
is balanced; within that, each client (in peer-ID order) goes to the nearest combiner with room
left: same region first, then the smallest RTT gap, then the smaller peer ID. The RTT gap is
``|rtt(client, reducer) - rtt(combiner, reducer)|``: the view only measures RTTs to the reducer,
and by the triangle inequality the gap is a lower bound of the RTT between the two, so it uses
the reducer as a single landmark. Unknown RTTs rank after known ones. If the combiners' room cannot
take every client, the combiners' own updates and the clients that keep their place come first,
then the others in peer-ID order; the rest sit the round out (:attr:`Tree.left_out`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fednode.errors import LocalProtocolError
from fednode.protocol.candidates import (
    DEFAULT_POLICY,
    Candidate,
    ElectionRole,
    Policy,
    candidate_of,
    candidates_of,
    score,
)
from fednode.protocol.rounds import CombinerLoad
from fednode.wire import Assignment, PeerId

# --- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Branch:
    """One combiner and the clients under it (sorted; an ``auto`` combiner is among its own)."""

    combiner: PeerId
    clients: tuple[PeerId, ...]

    def __post_init__(self) -> None:
        if list(self.clients) != sorted(set(self.clients)):
            raise LocalProtocolError("a branch's clients must be sorted, each once")


@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    """One round's aggregation tree: branches sorted by combiner (an explicit combiner may have
    no client), and the clients that sit the round out for want of capacity (sorted)."""

    branches: tuple[Branch, ...] = ()
    left_out: tuple[PeerId, ...] = ()

    def __post_init__(self) -> None:
        combiners = [b.combiner for b in self.branches]
        if combiners != sorted(set(combiners)):
            raise LocalProtocolError("branches must be sorted by combiner, each once")
        placed = [c for b in self.branches for c in b.clients]
        if len(placed) != len(set(placed)) or set(placed) & set(self.left_out):
            raise LocalProtocolError("no client may be placed twice")
        if list(self.left_out) != sorted(set(self.left_out)):
            raise LocalProtocolError("left_out must be sorted, each once")

    @classmethod
    def from_assignments(cls, assignments: Iterable[Assignment]) -> Tree:
        """The tree a plan's assignments describe (the previous plan's, as ``previous_tree``)."""
        branches = (
            Branch(combiner=a.combiner, clients=tuple(sorted(a.clients))) for a in assignments
        )
        return cls(branches=tuple(sorted(branches, key=lambda b: b.combiner)))

    @property
    def combiners(self) -> tuple[PeerId, ...]:
        return tuple(b.combiner for b in self.branches)

    @property
    def clients(self) -> tuple[PeerId, ...]:
        """Every placed client, sorted."""
        return tuple(sorted(c for b in self.branches for c in b.clients))

    def combiner_of(self, client: PeerId) -> PeerId | None:
        return next((b.combiner for b in self.branches if client in b.clients), None)

    def clients_of(self, combiner: PeerId) -> tuple[PeerId, ...]:
        return next((b.clients for b in self.branches if b.combiner == combiner), ())

    def assignments(self) -> tuple[Assignment, ...]:
        """The plan's assignments: sorted by combiner, those without clients left out."""
        return tuple(
            Assignment(combiner=b.combiner, clients=b.clients) for b in self.branches if b.clients
        )

    def moved(self, previous: Tree) -> tuple[PeerId, ...]:
        """Clients placed in both trees under a different combiner, sorted."""
        before = {c: b.combiner for b in previous.branches for c in b.clients}
        return tuple(
            c for b in self.branches for c in b.clients if c in before and before[c] != b.combiner
        )


EMPTY_TREE = Tree()


def build_tree(
    candidates: Iterable[Candidate],
    previous_tree: Tree | None = None,
    *,
    policy: Policy = DEFAULT_POLICY,
    home_region: str = "",
) -> Tree:
    """Elect the combiners and place the clients (the rules are in the module docstring).

    Args:
        candidates: the live members, each once, in any order (the reducer not among them).
        previous_tree: the tree of the last plan, for hysteresis; None builds afresh.
        policy: thresholds and weights.
        home_region: the reducer's region, for the score's proximity when no RTT is known.

    Raises:
        LocalProtocolError: a peer is among the candidates twice.
    """
    by_peer: dict[PeerId, Candidate] = {}
    for candidate in candidates:
        if candidate.peer in by_peer:
            raise LocalProtocolError(f"{candidate.peer} is a candidate twice")
        by_peer[candidate.peer] = candidate
    previous = previous_tree if previous_tree is not None else EMPTY_TREE
    before = {b.combiner: b.clients for b in previous.branches}
    rooms: dict[PeerId, int] = {}
    for peer in sorted(by_peer):
        room = _room(by_peer[peer], before.get(peer), policy)
        if room > 0:
            rooms[peer] = room
    clients = [p for p in sorted(by_peer) if by_peer[p].has_data]
    if sum(rooms.values()) < len(clients):
        # Every able node is loaded (a busy machine reports every CPU high): an overloaded or
        # suspect node serving, or an overloaded incumbent keeping the clients it would shed,
        # beats clients sitting the round out. Incumbents first (their shed room back before a
        # node as loaded is raised: under uniform load the tree holds), then best score.
        spare = [p for p in by_peer if by_peer[p].stands and by_peer[p].spare > rooms.get(p, 0)]
        spare.sort(
            key=lambda p: (p not in before, -score(by_peer[p], policy, home_region=home_region), p)
        )
        for peer in spare:
            if sum(rooms.values()) >= len(clients):
                break
            rooms[peer] = by_peer[peer].spare
    chosen = _elect(by_peer, rooms, len(clients), before, policy, home_region)
    return _place(by_peer, {p: rooms[p] for p in chosen}, clients, before, policy)


def _room(
    candidate: Candidate, incumbent_clients: tuple[PeerId, ...] | None, policy: Policy
) -> int:
    """How many clients (itself included) it may take in this tree."""
    if not candidate.stands:
        return 0
    room = candidate.spare
    if incumbent_clients is None:
        return 0 if candidate.suspect or policy.overloaded(candidate) else room
    if policy.overloaded(candidate):
        count = len(incumbent_clients)
        room = min(room, count - policy.shed(count))
    return room


def _elect(
    by_peer: Mapping[PeerId, Candidate],
    rooms: Mapping[PeerId, int],
    clients: int,
    before: Mapping[PeerId, tuple[PeerId, ...]],
    policy: Policy,
    home_region: str,
) -> list[PeerId]:
    """The combiners: every explicit one with room, then ``auto`` ones by (incumbent) score."""
    k = math.ceil(clients / policy.target)
    if before:
        most = math.ceil(clients / (policy.target * policy.shrink_fill))
        k = min(max(len(before), k), most)
    k = max(k, 1)
    chosen = [p for p in rooms if by_peer[p].role == "combiner"]

    def rank(peer: PeerId) -> tuple[float, PeerId]:
        bonus = policy.margin if peer in before else 0.0
        return (-(score(by_peer[peer], policy, home_region=home_region) + bonus), peer)

    autos = sorted((p for p in rooms if by_peer[p].role == "auto"), key=rank)
    room = sum(rooms[p] for p in chosen)
    for peer in autos:
        if len(chosen) >= k and room >= clients:
            break
        chosen.append(peer)
        room += rooms[peer]
    return sorted(chosen)


def _place(
    by_peer: Mapping[PeerId, Candidate],
    rooms: Mapping[PeerId, int],
    clients: Sequence[PeerId],
    before: Mapping[PeerId, tuple[PeerId, ...]],
    policy: Policy,
) -> Tree:
    under: dict[PeerId, list[PeerId]] = {c: [] for c in sorted(rooms)}
    placed: set[PeerId] = set()
    for combiner in under:  # an auto combiner aggregates its own update
        if by_peer[combiner].has_data:
            under[combiner].append(combiner)
            placed.add(combiner)
    data = frozenset(clients)
    fair = _level(rooms, dict.fromkeys(rooms, 0), min(len(clients), sum(rooms.values())))
    keep_cap = math.ceil(fair * (1.0 + policy.skew))
    for combiner, mine in under.items():
        kept = [
            c for c in before.get(combiner, ()) if c in data and c not in rooms and c not in placed
        ]
        limit = max(0, min(rooms[combiner], keep_cap) - len(mine))
        if len(kept) > limit:  # shed the farthest
            home = by_peer[combiner]
            kept = sorted(kept, key=lambda c: (_distance(by_peer[c], home), c))[:limit]
        mine.extend(kept)
        placed.update(kept)
    rest = [c for c in clients if c not in placed]
    free = sum(rooms[c] - len(mine) for c, mine in under.items())
    rest, left_out = rest[:free], rest[free:]
    counts = {c: len(mine) for c, mine in under.items()}
    level = _level(rooms, counts, sum(counts.values()) + len(rest))
    # Up to one below the level first, then the last slot each: counts end within one.
    low = {c: max(0, min(rooms[c], level - 1) - counts[c]) for c in under}
    high = {c: max(0, min(rooms[c], level) - counts[c]) - low[c] for c in under}
    if _fill(_fill(rest, under, low, by_peer), under, high, by_peer):
        raise LocalProtocolError("water-filling left a client without a combiner")
    return Tree(
        branches=tuple(Branch(combiner=c, clients=tuple(sorted(m))) for c, m in under.items()),
        left_out=tuple(left_out),
    )


def _fill(
    rest: Sequence[PeerId],
    under: Mapping[PeerId, list[PeerId]],
    quota: dict[PeerId, int],
    by_peer: Mapping[PeerId, Candidate],
) -> list[PeerId]:
    """Place ``rest`` within ``quota``: the nearest combiner of the client's region, else the
    nearest anywhere. Returns the clients that did not fit."""
    regions: dict[str, list[PeerId]] = {}
    for combiner in under:
        if by_peer[combiner].region and quota[combiner] > 0:
            regions.setdefault(by_peer[combiner].region, []).append(combiner)
    pools = {r: _Pool(members, by_peer, quota) for r, members in sorted(regions.items())}
    unplaced: list[PeerId] = []
    for client in rest:
        mine = by_peer[client]
        pool = pools.get(mine.region) if mine.region else None
        found = pool.take(mine.rtt) if pool is not None else None
        if found is None:
            unplaced.append(client)
        else:
            under[found].append(client)
    anywhere = _Pool([c for c in under if quota[c] > 0], by_peer, quota)
    left: list[PeerId] = []
    for client in unplaced:
        found = anywhere.take(by_peer[client].rtt)
        if found is None:
            left.append(client)
        else:
            under[found].append(client)
    return left


def _level(caps: Mapping[PeerId, int], counts: Mapping[PeerId, int], total: int) -> int:
    """The lowest fill level L with ``sum(min(cap, max(count, L))) >= total`` (water-filling)."""

    def filled(level: int) -> int:
        return sum(min(caps[c], max(counts[c], level)) for c in caps)

    low, high = 0, max(caps.values(), default=0)
    while low < high:
        mid = (low + high) // 2
        if filled(mid) >= total:
            high = mid
        else:
            low = mid + 1
    return low


def _distance(client: Candidate, combiner: Candidate) -> tuple[int, float]:
    """Nearness: same (known) region first, then the RTT gap through the reducer (unknown last)."""
    region = 0 if client.region and client.region == combiner.region else 1
    if client.rtt is None or combiner.rtt is None:
        return (region, math.inf)
    return (region, abs(client.rtt - combiner.rtt))


class _Pool:
    """Combiners with quota left, found by RTT gap in O(log n): ``take`` the nearest to an RTT."""

    def __init__(
        self,
        combiners: Iterable[PeerId],
        by_peer: Mapping[PeerId, Candidate],
        quota: dict[PeerId, int],
    ) -> None:
        self._quota = quota
        self._rtt = {c: by_peer[c].rtt for c in combiners}
        self._known = sorted((rtt, c) for c, rtt in self._rtt.items() if rtt is not None)
        self._unknown = sorted(c for c, rtt in self._rtt.items() if rtt is None)
        self._all = sorted(self._rtt)

    def take(self, rtt: float | None) -> PeerId | None:
        """The nearest combiner to a client at ``rtt`` (None: the smallest peer ID), its quota
        taken by one; None if the pool is empty."""
        if rtt is not None and self._known:
            found = self._nearest(rtt)
        elif self._all:  # no gap to go by: the smallest peer ID
            found = self._all[0]
        else:
            return None
        self._quota[found] -= 1
        if self._quota[found] == 0:
            self._drop(found)
        return found

    def _nearest(self, rtt: float) -> PeerId:
        known = self._known
        i = bisect.bisect_left(known, (rtt, ""))
        best: tuple[float, PeerId] | None = None
        if i < len(known):  # the smallest RTT at or above, smallest peer among equals
            best = (known[i][0] - rtt, known[i][1])
        if i > 0:  # the largest RTT below, smallest peer among equals
            below = known[i - 1][0]
            first = known[bisect.bisect_left(known, (below, ""))]
            candidate = (rtt - below, first[1])
            best = candidate if best is None or candidate < best else best
        assert best is not None
        return best[1]

    def _drop(self, peer: PeerId) -> None:
        rtt = self._rtt.pop(peer)
        self._all.pop(bisect.bisect_left(self._all, peer))
        if rtt is None:
            self._unknown.pop(bisect.bisect_left(self._unknown, peer))
        else:
            self._known.pop(bisect.bisect_left(self._known, (rtt, peer)))


# --- a drop-in for rounds.assign_clients ----------------------------------------------------


def assign_by_election(
    clients: Iterable[PeerId],
    combiners: Iterable[CombinerLoad],
    previous: Tree | Iterable[Assignment] | None = None,
    *,
    policy: Policy = DEFAULT_POLICY,
) -> tuple[Assignment, ...]:
    """:func:`build_tree` from what ``ReducerMachine`` holds today, as plan assignments.

    Called like ``assign_clients(clients, combiners)``. A peer in both lists is ``auto`` (elected
    as needed, under itself when elected), a combiner only is ``combiner`` (always used); there
    is no CPU, bandwidth, region or RTT to go by, so every combiner scores on spare capacity.
    Unlike ``assign_clients`` the load is balanced by client count, not by spare capacity left.
    Pass the previous plan's assignments as ``previous`` for hysteresis.
    """
    data = frozenset(clients)
    loads: dict[PeerId, CombinerLoad] = {}
    for load in combiners:  # a peer listed twice counts with its most spare, as assign_clients
        if load.peer not in loads or load.spare > loads[load.peer].spare:
            loads[load.peer] = load
    candidates = [
        Candidate(
            peer=p,
            role="auto" if p in data else "combiner",
            capacity=loads[p].capacity,
            attached=loads[p].attached,
        )
        for p in loads
    ]
    candidates += [Candidate(peer=p, role="client") for p in sorted(data) if p not in loads]
    if previous is not None and not isinstance(previous, Tree):
        previous = Tree.from_assignments(previous)
    return build_tree(candidates, previous, policy=policy).assignments()


__all__ = [
    "DEFAULT_POLICY",
    "EMPTY_TREE",
    "Branch",
    "Candidate",
    "ElectionRole",
    "Policy",
    "Tree",
    "assign_by_election",
    "build_tree",
    "candidate_of",
    "candidates_of",
    "score",
]
