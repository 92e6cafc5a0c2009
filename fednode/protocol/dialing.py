"""Protocol layer: when to dial whom. Sans-IO: fed with outcomes and ``now``, it answers which
targets are due and when it next needs a timer; the node's driver does the dialling.

A target is a full multiaddr (bootstrap address, a peer's advertised address, or one remembered
from the peerstore) keyed by the peer ID in its ``/p2p/`` part. A target whose peer is connected
is idle. A disconnected one is due at once the first time, then after each failure waits
``base * 2**failures`` seconds (capped at ``cap``) times a jitter factor in [1 - jitter, 1],
drawn from the ``random.Random`` it is given, so that many nodes that lost the same bootstrap do
not all return at the same instant.

=========================  ====================================================
input                      effect
=========================  ====================================================
``add(addr)``              new target, due now (unless its peer is connected)
``on_connected(peer)``     its targets idle; failure count reset
``on_disconnected(peer)``  its targets due after ``base`` (a quick redial)
``on_dial_failed(addr)``   failures += 1; due after the backoff above
``on_dial_started(addr)``  not due again until an outcome arrives
``remove(addr)``           forgotten (only non-permanent targets)
=========================  ====================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fednode.wire import PeerId


def peer_of(addr: str) -> PeerId:
    """The peer ID in a full multiaddr's ``/p2p/`` component, or ``ValueError``."""
    parts = addr.rstrip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] in ("p2p", "ipfs") and parts[i]:
            return PeerId(parts[i])
    raise ValueError(f"{addr!r} has no /p2p/<peer id> component")


@dataclass(slots=True)
class _Target:
    addr: str
    peer: PeerId
    permanent: bool
    failures: int = 0
    due: float | None = 0.0  # None: idle (connected) or a dial in flight


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.5

    def delay(self, failures: int, rng: random.Random) -> float:
        raw = min(self.cap, self.base * 2.0 ** max(0, failures - 1))
        return raw * (1.0 - self.jitter * rng.random())


@dataclass(slots=True)
class DialPlanner:
    """Decides which targets to dial and when (see the module docstring)."""

    self_peer: PeerId
    rng: random.Random
    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    _targets: dict[str, _Target] = field(default_factory=dict)
    _connected: set[PeerId] = field(default_factory=set)

    def add(self, addr: str, now: float, *, permanent: bool = False) -> None:
        peer = peer_of(addr)
        if peer == self.self_peer:
            return
        existing = self._targets.get(addr)
        if existing is not None:
            existing.permanent = existing.permanent or permanent
            return
        due = None if peer in self._connected else now
        self._targets[addr] = _Target(addr=addr, peer=peer, permanent=permanent, due=due)

    def remove(self, addr: str) -> None:
        target = self._targets.get(addr)
        if target is not None and not target.permanent:
            del self._targets[addr]

    def on_connected(self, peer: PeerId) -> None:
        self._connected.add(peer)
        for target in self._targets.values():
            if target.peer == peer:
                target.failures = 0
                target.due = None

    def on_disconnected(self, peer: PeerId, now: float) -> None:
        self._connected.discard(peer)
        for target in self._targets.values():
            if target.peer == peer:
                target.due = now + self.policy.base

    def on_dial_started(self, addr: str) -> None:
        target = self._targets.get(addr)
        if target is not None:
            target.due = None

    def on_dial_failed(self, addr: str, now: float) -> None:
        target = self._targets.get(addr)
        if target is None:
            return
        target.failures += 1
        if target.peer not in self._connected:
            target.due = now + self.policy.delay(target.failures, self.rng)

    def due(self, now: float) -> list[str]:
        """Targets to dial now, oldest deadline first; each is marked in flight."""
        ready = sorted(
            (
                t
                for t in self._targets.values()
                if t.due is not None and t.due <= now and t.peer not in self._connected
            ),
            key=lambda t: (t.due, t.addr),
        )
        for target in ready:
            target.due = None
        return [t.addr for t in ready]

    def next_deadline(self) -> float | None:
        deadlines = [
            t.due
            for t in self._targets.values()
            if t.due is not None and t.peer not in self._connected
        ]
        return min(deadlines) if deadlines else None

    def failures(self, addr: str) -> int:
        target = self._targets.get(addr)
        return target.failures if target is not None else 0

    def targets(self) -> list[str]:
        return sorted(self._targets)
