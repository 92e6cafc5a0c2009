"""Protocol layer: what the round machines share (``reducer``, ``combiner`` and ``client``).

Here: the clock convention, least-loaded client assignment, the rules by which a combiner or a
client follows the reducer's plans (:class:`PlanFollower`), the rejection reasons for plans and
results, opening the sealed round messages, and the transition-table machinery the three machines
and ``protocols/rounds.md`` are drawn from. Sans-IO: no trio, no libp2p, no clock reads, no I/O.

Time. Every machine is given ``now``: seconds on the driver's monotonic clock
(``trio.current_time()``). Plans carry wall-clock milliseconds (``deadline_ms``), so each machine
also takes ``wall_offset_ms``, the driver's wall clock minus ``now`` in ms
(``time.time() * 1000 - trio.current_time() * 1000``). Nodes' wall clocks must agree to well within
the combiner's push margin (see ``combiner``).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fednode.crypto import open_envelope, peer_id_from_public_key
from fednode.errors import LocalProtocolError
from fednode.wire import (
    Assignment,
    Envelope,
    FederationId,
    PeerId,
    PublicKey,
    RoundPlan,
    RoundResult,
    SessionEnded,
    SessionId,
)

# --- time -----------------------------------------------------------------------------------


def wall_ms(now: float, wall_offset_ms: float) -> int:
    """The wall-clock time, ms since the epoch, of the driver's ``now``."""
    return max(0, round(now * 1000 + wall_offset_ms))


def local_time(ms: int, wall_offset_ms: float) -> float:
    """The driver's clock reading at wall-clock time ``ms``."""
    return (ms - wall_offset_ms) / 1000


@functools.lru_cache(maxsize=65_536)
def peer_of(public_key: PublicKey) -> PeerId:
    """The peer ID of a signer's public key (cached: partials list many signers)."""
    return peer_id_from_public_key(public_key)


# --- assignment -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CombinerLoad:
    """A combiner the reducer may assign clients to, with its load from its heartbeats.

    ``attached`` should count only clients it serves for other work: the reducer replaces its own
    assignment with every plan, so a driver subtracts the clients this session attached to it.
    """

    peer: PeerId
    capacity: int
    attached: int = 0

    @property
    def spare(self) -> int:
        return max(0, self.capacity - self.attached)


def assign_clients(
    clients: Iterable[PeerId], combiners: Iterable[CombinerLoad]
) -> tuple[Assignment, ...]:
    """Least-loaded-first assignment: each client, in peer-ID order, goes to the combiner with the
    most spare capacity left (ties to the smaller peer ID). Clients beyond the combiners' total
    spare capacity are left out of the round. Deterministic: the same inputs, in any order, give
    the same assignment. A peer may be both a client and a combiner (role ``auto``)."""
    spare: dict[PeerId, int] = {}
    for load in combiners:
        spare[load.peer] = max(spare.get(load.peer, 0), load.spare)
    taken: dict[PeerId, list[PeerId]] = {}
    for client in sorted(set(clients)):
        if not spare:
            break
        best = min(spare, key=lambda peer: (-spare[peer], peer))
        if spare[best] <= 0:
            break
        spare[best] -= 1
        taken.setdefault(best, []).append(client)
    return tuple(
        Assignment(combiner=combiner, clients=tuple(taken[combiner])) for combiner in sorted(taken)
    )


# --- following plans ------------------------------------------------------------------------


class PlanRejection(enum.StrEnum):
    """Why a combiner or client ignored a plan, in the order the checks run."""

    OTHER_SESSION = "other-session"  #: another federation, or another session than followed
    ENDED = "ended"  #: the session already ended
    STALE_TERM = "stale-term"  #: from an older reducer term than the newest seen
    WRONG_REDUCER = "wrong-reducer"  #: another reducer already planned in this term
    DUPLICATE = "duplicate"  #: the plan already followed, delivered again
    STALE = "stale"  #: not newer, by (term, round, amendment), than the plan followed


class ResultRejection(enum.StrEnum):
    """Why a combiner or client ignored a round result or a session end."""

    OTHER_SESSION = "other-session"
    STALE_TERM = "stale-term"  #: from an older reducer term than the newest seen
    UNKNOWN_TERM = "unknown-term"  #: from a term whose plans it never followed
    WRONG_REDUCER = "wrong-reducer"  #: not signed by the reducer that planned in that term


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRejected:
    """A plan was ignored; the machine is unchanged."""

    term: int
    round: int
    amendment: int
    reason: PlanRejection


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultRejected:
    """A round result or session end was ignored; the machine is unchanged."""

    round: int
    reason: ResultRejection


class PlanFollower:
    """The plans one combiner or client follows: the newest of one session, by
    ``(term, round, amendment)``, each term's reducer pinned by the first plan seen in it.

    It remembers the highest reducer term seen (:attr:`term`): plans, results and session ends
    of a lower term are ``stale-term``; a plan of a higher term replaces the plan in force (a new
    reducer took over). Which reducer may plan a term at all is the election's business; here a
    term belongs to whoever planned in it first.
    """

    __slots__ = ("_reducers", "ended", "federation", "plan", "session")

    def __init__(self, federation: FederationId, session: SessionId | None) -> None:
        self.federation = federation
        self.session = session
        self.plan: RoundPlan | None = None
        self.ended = False
        self._reducers: dict[int, PublicKey] = {}

    def check(self, plan: RoundPlan) -> PlanRejection | None:
        if plan.federation != self.federation or (
            self.session is not None and plan.session != self.session
        ):
            return PlanRejection.OTHER_SESSION
        if self.ended:
            return PlanRejection.ENDED
        if self.term is not None and plan.term < self.term:
            return PlanRejection.STALE_TERM
        pinned = self._reducers.get(plan.term)
        if pinned is not None and pinned != plan.reducer:
            return PlanRejection.WRONG_REDUCER
        if plan == self.plan:
            return PlanRejection.DUPLICATE
        current = self.plan
        if current is not None and _plan_key(plan) <= _plan_key(current):
            return PlanRejection.STALE
        return None

    @property
    def term(self) -> int | None:
        """The highest reducer term of the plans followed, None before the first."""
        return max(self._reducers) if self._reducers else None

    def follow(self, plan: RoundPlan) -> tuple[RoundPlan | None, bool]:
        """Adopt a checked plan. Returns (the previous plan, whether ``plan`` amends it: the same
        round from the same parent, so updates made for one count for the other)."""
        previous = self.plan
        self.session = plan.session
        self._reducers.setdefault(plan.term, plan.reducer)
        self.plan = plan
        same = (
            previous is not None and previous.round == plan.round and previous.parent == plan.parent
        )
        return previous, same

    def check_signed(
        self, federation: str, session: str, term: int, reducer: PublicKey
    ) -> ResultRejection | None:
        """Whether a result or session end comes from the reducer of a term followed, and not
        an older term than the newest."""
        if federation != self.federation or session != self.session:
            return ResultRejection.OTHER_SESSION
        if self.term is not None and term < self.term:
            return ResultRejection.STALE_TERM
        pinned = self._reducers.get(term)
        if pinned is None:
            return ResultRejection.UNKNOWN_TERM
        if pinned != reducer:
            return ResultRejection.WRONG_REDUCER
        return None

    def rejected(self, plan: RoundPlan, reason: PlanRejection) -> PlanRejected:
        return PlanRejected(
            term=plan.term, round=plan.round, amendment=plan.amendment, reason=reason
        )


def _plan_key(plan: RoundPlan) -> tuple[int, int, int]:
    return plan.term, plan.round, plan.amendment


# --- sealed messages ------------------------------------------------------------------------


def open_round_plan(data: bytes | Envelope) -> RoundPlan:
    """Verify and decode a sealed plan; its ``reducer`` must be its signer (``AUTHOR_FIELDS``).

    Raises:
        WireError: malformed. BadSignatureError: the signature or the author does not check out.
    """
    plan, _ = open_envelope(data, RoundPlan)
    return plan


def open_round_result(data: bytes | Envelope) -> RoundResult:
    """Verify and decode a sealed round result (as :func:`open_round_plan`)."""
    result, _ = open_envelope(data, RoundResult)
    return result


def open_session_ended(data: bytes | Envelope) -> SessionEnded:
    """Verify and decode a sealed session end (as :func:`open_round_plan`)."""
    ended, _ = open_envelope(data, SessionEnded)
    return ended


# --- transition tables ----------------------------------------------------------------------

Times = Literal["", "?", "*"]


@dataclass(frozen=True, slots=True)
class Emit:
    """One entry of a transition's actions: an action type, once (``""``), at most once (``?``)
    or any number of times (``*``)."""

    action: type[Any]
    times: Times = ""

    def __str__(self) -> str:
        return f"{self.action.__name__}{self.times}"


def maybe(action: type[Any]) -> Emit:
    return Emit(action, "?")


def many(action: type[Any]) -> Emit:
    return Emit(action, "*")


#: (state, input) -> (next state, the actions emitted, in order).
Table = Mapping[tuple[Any, Any], tuple[Any, tuple[Emit, ...]]]


def emits(*actions: type[Any] | Emit) -> tuple[Emit, ...]:
    return tuple(a if isinstance(a, Emit) else Emit(a) for a in actions)


def fits(pattern: Sequence[Emit], actions: Sequence[object]) -> bool:
    """Whether ``actions`` is what ``pattern`` allows, in order."""
    if not pattern:
        return not actions
    head, rest = pattern[0], pattern[1:]
    if head.times == "":
        return bool(actions) and type(actions[0]) is head.action and fits(rest, actions[1:])
    count = 0
    while count < len(actions) and type(actions[count]) is head.action:
        count += 1
    limit = count if head.times == "*" else min(count, 1)
    return any(fits(rest, actions[n:]) for n in range(limit, -1, -1))


def step(table: Table, machine: str, state: Any, inp: Any, actions: list[Any]) -> Any:
    """The next state for ``(state, inp)``, checking that ``actions`` are what the table says.

    Raises:
        LocalProtocolError: no such transition, or the code emitted other actions than its table
            (either is our bug).
    """
    try:
        next_state, pattern = table[state, inp]
    except KeyError:
        raise LocalProtocolError(f"{machine}: no transition from {state} on {inp}") from None
    if not fits(pattern, actions):
        got = ", ".join(type(a).__name__ for a in actions) or "nothing"
        want = ", ".join(map(str, pattern)) or "nothing"
        raise LocalProtocolError(f"{machine}: {state} on {inp} emitted {got}, table says {want}")
    return next_state


def describe_table(table: Table) -> str:
    """A transition table as the Markdown table ``protocols/rounds.md`` shows."""
    rows = ["| state | input | next | actions |", "| --- | --- | --- | --- |"]
    for (state, inp), (next_state, pattern) in table.items():
        actions = ", ".join(f"`{e}`" for e in pattern) or "-"
        rows.append(f"| {state} | {inp} | {next_state} | {actions} |")
    return "\n".join(rows)


def describe_diagram(table: Table, initial: Any) -> str:
    """A transition table as the Mermaid state diagram ``protocols/rounds.md`` shows: one arrow
    per (state, next) pair, labelled with the inputs that take it."""
    edges: dict[tuple[Any, Any], list[str]] = {}
    for (state, inp), (next_state, _) in table.items():
        edges.setdefault((state, next_state), []).append(str(inp))
    lines = ["stateDiagram-v2", f"    [*] --> {initial}"]
    lines += [f"    {a} --> {b}: {', '.join(inputs)}" for (a, b), inputs in edges.items()]
    return "\n".join(lines)


__all__ = [
    "CombinerLoad",
    "Emit",
    "PlanFollower",
    "PlanRejected",
    "PlanRejection",
    "ResultRejected",
    "ResultRejection",
    "Table",
    "assign_clients",
    "describe_diagram",
    "describe_table",
    "emits",
    "fits",
    "local_time",
    "many",
    "maybe",
    "open_round_plan",
    "open_round_result",
    "open_session_ended",
    "peer_of",
    "step",
    "wall_ms",
]
