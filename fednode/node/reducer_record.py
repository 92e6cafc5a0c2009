"""Node layer: what a reducer's driver records of its session, on disk and in the event log.

Each sealed ``round-result`` and the final ``session-ended`` are written to
``<data-dir>/sessions/<session>/`` (``round-0001.result``, ..., ``session.ended``), each through
a temporary file and a rename, so a reader never sees half of one. The session's events
(``session-started``, ``round-planned``, ``round-closed``, ``combiner-lost``,
``round-completed``, ``session-completed`` or ``session-failed``) and their log lines are made
here too.

Phase times of ``round-completed`` events: ``seconds`` runs from the round's first plan to its
result; ``fetch_s`` and ``train_s`` are the clients' own ``fetch_seconds`` and ``train_seconds``
update metrics, averaged (weighted by examples) through the partials; ``push_s`` is the rest of
the collection (updates and partials moving, and waiting for the slowest client); and
``aggregate_s`` runs from the close to the result (reduce, optimiser, store, evaluation).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fednode.node.context import RoleContext
from fednode.protocol.reducer_actions import CombinerLost, SessionCompleted, SessionFailed
from fednode.wire import RoundPlan, RoundResult

# The reducer driver's log: this record is its account of the session.
log = logging.getLogger("fednode.node.reducer")

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(slots=True)
class _RoundClock:
    started: float  #: the round's first plan went out
    closed: float | None = None  #: the first Reduce of the round


class SessionRecord:
    """One session's results directory and events, as its reducer sees them (see the module
    docstring). ``now`` is the driver's clock (``trio.current_time()``)."""

    def __init__(self, ctx: RoleContext, session: str) -> None:
        self.ctx = ctx
        self.session = session
        self.results_dir: Path = ctx.node.config.data_dir / "sessions" / _SAFE.sub("_", session)
        self._clocks: dict[int, _RoundClock] = {}
        self._last_accuracy: float | None = None

    def save(self, name: str, sealed: bytes) -> None:
        """Write a sealed message to the results directory (a failure is logged, not raised)."""
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            path: Path = self.results_dir / name
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(sealed)
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot save %s: %s", name, exc)

    def started(self, plan: RoundPlan, rounds: int) -> None:
        """The session runs, ``plan`` its first."""
        self.ctx.events.emit(
            "session-started",
            session=self.session,
            rounds=rounds,
            clients=sum(len(a.clients) for a in plan.assignments),
            combiners=len(plan.assignments),
        )
        log.info(
            "session %s started: %d rounds, %d clients over %d combiners",
            self.session,
            rounds,
            sum(len(a.clients) for a in plan.assignments),
            len(plan.assignments),
        )

    def planned(self, plan: RoundPlan, now: float) -> None:
        """``plan`` goes out; the round's clock starts at its first plan."""
        self._clocks.setdefault(plan.round, _RoundClock(started=now))
        log.info(
            "round %d plan %d: %d clients over %d combiners",
            plan.round,
            plan.amendment,
            sum(len(a.clients) for a in plan.assignments),
            len(plan.assignments),
        )
        self.ctx.events.emit(
            "round-planned",
            round=plan.round,
            amendment=plan.amendment,
            term=plan.term,
            clients=sum(len(a.clients) for a in plan.assignments),
            combiners=len(plan.assignments),
        )

    def closed(self, round: int, partials: int, now: float) -> None:
        """The round's first reduce began, over ``partials`` partials."""
        clock = self._clocks.get(round)
        if clock is not None and clock.closed is None:
            clock.closed = now
            self.ctx.events.emit("round-closed", round=round, partials=partials)

    def combiner_lost(self, action: CombinerLost) -> None:
        log.warning(
            "round %d: combiner %s died; %d client(s) of it to re-plan",
            action.round,
            action.combiner,
            len(action.clients),
        )
        self.ctx.events.emit(
            "combiner-lost",
            round=action.round,
            combiner=action.combiner,
            orphans=len(action.clients),
        )

    def completed(self, result: RoundResult, now: float) -> None:
        """``result`` is out: its ``round-completed`` event, with the round's phase times."""
        metrics = result.metrics
        accuracy = metrics.get("eval_accuracy")
        if accuracy is not None:
            self._last_accuracy = accuracy
        clock = self._clocks.get(result.round, _RoundClock(started=now))
        closed = clock.closed if clock.closed is not None else now
        fetch_s, train_s = metrics.get("fetch_seconds"), metrics.get("train_seconds")
        push_s = None
        if fetch_s is not None and train_s is not None:
            push_s = max(0.0, closed - clock.started - fetch_s - train_s)
        log.info(
            "round %d: %d clients, %d examples, loss %s, accuracy %s",
            result.round,
            len(result.included),
            result.num_examples,
            metrics.get("eval_loss", metrics.get("loss")),
            accuracy,
        )
        self.ctx.events.emit(
            "round-completed",
            round=result.round,
            accuracy=accuracy,
            loss=metrics.get("eval_loss"),
            seconds=round(now - clock.started, 4),
            clients_included=len(result.included),
            num_examples=result.num_examples,
            fetch_s=_rounded(fetch_s),
            train_s=_rounded(train_s),
            push_s=_rounded(push_s),
            aggregate_s=round(now - closed, 4),
            bytes_sent=self.ctx.bytes_sent(),
        )

    def ended(self, action: SessionCompleted | SessionFailed) -> None:
        """The session is over: ``session-completed`` (with the last accuracy) or ``-failed``."""
        ended = action.ended
        if isinstance(action, SessionCompleted):
            log.info("session %s completed after %d rounds", self.session, ended.rounds)
            self.ctx.events.emit(
                "session-completed",
                rounds=ended.rounds,
                final_accuracy=self._last_accuracy,
                model=ended.model.hex(),
            )
        else:
            log.error("session %s failed: %s", self.session, action.reason)
            self.ctx.events.emit("session-failed", reason=action.reason)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


__all__ = ["SessionRecord"]
