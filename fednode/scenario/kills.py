"""Scenario layer: ``fednode demo --kill ROLE@ROUND[:PHASE]``: which process to kill, when.

A kill names a role (``client``, ``combiner`` or ``reducer``), a round and a phase of it, and
fires on the first event of that phase the demo hears from any node:

========  ====================================================================
phase     fires when
========  ====================================================================
plan      the reducer published the round's plan (``round-planned``)
fetch     a client started fetching the round's global model (``round-planned``
          reached a client: its ``fetch-started``)
train     a client fetched the model and starts training (``model-fetched``)
push      a client pushed its update (``update-pushed``)
partial   a combiner pushed its partial (``partial-pushed``)
reduce    the reducer closed the round and reduces (``round-closed``)
========  ====================================================================

The victim is the live process of that role with the lowest index (``combiner-0``, ``client-0``)
or, for ``reducer``, the reducer in office (the one that last announced a term). Without a phase
the kill fires at ``push``: mid-round, with updates in flight. Each kill fires once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fednode.errors import ConfigError

KillRole = Literal["client", "combiner", "reducer"]
Phase = Literal["plan", "fetch", "train", "push", "partial", "reduce"]

ROLES: tuple[KillRole, ...] = ("client", "combiner", "reducer")
PHASES: tuple[Phase, ...] = ("plan", "fetch", "train", "push", "partial", "reduce")
DEFAULT_PHASE: Phase = "push"
_ROLES: dict[str, KillRole] = {r: r for r in ROLES}
_PHASES: dict[str, Phase] = {p: p for p in PHASES}

#: The node event that opens each phase.
PHASE_EVENTS: dict[Phase, str] = {
    "plan": "round-planned",
    "fetch": "fetch-started",
    "train": "model-fetched",
    "push": "update-pushed",
    "partial": "partial-pushed",
    "reduce": "round-closed",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class KillSpec:
    """Kill a process of ``role`` when ``phase`` of ``round`` begins."""

    role: KillRole
    round: int
    phase: Phase = DEFAULT_PHASE

    def __str__(self) -> str:
        return f"{self.role}@{self.round}:{self.phase}"

    @property
    def event(self) -> str:
        return PHASE_EVENTS[self.phase]

    def fires_on(self, event: str, round: int) -> bool:
        return event == self.event and round == self.round


def parse_kill(text: str) -> KillSpec:
    """``ROLE@ROUND[:PHASE]`` as a :class:`KillSpec`.

    Raises:
        ConfigError: anything else, saying what is wrong.
    """
    spec = text.strip()
    role, at, rest = spec.partition("@")
    if not at:
        raise ConfigError(f"--kill {text!r}: expected ROLE@ROUND[:PHASE], e.g. combiner@2:push")
    kill_role = _ROLES.get(role)
    if kill_role is None:
        raise ConfigError(f"--kill {text!r}: the role must be one of {', '.join(ROLES)}")
    number, colon, phase = rest.partition(":")
    try:
        round_ = int(number)
    except ValueError:
        raise ConfigError(f"--kill {text!r}: the round must be a number") from None
    if round_ < 1:
        raise ConfigError(f"--kill {text!r}: rounds count from 1")
    chosen = _PHASES.get(phase) if colon else DEFAULT_PHASE
    if chosen is None:
        raise ConfigError(f"--kill {text!r}: the phase must be one of {', '.join(PHASES)}")
    return KillSpec(role=kill_role, round=round_, phase=chosen)


def check_kills(kills: list[KillSpec], *, rounds: int, clients: int, combiners: int) -> None:
    """Refuse kills the federation cannot survive or that never fire.

    Raises:
        ConfigError: a round past the last, every combiner or every client killed.
    """
    for kill in kills:
        if kill.round > rounds:
            raise ConfigError(f"--kill {kill}: the session has only {rounds} rounds")
    if sum(k.role == "combiner" for k in kills) >= combiners:
        raise ConfigError("--kill: at least one combiner must survive")
    if sum(k.role == "client" for k in kills) >= clients:
        raise ConfigError("--kill: at least one client must survive")


@dataclass(slots=True)
class _Fired:
    spec: KillSpec
    victim: str
    at: float  #: demo clock
    healed_at: float | None = None


class Chaos:
    """Decides, from the node events the demo reads, when each kill fires and on whom, and
    keeps the record the ``--json`` summary reports: the timeline of kills, elections,
    amended plans and lost combiners, and each failure's heal time (kill -> the round in
    progress completes). Pure bookkeeping: the demo does the killing.

    Args:
        kills: what to kill. started: the demo clock's zero (``time.monotonic()``).
        reducer: the name of the reducer started first (in office until an election).
    """

    def __init__(self, kills: tuple[KillSpec, ...], started: float, reducer: str) -> None:
        self.pending = list(kills)
        self.started = started
        self.office = reducer
        self.timeline: list[dict[str, object]] = []
        self._fired: list[_Fired] = []

    def on_event(self, node: str, data: dict[str, object], at: float) -> KillSpec | None:
        """Record node ``node``'s event ``data`` (read at ``at``); returns a kill to fire now."""
        kind = data.get("event")
        round_ = data.get("round")
        when = round(at - self.started, 3)
        if kind == "reducer-elected":
            self.office = node
            self.timeline.append(
                {"t": when, "kind": "elected", "node": node, "term": data.get("term")}
            )
        elif (
            kind == "round-planned" and isinstance(data.get("amendment"), int) and data["amendment"]
        ):
            self.timeline.append(
                {
                    "t": when,
                    "kind": "re-planned",
                    "node": node,
                    "round": round_,
                    "amendment": data["amendment"],
                }
            )
        elif kind == "combiner-lost":
            self.timeline.append(
                {
                    "t": when,
                    "kind": "combiner-lost",
                    "node": node,
                    "round": round_,
                    "orphans": data.get("orphans"),
                }
            )
        elif kind == "reducer-stepped-down":
            self.timeline.append(
                {"t": when, "kind": "stepped-down", "node": node, "term": data.get("term")}
            )
        elif kind == "round-completed" and isinstance(round_, int):
            for fired in self._fired:
                if fired.healed_at is None and round_ >= fired.spec.round:
                    fired.healed_at = at
                    self.timeline.append(
                        {"t": when, "kind": "healed", "round": round_, "after": str(fired.spec)}
                    )
        if not isinstance(kind, str) or not isinstance(round_, int):
            return None
        for spec in self.pending:
            if spec.fires_on(kind, round_):
                self.pending.remove(spec)
                return spec
        return None

    def victim(self, spec: KillSpec, alive: list[str]) -> str | None:
        """Whom ``spec`` kills among the ``alive`` node names: the reducer in office, or the
        lowest-numbered live node of the role."""
        if spec.role == "reducer":
            return self.office if self.office in alive else None
        named = sorted(
            (n for n in alive if n.startswith(f"{spec.role}-") and n.split("-")[-1].isdigit()),
            key=lambda n: int(n.split("-")[-1]),
        )
        return named[0] if named else None

    def killed(self, spec: KillSpec, victim: str, at: float) -> None:
        self._fired.append(_Fired(spec=spec, victim=victim, at=at))
        self.timeline.append(
            {"t": round(at - self.started, 3), "kind": "kill", "node": victim, "spec": str(spec)}
        )

    @property
    def heal_seconds(self) -> list[float | None]:
        """Per kill fired, in order: seconds from the kill to the round in progress completing."""
        return [None if f.healed_at is None else round(f.healed_at - f.at, 3) for f in self._fired]


__all__ = [
    "DEFAULT_PHASE",
    "PHASES",
    "PHASE_EVENTS",
    "ROLES",
    "Chaos",
    "KillSpec",
    "check_kills",
    "parse_kill",
]
