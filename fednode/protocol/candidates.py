"""Protocol layer: the election's inputs: its candidates, its policy and their score (``election``).

A :class:`Candidate` is one live member as its heartbeats describe it, plus the round-trip time to
the reducer if one was measured; :func:`candidates_of` builds them from a membership snapshot. A
:class:`Policy` holds the election's thresholds and weights, and :func:`score` says how well a
candidate would serve as a combiner. The rules, the formula and the reasons for its weights are in
:mod:`fednode.protocol.election`'s docstring. Pure: no trio, no libp2p, no clock reads, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol.membership import PeerInfo, PeerState
from fednode.wire import PeerId

#: The roles that take part in a tree; ``reducer`` and ``bootstrap`` nodes do not.
ElectionRole = Literal["client", "combiner", "auto"]
_ELECTION_ROLES: Mapping[str, ElectionRole] = {
    "client": "client",
    "combiner": "combiner",
    "auto": "auto",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One live member, as the election sees it.

    Attributes:
        peer: its peer ID.
        role: ``client`` (data, never a combiner), ``combiner`` (explicit: combines, no data) or
            ``auto`` (data, and stands for combiner).
        capacity: how many clients it can take as a combiner.
        attached: clients it serves for other sessions (not ours: each tree replaces the last).
        cpu: CPU load, 0 to 1.
        memory: memory in use, 0 to 1.
        bandwidth: estimated bandwidth, bytes per second.
        rtt: round-trip time to the reducer, seconds, or None if not measured.
        region: operator-chosen region label, "" if unknown.
        suspect: the failure detector suspects it: still a client, never newly elected.
    """

    peer: PeerId
    role: ElectionRole
    capacity: int = 0
    attached: int = 0
    cpu: float = 0.0
    memory: float = 0.0
    bandwidth: float = 0.0
    rtt: float | None = None
    region: str = ""
    suspect: bool = False

    def __post_init__(self) -> None:
        if self.role not in _ELECTION_ROLES:
            raise LocalProtocolError(f"{self.peer}: role {self.role!r} takes no part in a tree")
        if self.capacity < 0 or self.attached < 0:
            raise LocalProtocolError(f"{self.peer}: negative capacity or attached")
        if not (0.0 <= self.cpu <= 1.0 and 0.0 <= self.memory <= 1.0):
            raise LocalProtocolError(f"{self.peer}: cpu and memory must be within 0 and 1")
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= 0.0):
            raise LocalProtocolError(f"{self.peer}: bandwidth must be finite, non-negative")
        if self.rtt is not None and not (math.isfinite(self.rtt) and self.rtt >= 0.0):
            raise LocalProtocolError(f"{self.peer}: rtt must be finite, non-negative")

    @property
    def has_data(self) -> bool:
        """Whether it trains (``client`` or ``auto``)."""
        return self.role != "combiner"

    @property
    def stands(self) -> bool:
        """Whether it may be a combiner (``combiner`` or ``auto``, with some capacity)."""
        return self.role != "client" and self.capacity > 0

    @property
    def spare(self) -> int:
        return max(0, self.capacity - self.attached)


def candidate_of(info: PeerInfo, *, session: str = "") -> Candidate | None:
    """The candidate a membership entry makes, or None (dead, or a reducer or bootstrap node).

    ``attached`` counts only clients the member serves for another session than ``session``
    (a heartbeat with no session, or ours, counts none): our previous tree is replaced anyway.
    """
    role = _ELECTION_ROLES.get(info.role)
    if info.state not in (PeerState.ALIVE, PeerState.SUSPECT) or role is None:
        return None
    ours = info.heartbeat.session in ("", session)
    return Candidate(
        peer=info.peer,
        role=role,
        capacity=info.capacity,
        attached=0 if ours else info.attached,
        cpu=info.cpu,
        memory=info.memory,
        bandwidth=info.bandwidth,
        rtt=info.rtt,
        region=info.region,
        suspect=info.state is PeerState.SUSPECT,
    )


def candidates_of(
    members: Iterable[PeerInfo], *, session: str = "", exclude: Iterable[PeerId] = ()
) -> tuple[Candidate, ...]:
    """Candidates from a membership snapshot, sorted by peer ID, without the ``exclude`` peers
    (the reducer: its own view never holds it, but another node's does)."""
    excluded = frozenset(exclude)
    found = (candidate_of(m, session=session) for m in members if m.peer not in excluded)
    return tuple(sorted((c for c in found if c is not None), key=lambda c: c.peer))


# --- policy and score -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Thresholds and weights of the election; the defaults are the documented formula.

    Attributes:
        target: clients per combiner the count aims at (``k = ceil(clients / target)``).
        shrink_fill: the count of the previous tree stands until ``target * shrink_fill``
            clients per combiner would do with one fewer (0 < shrink_fill <= 1; 1 disables).
        margin: score a challenger must beat an incumbent combiner by (0 disables).
        skew: an incumbent keeps at most ``ceil((1 + skew) * fair share)`` of its clients.
        max_cpu: above this CPU load a node is overloaded.
        max_memory: above this memory use a node is overloaded.
        shed_fraction: share of its clients an overloaded incumbent sheds per tree (at least 1).
        w_spare, w_cpu, w_bandwidth, w_proximity: the score's weights (non-negative).
        bandwidth_ref: bandwidth, bytes/s, scoring 0.5 on the bandwidth term.
        rtt_ref: RTT to the reducer, seconds, scoring 0.5 on the proximity term.
    """

    target: int = 32
    shrink_fill: float = 0.75
    margin: float = 0.1
    skew: float = 0.5
    max_cpu: float = 0.9
    max_memory: float = 0.95
    shed_fraction: float = 0.25
    w_spare: float = 0.35
    w_cpu: float = 0.25
    w_bandwidth: float = 0.20
    w_proximity: float = 0.20
    bandwidth_ref: float = 12_500_000.0
    rtt_ref: float = 0.05

    def __post_init__(self) -> None:
        if self.target < 1:
            raise ConfigError("target must be at least 1")
        if not 0.0 < self.shrink_fill <= 1.0:
            raise ConfigError("shrink_fill must be within (0, 1]")
        if not (self.margin >= 0.0 and self.skew >= 0.0):
            raise ConfigError("margin and skew must be non-negative")
        if not (0.0 <= self.max_cpu <= 1.0 and 0.0 <= self.max_memory <= 1.0):
            raise ConfigError("max_cpu and max_memory must be within 0 and 1")
        if not 0.0 < self.shed_fraction <= 1.0:
            raise ConfigError("shed_fraction must be within (0, 1]")
        if min(self.w_spare, self.w_cpu, self.w_bandwidth, self.w_proximity) < 0.0:
            raise ConfigError("weights must be non-negative")
        if not (self.bandwidth_ref > 0.0 and self.rtt_ref > 0.0):
            raise ConfigError("bandwidth_ref and rtt_ref must be positive")

    def overloaded(self, candidate: Candidate) -> bool:
        """Whether its CPU or memory is over the threshold."""
        return candidate.cpu > self.max_cpu or candidate.memory > self.max_memory

    def shed(self, clients: int) -> int:
        """How many of its ``clients`` an overloaded incumbent gives up."""
        return min(clients, max(1, math.ceil(clients * self.shed_fraction)))


DEFAULT_POLICY = Policy()


def score(candidate: Candidate, policy: Policy = DEFAULT_POLICY, *, home_region: str = "") -> float:
    """How well ``candidate`` would serve as a combiner, in [0, 1] with the default weights (the
    formula is in :mod:`fednode.protocol.election`'s docstring). ``home_region`` is the reducer's
    region, used for the proximity term when no RTT was measured."""
    spare = candidate.spare
    s = spare / (spare + policy.target)
    b = candidate.bandwidth / (candidate.bandwidth + policy.bandwidth_ref)
    if candidate.rtt is not None:
        p = policy.rtt_ref / (policy.rtt_ref + candidate.rtt)
    elif candidate.region and home_region:
        p = 1.0 if candidate.region == home_region else 0.0
    else:
        p = 0.5
    return (
        policy.w_spare * s
        + policy.w_cpu * (1.0 - candidate.cpu)
        + policy.w_bandwidth * b
        + policy.w_proximity * p
    )


__all__ = [
    "DEFAULT_POLICY",
    "Candidate",
    "ElectionRole",
    "Policy",
    "candidate_of",
    "candidates_of",
    "score",
]
