"""Scenario layer: the JSON events a node started with ``--events`` prints, as typed records.

One JSON object per stdout line after the identity block, named by its ``"event"`` key::

    reducer   session-started, round-completed, session-completed, session-failed
    seat      reducer-elected (a reducer, or an auto node, took office)
    combiner  combiner-assigned, partial-pushed
    client    update-pushed, update-included
    any node  stopped (on a clean exit)

An ``auto`` node prints the seat's, the combiner's and the client's events.

Every event carries ``t``, the node's wall clock (seconds since the epoch). :func:`decode` checks
the keys each kind needs and their JSON types; keys it does not know are ignored and so are
unknown kinds (``None``), so a newer node can say more than this parent reads. A known kind with
a missing or mistyped key is a bug in the node and raises :class:`EventError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fednode.errors import FednodeError


class EventError(FednodeError):
    """A node printed an event that breaks the contract above."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStarted:
    session: str
    rounds: int
    clients: int
    combiners: int
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundCompleted:
    """A round closed at the reducer. ``seconds`` is its wall time; the ``*_s`` phases split it:
    clients fetching the global model, training, pushing updates, and aggregation."""

    round: int
    accuracy: float | None
    loss: float | None
    seconds: float
    clients_included: int
    num_examples: int
    fetch_s: float | None
    train_s: float | None
    push_s: float | None
    aggregate_s: float | None
    bytes_sent: int
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCompleted:
    rounds: int
    final_accuracy: float | None
    model: str
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFailed:
    reason: str
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ReducerElected:
    """A reducer-eligible node took office for ``term`` (the first reducer, or a standby)."""

    term: int
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CombinerAssigned:
    """A combiner newly follows a plan of ``round`` (``amendment``) giving it ``clients``."""

    round: int
    amendment: int
    clients: int
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialPushed:
    round: int
    contributions: int
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdatePushed:
    round: int
    num_examples: int
    train_seconds: float
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateIncluded:
    round: int
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Stopped:
    bytes_sent: int
    t: float


Event = (
    SessionStarted
    | RoundCompleted
    | SessionCompleted
    | SessionFailed
    | ReducerElected
    | CombinerAssigned
    | PartialPushed
    | UpdatePushed
    | UpdateIncluded
    | Stopped
)


def decode(data: dict[str, object]) -> Event | None:
    """The event ``data`` holds, or None for a kind this parent does not know.

    Raises:
        EventError: no ``"event"`` string, or a known kind with a missing or mistyped key.
    """
    kind = data.get("event")
    if not isinstance(kind, str):
        raise EventError(f"an event line without an 'event' name: {_short(data)}")
    fields = _Fields(kind, data)
    t = fields.number("t")
    if kind == "session-started":
        return SessionStarted(
            session=fields.text("session"),
            rounds=fields.integer("rounds"),
            clients=fields.count("clients"),
            combiners=fields.count("combiners"),
            t=t,
        )
    if kind == "round-completed":
        return RoundCompleted(
            round=fields.integer("round"),
            accuracy=fields.optional_number("accuracy"),
            loss=fields.optional_number("loss"),
            seconds=fields.number("seconds"),
            clients_included=fields.count("clients_included"),
            num_examples=fields.integer("num_examples"),
            fetch_s=fields.optional_number("fetch_s"),
            train_s=fields.optional_number("train_s"),
            push_s=fields.optional_number("push_s"),
            aggregate_s=fields.optional_number("aggregate_s"),
            bytes_sent=fields.integer("bytes_sent"),
            t=t,
        )
    if kind == "session-completed":
        return SessionCompleted(
            rounds=fields.integer("rounds"),
            final_accuracy=fields.optional_number("final_accuracy"),
            model=fields.text("model"),
            t=t,
        )
    if kind == "session-failed":
        return SessionFailed(reason=fields.text("reason"), t=t)
    if kind == "reducer-elected":
        return ReducerElected(term=fields.integer("term"), t=t)
    if kind == "combiner-assigned":
        return CombinerAssigned(
            round=fields.integer("round"),
            amendment=fields.integer("amendment"),
            clients=fields.count("clients"),
            t=t,
        )
    if kind == "partial-pushed":
        return PartialPushed(
            round=fields.integer("round"), contributions=fields.count("contributions"), t=t
        )
    if kind == "update-pushed":
        return UpdatePushed(
            round=fields.integer("round"),
            num_examples=fields.integer("num_examples"),
            train_seconds=fields.number("train_seconds"),
            t=t,
        )
    if kind == "update-included":
        return UpdateIncluded(round=fields.integer("round"), t=t)
    if kind == "stopped":
        return Stopped(bytes_sent=fields.integer("bytes_sent"), t=t)
    return None


class _Fields:
    """Typed reads of one event's keys, each failure naming the kind and the key."""

    def __init__(self, kind: str, data: dict[str, object]) -> None:
        self.kind = kind
        self.data = data

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise EventError(f"{self.kind} event without {key!r}: {_short(self.data)}")
        return self.data[key]

    def _wrong(self, key: str, expected: str) -> EventError:
        return EventError(f"{self.kind} event: {key!r} must be {expected}, got {self.data[key]!r}")

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer")
        return value

    def count(self, key: str) -> int:
        """An integer, or the length of a list (of peer IDs, say)."""
        value = self._get(key)
        if isinstance(value, list):
            return len(value)
        return self.integer(key)

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(key, "a number")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self._get(key) is None else self.number(key)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value


def _short(data: dict[str, object]) -> str:
    text = repr(data)
    return text if len(text) <= 200 else text[:197] + "..."
