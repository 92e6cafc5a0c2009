"""Node layer: the timer pump a role driver runs beside its sans-IO machine.

A machine says when it next needs a tick (``next_deadline()``); the pump calls ``on_timer(now)``
then and hands the actions it returns to the driver's queue, and looks at the deadline again
whenever the driver reports a change (:meth:`TimerPump.changed`: an input fed to the machine may
have moved it). Time is ``trio.current_time()``, so tests run on trio's MockClock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import trio

A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)


class Timed(Protocol[A_co]):
    """A machine with timers: the client, combiner and leader machines."""

    def on_timer(self, now: float) -> Sequence[A_co]: ...

    def next_deadline(self) -> float | None: ...


class TimerPump(Generic[A]):
    """Ticks ``machine`` at each of its deadlines and passes the actions to ``queue``."""

    def __init__(self, machine: Timed[A], queue: Callable[[Sequence[A]], None]) -> None:
        self._machine = machine
        self._queue = queue
        self._changed = trio.Event()

    def changed(self) -> None:
        """The machine took an input: its next deadline may have moved."""
        self._changed.set()

    async def run(self) -> None:
        """Pump until cancelled (a task in the driver's nursery)."""
        while True:
            self._queue(self._machine.on_timer(trio.current_time()))
            deadline = self._machine.next_deadline()
            self._changed = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._changed.wait()


__all__ = ["Timed", "TimerPump"]
