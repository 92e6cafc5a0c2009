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

Auto mode (``fednode demo --auto``: every data node is an ``auto-<i>`` node, and the election
picks which of them serve as combiners). The demo learns who combines from the nodes'
``combiner-assigned`` events (a node newly following a plan of a round that gives it clients):

- ``combiner`` kills the lowest-numbered live auto node that serves as a combiner in the kill's
  round (any plan of that round); if none of that round is known yet, the lowest-numbered of
  the live auto nodes that reported ``combiner-assigned`` for the latest round any of them did;
- ``client`` kills the lowest-numbered live auto node that is not such a combiner (nor the
  reducer in office, which an auto node may be once it took over);
- ``reducer`` kills the reducer in office, as above; the auto nodes are its standbys.

If no live auto node has reported ``combiner-assigned`` at all (a kill at ``plan`` of round 1),
a ``combiner`` or ``client`` kill waits (:meth:`Chaos.postpone`): a combiner kill fires on the
first ``combiner-assigned`` of its round or later; a client kill once as many combiners of its
round as the election should pick have reported, or at the round's first ``update-pushed``
(every combiner followed the plan long before an update trained), whichever comes first.

What can be survived (:func:`check_kills`). With explicit roles, at least one combiner and one
client must outlive the kills, and a reducer kill needs a standby reducer (checked by the demo's
configuration). In auto mode there is no combiner to run out of: any live auto node can be
elected, so killing the combiners is survived whatever their number. What runs out is data:
every kill takes one auto node's data away for good: a client or combiner kill kills one, and a
reducer kill makes an auto node take over, and a reducer plans no update of its own (explicit
standby reducers, ``--standbys``, take over first: those reducer kills cost no data). So the rule
is that at least one auto node must still train after all the kills: ``client + combiner +
max(0, reducer - standbys) < auto nodes``; the reducer's ``--min-clients`` is the auto nodes
less that same count (:func:`data_losses`).
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
#: The prefix of the data nodes' names in auto mode (``auto-0``, ``auto-1``, ...).
AUTO_PREFIX = "auto-"

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


def data_losses(kills: list[KillSpec], *, auto: bool = False, standbys: int = 0) -> int:
    """How many data nodes the ``kills`` take out of training for good: the client kills; in
    auto mode every kill but the reducer kills that explicit standbys absorb (module docstring).
    """
    clients = sum(k.role == "client" for k in kills)
    if not auto:
        return clients
    combiners = sum(k.role == "combiner" for k in kills)
    reducers = sum(k.role == "reducer" for k in kills)
    return clients + combiners + max(0, reducers - standbys)


def check_kills(
    kills: list[KillSpec],
    *,
    rounds: int,
    clients: int,
    combiners: int,
    auto: bool = False,
    standbys: int = 0,
) -> None:
    """Refuse kills the federation cannot survive or that never fire (the rules are in the
    module docstring). ``clients`` counts the data nodes (the auto nodes in auto mode),
    ``standbys`` the explicit standby reducers.

    Raises:
        ConfigError: a round past the last; with explicit roles, every combiner or every client
            killed; in auto mode, no auto node left training.
    """
    for kill in kills:
        if kill.round > rounds:
            raise ConfigError(f"--kill {kill}: the session has only {rounds} rounds")
    if auto:
        lost = data_losses(kills, auto=True, standbys=standbys)
        if lost >= clients:
            raise ConfigError(
                f"--kill: {lost} of the {clients} auto nodes would stop training (each kill "
                "takes one away; an auto node that takes over as reducer trains no more): at "
                "least one must keep training"
            )
        return
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
        auto: auto mode (module docstring): victims are ``auto-<i>`` nodes, chosen by whether
            they serve as combiners.
        combiners: how many combiners the election should pick (auto mode: when a postponed
            client kill may fire).
    """

    def __init__(
        self,
        kills: tuple[KillSpec, ...],
        started: float,
        reducer: str,
        *,
        auto: bool = False,
        combiners: int = 1,
    ) -> None:
        self.pending = list(kills)
        self.started = started
        self.office = reducer
        self.auto = auto
        self.combiners = combiners
        self.timeline: list[dict[str, object]] = []
        #: round -> the nodes that reported ``combiner-assigned`` for it, in the order heard.
        self.assigned: dict[int, list[str]] = {}
        self._fired: list[_Fired] = []
        self._postponed: list[KillSpec] = []

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
        elif kind == "combiner-assigned" and isinstance(round_, int):
            serving = self.assigned.setdefault(round_, [])
            if node not in serving:
                serving.append(node)
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
        for spec in self._postponed:
            if self._now_known(spec, kind, round_):
                self._postponed.remove(spec)
                return spec
        for spec in self.pending:
            if spec.fires_on(kind, round_):
                self.pending.remove(spec)
                return spec
        return None

    def _now_known(self, spec: KillSpec, kind: str, round_: int) -> bool:
        """Whether the event (``kind`` of ``round_``) tells enough to fire postponed ``spec``."""
        if round_ < spec.round:
            return False
        if spec.role == "combiner":
            return kind == "combiner-assigned"
        known = len(self.assigned.get(round_, ()))
        return known >= self.combiners or kind == "update-pushed"

    def victim(self, spec: KillSpec, alive: list[str]) -> str | None:
        """Whom ``spec`` kills among the ``alive`` node names: the reducer in office, or the
        lowest-numbered live node of the role; in auto mode the auto node chosen by whether it
        combines (module docstring). None: nobody fits (yet: see :meth:`postpone`)."""
        if spec.role == "reducer":
            return self.office if self.office in alive else None
        if not self.auto:
            named = _numbered(alive, f"{spec.role}-")
            return named[0] if named else None
        autos = self._autos(alive)
        serving = set(self.combiners_in(spec.round, autos))
        if spec.role == "combiner":
            chosen = [n for n in autos if n in serving]
        else:
            chosen = [n for n in autos if n not in serving] if serving else []
        return chosen[0] if chosen else None

    def combiners_in(self, round_: int, alive: list[str]) -> list[str]:
        """The ``alive`` nodes known to serve as combiners in ``round_``; if none is known of
        that round, those that reported ``combiner-assigned`` for the latest round any live
        node did (empty if none ever did)."""
        here = [n for n in self.assigned.get(round_, ()) if n in alive]
        if here:
            return here
        for earlier in sorted(self.assigned, reverse=True):
            found = [n for n in self.assigned[earlier] if n in alive]
            if found:
                return found
        return []

    def postpone(self, spec: KillSpec, alive: list[str]) -> bool:
        """Keep ``spec``, whose :meth:`victim` was None, to fire later if that is because no
        live auto node (but the one in office) has said yet that it combines (module
        docstring). Returns whether it
        was kept; if not, the kill has no victim and never fires."""
        if not self.auto or spec.role == "reducer":
            return False
        if self.combiners_in(spec.round, self._autos(alive)):
            return False
        self._postponed.append(spec)
        return True

    def _autos(self, alive: list[str]) -> list[str]:
        """The live auto nodes a combiner or client kill may choose from, by number: not the
        one in office (it neither trains nor combines while it leads)."""
        return [n for n in _numbered(alive, AUTO_PREFIX) if n != self.office]

    def killed(self, spec: KillSpec, victim: str, at: float) -> None:
        self._fired.append(_Fired(spec=spec, victim=victim, at=at))
        self.timeline.append(
            {"t": round(at - self.started, 3), "kind": "kill", "node": victim, "spec": str(spec)}
        )

    @property
    def heal_seconds(self) -> list[float | None]:
        """Per kill fired, in order: seconds from the kill to the round in progress completing."""
        return [None if f.healed_at is None else round(f.healed_at - f.at, 3) for f in self._fired]


def _numbered(names: list[str], prefix: str) -> list[str]:
    """The names ``<prefix><number>``, by number."""
    found = [n for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()]
    return sorted(found, key=lambda n: int(n[len(prefix) :]))


__all__ = [
    "AUTO_PREFIX",
    "DEFAULT_PHASE",
    "PHASES",
    "PHASE_EVENTS",
    "ROLES",
    "Chaos",
    "KillSpec",
    "check_kills",
    "data_losses",
    "parse_kill",
]
