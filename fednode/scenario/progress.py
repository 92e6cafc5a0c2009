"""Scenario layer: what a running federation has said so far, folded from its nodes' events.

:class:`Progress` takes the nodes' events in the order they were read and answers, at any time, a
frozen :class:`FederationSnapshot` that the views in :mod:`fednode.ui` render. No I/O and no clock
reads: every call is given the time (``time.monotonic()`` seconds) it happened at.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from typing import Literal

from fednode.scenario.events import (
    CombinerAssigned,
    Event,
    PartialPushed,
    ReducerElected,
    RoundCompleted,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
    Stopped,
    UpdateIncluded,
    UpdatePushed,
)

#: A node's role as the demo started it (``auto``: ``fednode demo --auto``'s data nodes).
Role = Literal["bootstrap", "reducer", "combiner", "client", "auto"]
#: starting: processes coming up · running: the session is on · stopping: the session is over and
#: the nodes are being stopped · completed / failed: all done.
Phase = Literal["starting", "running", "stopping", "completed", "failed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeView:
    """One node as the demo sees it. ``state`` is a few words (``up``, ``pushed``, ``stopped``);
    ``round`` the last round it reported on."""

    name: str
    role: Role
    peer_id: str = ""
    state: str = "starting"
    round: int | None = None
    bytes_sent: int | None = None
    exit_code: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRow:
    """A completed round, as the reducer reported it (see :class:`RoundCompleted`), and
    ``combiners``: the nodes that said a plan of the round gave them clients
    (``combiner-assigned``; a combiner killed mid-round and the one its orphans moved to both
    count), by name."""

    round: int
    accuracy: float | None
    loss: float | None
    seconds: float
    clients_included: int
    num_examples: int = 0
    fetch_s: float | None = None
    train_s: float | None = None
    push_s: float | None = None
    aggregate_s: float | None = None
    bytes_sent: int = 0
    combiners: tuple[str, ...] = ()

    @classmethod
    def from_event(cls, event: RoundCompleted, combiners: tuple[str, ...] = ()) -> RoundRow:
        return cls(
            round=event.round,
            accuracy=event.accuracy,
            loss=event.loss,
            seconds=event.seconds,
            clients_included=event.clients_included,
            num_examples=event.num_examples,
            fetch_s=event.fetch_s,
            train_s=event.train_s,
            push_s=event.push_s,
            aggregate_s=event.aggregate_s,
            bytes_sent=event.bytes_sent,
            combiners=combiners,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSnapshot:
    """Everything a view of the demo shows, at one instant.

    Attributes:
        clients, combiners, rounds: the federation asked for (``auto``: the data nodes are
            ``auto`` nodes, and ``combiners`` is how many of them the election should pick).
        phase: see :data:`Phase`.
        elapsed: seconds since the demo started.
        processes_up_seconds: from the demo's start to every node having printed its identity.
        startup_seconds: from the demo's start to the reducer's ``session-started``.
        nodes: every node, bootstrap first, then reducer, combiners, clients (or auto nodes).
        serving: the nodes known to serve as combiners in the round in progress.
        completed: the rounds completed so far, in order.
        final_accuracy: the reducer's, once the session completed.
        error: why the demo failed (phase ``failed``).
    """

    clients: int
    combiners: int
    rounds: int
    auto: bool = False
    phase: Phase = "starting"
    elapsed: float = 0.0
    processes_up_seconds: float | None = None
    startup_seconds: float | None = None
    nodes: tuple[NodeView, ...] = ()
    completed: tuple[RoundRow, ...] = ()
    final_accuracy: float | None = None
    error: str | None = None
    serving: tuple[str, ...] = ()

    @property
    def current_round(self) -> int | None:
        """The round in progress (None before the session starts or once it is over)."""
        if self.phase != "running":
            return None
        done = self.completed[-1].round if self.completed else 0
        return min(done + 1, self.rounds)


@dataclass(slots=True)
class Progress:
    """Folds node events into a :class:`FederationSnapshot` (see the module docstring)."""

    clients: int
    combiners: int
    rounds: int
    started: float
    auto: bool = False
    nodes: dict[str, NodeView] = field(default_factory=dict)
    phase: Phase = "starting"
    processes_up_at: float | None = None
    session_started_at: float | None = None
    first_round_at: float | None = None
    session_completed_at: float | None = None
    completed: list[RoundRow] = field(default_factory=list)
    final_accuracy: float | None = None
    error: str | None = None
    #: round -> the nodes that reported ``combiner-assigned`` for it, in the order heard.
    assigned: dict[int, list[str]] = field(default_factory=dict)

    def add_node(self, name: str, role: Role) -> None:
        self.nodes[name] = NodeView(name=name, role=role)

    def node_ready(self, name: str, peer_id: str) -> None:
        self._set(name, peer_id=peer_id, state="up")

    def all_up(self, at: float) -> None:
        """Every node has printed its identity block."""
        self.processes_up_at = at

    def apply(self, name: str, event: Event, at: float) -> None:
        """Take ``event``, which node ``name`` printed and the demo read at ``at``."""
        if isinstance(event, SessionStarted):
            self.phase = "running" if self.phase == "starting" else self.phase
            if self.session_started_at is None:  # not a standby resuming the session
                self.session_started_at = at
            self._set(name, state="running", round=1)
        elif isinstance(event, RoundCompleted):
            # A reducer that took over may close again a round its predecessor closed unheard.
            self.completed = [r for r in self.completed if r.round != event.round]
            combiners = tuple(_by_number(self.assigned.get(event.round, [])))
            self.completed.append(RoundRow.from_event(event, combiners))
            if self.first_round_at is None:
                self.first_round_at = at
            self._set(name, state="running", round=event.round)
        elif isinstance(event, SessionCompleted):
            self.final_accuracy = event.final_accuracy
            self.session_completed_at = at
            self.phase = "stopping"
            self._set(name, state="completed", round=event.rounds)
        elif isinstance(event, SessionFailed):
            self.fail(f"the session failed: {event.reason}")
            self._set(name, state="failed")
        elif isinstance(event, ReducerElected):
            self._set(name, state=f"elected (term {event.term})")
        elif isinstance(event, CombinerAssigned):
            serving = self.assigned.setdefault(event.round, [])
            if name not in serving:
                serving.append(name)
            self._set(name, state="combining", round=event.round)
        elif isinstance(event, PartialPushed):
            self._set(name, state="pushed", round=event.round)
        elif isinstance(event, UpdatePushed):
            self._set(name, state="pushed", round=event.round)
        elif isinstance(event, UpdateIncluded):
            self._set(name, state="included", round=event.round)
        elif isinstance(event, Stopped):
            self._set(name, state="stopped", bytes_sent=event.bytes_sent)

    def exited(self, name: str, code: int) -> None:
        """Node ``name``'s process exited with ``code`` (negative: killed by that signal)."""
        if code == 0:
            state = "stopped"
        elif code < 0:
            state = f"killed ({_signal_name(-code)})"
        else:
            state = f"exited {code}"
        self._set(name, state=state, exit_code=code)

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        self.phase = "failed"

    def finish(self) -> None:
        """Every node has been stopped after a completed session."""
        if self.phase != "failed":
            self.phase = "completed"

    @property
    def startup_seconds(self) -> float | None:
        return _since(self.started, self.session_started_at)

    @property
    def processes_up_seconds(self) -> float | None:
        return _since(self.started, self.processes_up_at)

    @property
    def bytes_sent(self) -> int:
        """What the nodes reported sending, summed over those that said ``stopped``."""
        return sum(node.bytes_sent or 0 for node in self.nodes.values())

    def snapshot(self, now: float) -> FederationSnapshot:
        snapshot = FederationSnapshot(
            clients=self.clients,
            combiners=self.combiners,
            rounds=self.rounds,
            auto=self.auto,
            phase=self.phase,
            elapsed=now - self.started,
            processes_up_seconds=self.processes_up_seconds,
            startup_seconds=self.startup_seconds,
            nodes=tuple(self.nodes.values()),
            completed=tuple(self.completed),
            final_accuracy=self.final_accuracy,
            error=self.error,
        )
        current = snapshot.current_round
        if current is None:
            return snapshot
        return replace(snapshot, serving=tuple(_by_number(self.assigned.get(current, []))))

    def _set(self, name: str, **changes: object) -> None:
        self.nodes[name] = replace(self.nodes[name], **changes)  # type: ignore[arg-type]


def _by_number(names: list[str]) -> list[str]:
    """``auto-2`` before ``auto-10``: by the number after the last ``-``, then by name."""

    def key(name: str) -> tuple[str, int, str]:
        stem, _, number = name.rpartition("-")
        return (stem, int(number), name) if number.isdigit() else (name, -1, name)

    return sorted(names, key=key)


def _since(start: float, at: float | None) -> float | None:
    return None if at is None else at - start


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
