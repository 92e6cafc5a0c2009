"""Node layer: the JSON events a node reports about its work, one object per line.

``fednode start --events`` prints them on stdout after the identity block, each flushed as it
happens, for a parent process (``fednode demo``) to follow. Every event has an ``"event"`` name
and ``"t"``, the node's wall clock in seconds since the epoch::

    reducer   session-started   session, rounds, clients, combiners
              round-planned     round, amendment, term, clients, combiners
              round-closed      round, partials
              combiner-lost     round, combiner, orphans
              round-completed   round, accuracy, loss, seconds, clients_included, num_examples,
                                fetch_s, train_s, push_s, aggregate_s, bytes_sent
              session-completed rounds, final_accuracy, model (hex digest)
              session-failed    reason
    seat      reducer-elected   term, session, resume_round
              reducer-stepped-down, reducer-suspended   term
              reducer-resume-failed                     reason
    combiner  combiner-assigned round, amendment, clients (a plan gives it clients)
              partial-pushed    round, contributions
    client    fetch-started     round
              model-fetched     round
              update-pushed     round, num_examples, train_seconds
              update-included   round
    any node  stopped           bytes_sent (on a clean exit)

A *seat* is a reducer-eligible node (``--role reducer``, ``auto``); an ``auto`` node reports the
combiner's and the client's events too.

``accuracy``, ``loss`` and ``final_accuracy`` are the reducer's evaluation of the global model
(null in a round without one). The phase times split a round's ``seconds`` as the reducer sees it
(see :mod:`fednode.node.reducer`). ``bytes_sent`` counts this node's data-plane bytes so far.

Tests read the same events in process: :class:`EventLog` keeps them and wakes whoever waits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import TextIO

import trio

Value = str | int | float | bool | None


class EventLog:
    """Where a node's events go: kept in :attr:`events`, and written to ``out`` if given.

    Args:
        out: a text stream for one JSON object per line (flushed after each), or None.
        clock: wall-clock seconds for ``t``.
    """

    def __init__(self, out: TextIO | None = None, *, clock: Callable[[], float] = time.time):
        self.out = out
        self._clock = clock
        self.events: list[dict[str, Value]] = []
        self._changed = trio.Event()

    def emit(self, event: str, **fields: Value) -> dict[str, Value]:
        """Record (and print) one event; non-finite floats become null."""
        record: dict[str, Value] = {"event": event}
        for key, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        record["t"] = round(self._clock(), 3)
        self.events.append(record)
        if self.out is not None:
            self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.out.flush()
        self._changed.set()
        self._changed = trio.Event()
        return record

    def named(self, event: str) -> list[dict[str, Value]]:
        """Every event called ``event`` so far, oldest first."""
        return [e for e in self.events if e["event"] == event]

    async def wait_for(self, event: str, count: int = 1) -> list[dict[str, Value]]:
        """Wait until ``count`` events called ``event`` happened; returns them all."""
        while len(found := self.named(event)) < count:
            await self._changed.wait()
        return found

    async def wait_any(self, *events: str) -> dict[str, Value]:
        """Wait for the first event named any of ``events``; returns it."""
        while True:
            for record in self.events:
                if record["event"] in events:
                    return record
            await self._changed.wait()


__all__ = ["EventLog", "Value"]
