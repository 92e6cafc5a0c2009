"""Node layer: the reducer seat, the trio driver of a :class:`~fednode.protocol.leader.
LeaderMachine` that runs a :class:`~fednode.node.reducer.ReducerDriver` while this node leads.

Every reducer-eligible node runs one: the node started with ``--role reducer`` and a session
leads term 1 at once; a standby (``--role reducer --standby``, or ``auto``) follows the session's
signed checkpoints and takes over when the reducer's lease ends and the failure detector calls it
dead (the rules: ``protocols/rounds.md``, "Reducer election"). The seat

- feeds the machine the checkpoints gossiped on the control topic (verified; the sealed bytes of
  the newest are kept to re-gossip them as they are, :class:`Announce`), the terms of the plans,
  results and session ends it sees, the membership view (:func:`peers_seen`) and timer ticks;
- on :class:`TakeOver` starts a ``ReducerDriver`` at the machine's term, resuming from the
  checkpoint (its round, model and server-optimiser state, fetched from any holder) or, for the
  first term, the session's start; it publishes a checkpoint at once and after every round, and
  on :class:`Renew` (the lease);
- on :class:`StepDown` cancels the driver (it publishes nothing more); :class:`Suspend` and
  :class:`Resume` close and open its gate: it keeps collecting but closes no round without a
  majority.

A session ends for the seat when its driver ends it, or when it sees the session end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from fednode.crypto import seal_bytes
from fednode.crypto.envelope import domain_of
from fednode.errors import CryptoError, TransportError, WireError
from fednode.node.checkpoint import fetch_state_blob
from fednode.node.context import RoleContext
from fednode.node.pump import TimerPump
from fednode.protocol.leader import LeaderMachine
from fednode.protocol.leader_actions import (
    Announce,
    LeaderAction,
    Rejected,
    Renew,
    Resume,
    StepDown,
    Suspend,
    TakeOver,
    open_session_checkpoint,
    peers_seen,
    reducer_score,
)
from fednode.wire import (
    BlobRef,
    Digest,
    Envelope,
    PeerId,
    RoundPlan,
    RoundResult,
    SessionCheckpoint,
    SessionConfig,
    SessionEnded,
    encode,
)

if TYPE_CHECKING:
    from fednode.node.reducer import ReducerDriver
    from fednode.task.runner import TaskRunner

log = logging.getLogger(__name__)

CHECKPOINT_DOMAIN = domain_of(SessionCheckpoint)


class ReducerSeat:
    """Runs the reducer election on this node, and the reducer while it leads.

    Args:
        ctx: the node's role equipment.
        session: ``(name, config)`` to start the session as its first reducer, or None to stand
            by (follow the federation's first session seen and take over if elected).
        runner: evaluates global models for the reducer this node may become.
        wait_for, wait_for_combiners: as :class:`~fednode.node.reducer.ReducerDriver`.
        lease: the lease this node grants itself when it leads, seconds (default: five
            heartbeat periods, about the failure detector's time to call a peer dead).
        ignore: sessions to take no part in (those an ``auto`` node's earlier seats saw end).
    """

    def __init__(
        self,
        ctx: RoleContext,
        *,
        session: tuple[str, SessionConfig] | None = None,
        runner: TaskRunner | None = None,
        wait_for: int | None = None,
        wait_for_combiners: int = 1,
        lease: float | None = None,
        ignore: frozenset[str] = frozenset(),
    ) -> None:
        self.ctx = ctx
        self.ignore = ignore
        self.session = session
        self.runner = runner
        self.wait_for = wait_for
        self.wait_for_combiners = wait_for_combiners
        interval = ctx.node.config.heartbeat_interval
        self.lease = 5 * interval if lease is None else lease
        role = ctx.node.config.role
        self.machine = LeaderMachine(
            peer=ctx.peer,
            public_key=ctx.node.key.public_key,
            federation=ctx.node.config.federation,
            session=None if session is None else session[0],
            role=role if session is None or role == "auto" else "reducer",
            lease=self.lease,
            margin=interval,
            stagger=4 * interval,
            settle=interval,
            grace=10 * interval,
            detection=3 * interval,
            wall_offset_ms=ctx.wall_offset_ms,
        )
        self.ended: SessionEnded | None = None
        self.driver: ReducerDriver | None = None
        self.led = False  #: whether this seat ever took a term
        self._last_plan: RoundPlan | None = None  # the newest plan heard, of any term
        self._newest: bytes | None = None  # the sealed newest checkpoint, as received
        self._prefetched: list[Digest] = []  # blobs pinned for a takeover
        self._driver_scope: trio.CancelScope | None = None
        self._driver_done = trio.Event()
        self._timers = TimerPump(self.machine, self._queue)
        self._gate_changed = trio.Event()
        self._finished = trio.Event()
        self._send, self._actions = trio.open_memory_channel[LeaderAction](math.inf)
        self._nursery: trio.Nursery | None = None

    async def run(self) -> SessionEnded | None:
        """Run until the session ends (the outcome, if this node saw it)."""
        node = self.ctx.node
        node.on_control(self._on_control)
        node.on_membership(self._on_membership)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._dispatch)
                nursery.start_soon(self._timers.run)
                if self.runner is not None and self.session is None:
                    nursery.start_soon(self._warm_up, self.runner)
                now = trio.current_time()
                self._queue(self.machine.on_view(peers_seen(node.view), now, score=self._score()))
                if self.session is not None:
                    self._queue(self.machine.start(now))
                await self._finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            # The node keeps calling the handlers we registered (an auto node runs one seat per
            # session): they must take nothing more, nor start tasks in a closed nursery.
            self._nursery = None
        return self.ended

    async def _warm_up(self, runner: TaskRunner) -> None:
        """A standby loads its evaluation task now, not when it takes over."""
        try:
            await trio.to_thread.run_sync(runner.start, abandon_on_cancel=True)  # type: ignore[call-arg]
        except Exception as exc:  # the task's own failure: the reducer reports it again
            log.warning("the evaluation task did not start: %s", exc)

    # --- inputs ---

    def _queue(self, actions: Sequence[LeaderAction]) -> None:
        for action in actions:
            self._send.send_nowait(action)
        self._timers.changed()
        self._gate_changed.set()
        self._gate_changed = trio.Event()

    async def wait_closing(self) -> None:
        """Return once this node may close a round: it leads, past its probation after a
        takeover, its lease running, a majority of the members in sight."""
        poll = self.ctx.node.config.heartbeat_interval / 4
        while True:
            now = trio.current_time()
            at = self.machine.closing_from
            if now < at < math.inf:  # probation: fresh heartbeats from a majority end it early
                self._queue(self.machine.on_view(peers_seen(self.ctx.node.view), now))
                at = min(at, now + poll)
            if self.machine.closing_allowed(now):
                return
            changed = self._gate_changed
            with trio.move_on_at(at if at > now else math.inf):
                await changed.wait()

    def _on_control(self, envelope: Envelope, source: PeerId) -> None:
        if self._nursery is None:  # not running (see run)
            return
        now = trio.current_time()
        if envelope.domain == CHECKPOINT_DOMAIN:
            try:
                checkpoint = open_session_checkpoint(envelope)
            except (WireError, CryptoError) as exc:
                self.ctx.node.invalid_messages += 1
                log.info("dropped an invalid checkpoint from %s: %s", source, exc)
                return
            if checkpoint.session in self.ignore:
                return
            before = self.machine.checkpoint
            self._queue(self.machine.on_checkpoint(checkpoint, now))
            if self.machine.checkpoint is not before:
                self._newest = encode(envelope)  # the sealed bytes, exactly as signed
                if before is None or (before.term, before.round) != (
                    checkpoint.term,
                    checkpoint.round,
                ):
                    log.info(
                        "checkpoint: term %d, round %d done, %d members",
                        checkpoint.term,
                        checkpoint.round,
                        len(checkpoint.members),
                    )
                if self.machine.eligible and checkpoint.reducer != self.ctx.node.key.public_key:
                    self._prefetch(checkpoint)
            return
        msg = self.ctx.open_round_message(envelope, source)
        if msg is None or msg.session in self.ignore:
            return
        if isinstance(msg, RoundPlan | RoundResult):
            self._queue(self.machine.on_round_message(msg, now))
            newest = self._last_plan
            if isinstance(msg, RoundPlan) and (
                newest is None
                or (msg.term, msg.round, msg.amendment)
                > (newest.term, newest.round, newest.amendment)
            ):
                self._last_plan = msg  # a successor's first tree stays near it
        elif isinstance(msg, SessionEnded):
            self._queue(self.machine.on_session_ended(msg, now))
            if self.machine.session is None or msg.session == self.machine.session:
                self._session_over(msg)

    def _on_membership(self, events: Sequence[object]) -> None:
        if self._nursery is None:  # not running (see run)
            return
        view = peers_seen(self.ctx.node.view)
        self._queue(self.machine.on_view(view, trio.current_time(), score=self._score()))

    def _score(self) -> float | None:
        """Our standby rank score as our peers compute it, from our latest heartbeat: ranked by
        any other score (the machine's default 0), every standby would put all the others first
        and all would claim the same term at once."""
        heartbeat = self.ctx.node.last_heartbeat
        return None if heartbeat is None else reducer_score(heartbeat)

    # --- actions ---

    async def _dispatch(self) -> None:
        async for action in self._actions:
            await self._execute(action)

    async def _execute(self, action: LeaderAction) -> None:
        if isinstance(action, TakeOver):
            await self._take_over(action)
        elif isinstance(action, Renew):
            await self.publish_checkpoint()
        elif isinstance(action, StepDown):
            log.warning("term %d: stepping down (a newer term, or our lease lapsed)", action.term)
            self.ctx.events.emit("reducer-stepped-down", term=action.term)
            if self._driver_scope is not None:
                self._driver_scope.cancel()
            self.driver = None
        elif isinstance(action, Suspend):
            log.warning("term %d: no majority of members in sight: no round closes", action.term)
            self.ctx.events.emit("reducer-suspended", term=action.term)
        elif isinstance(action, Resume):
            log.info("term %d: a majority is back: rounds close again", action.term)
        elif isinstance(action, Announce):
            if self._newest is not None:
                await self.ctx.publish(self._newest)
        elif isinstance(action, Rejected):
            log.info("election: rejected term %d: %s", action.term, action.reason)

    async def _take_over(self, action: TakeOver) -> None:
        from fednode.node.reducer import ReducerDriver

        checkpoint = action.checkpoint
        if checkpoint is None:
            if self.session is None:
                log.error("elected for term %d with no session to start", action.term)
                return
            name, config = self.session
        else:
            name, config = checkpoint.session, checkpoint.config
        log.warning(
            "term %d: taking over as reducer of %s at round %d",
            action.term,
            name,
            1 if checkpoint is None else checkpoint.round + 1,
        )
        self.ctx.events.emit(
            "reducer-elected",
            term=action.term,
            session=name,
            resume_round=0 if checkpoint is None else checkpoint.round,
        )
        runner = self.runner
        if runner is None and config.eval_every > 0:
            from fednode.task.runner import TaskRunner

            runner = self.runner = TaskRunner(config.task, mode="process")
        driver = ReducerDriver(
            self.ctx,
            config,
            name,
            runner=runner,
            wait_for=self.wait_for if checkpoint is None else 1,
            wait_for_combiners=self.wait_for_combiners,
            term=action.term,
            resume=checkpoint,
            lease_ms=self.machine.lease_ms,
            on_checkpoint_due=self.publish_checkpoint,
            gate=self.wait_closing,
            previous=self._previous_plan(checkpoint),
        )
        self.driver = driver
        self.led = True
        if checkpoint is not None:
            await self.publish_checkpoint()  # our lease runs from now, before any fetch
        assert self._nursery is not None
        self._nursery.start_soon(self._run_driver, driver)

    def _previous_plan(self, checkpoint: SessionCheckpoint | None) -> RoundPlan | None:
        """The newest plan heard of the session we take over, for our first tree."""
        plan = self._last_plan
        if checkpoint is None or plan is None or plan.session != checkpoint.session:
            return None
        return plan

    async def _run_driver(self, driver: ReducerDriver) -> None:
        with trio.CancelScope() as scope:
            self._driver_scope = scope
            try:
                ended = await driver.run()
            except TransportError as exc:
                # The session's state could not be had: stop renewing, so that our lease lapses
                # and another standby (or we, later) takes over.
                log.error("could not resume the session: %s", exc)
                self.ctx.events.emit("reducer-resume-failed", reason=str(exc))
                if self.driver is driver:
                    self.driver = None
            else:
                self._session_over(ended)
        if self._driver_scope is scope:
            self._driver_scope = None

    def _prefetch(self, checkpoint: SessionCheckpoint) -> None:
        """Fetch the model (and optimiser state) a checkpoint names now, while its reducer is
        alive to serve it: a takeover must not depend on a dead reducer's store."""
        wanted = [BlobRef(digest=checkpoint.model, size=checkpoint.size)]
        if checkpoint.optimizer is not None:
            wanted.append(checkpoint.optimizer)
        if self._nursery is None or all(
            self.ctx.store.has(r.digest) or r.digest in self.ctx.fetches for r in wanted
        ):
            return
        for old in self._prefetched:
            self.ctx.store.unpin(old)
        self._prefetched = [r.digest for r in wanted]
        self._nursery.start_soon(self._fetch_state, checkpoint, wanted)

    async def _fetch_state(self, checkpoint: SessionCheckpoint, wanted: list[BlobRef]) -> None:
        for ref in wanted:
            try:
                await fetch_state_blob(self.ctx, ref, checkpoint.holders)
            except TransportError as exc:
                log.info("prefetching checkpoint blob %s: %s", ref.digest.hex()[:16], exc)

    async def publish_checkpoint(self) -> None:
        """Seal the leading driver's checkpoint, feed it back to the machine and gossip it."""
        driver = self.driver
        if driver is None:
            return
        now = trio.current_time()
        checkpoint = driver.checkpoint(now)
        if checkpoint is None:
            return
        sealed = seal_bytes(self.ctx.node.key, checkpoint)
        self._newest = sealed
        self._queue(self.machine.on_checkpoint(checkpoint, now))
        await self.ctx.publish(sealed)

    def _session_over(self, ended: SessionEnded) -> None:
        if self.ended is None:
            self.ended = ended
        self._finished.set()


__all__ = ["ReducerSeat"]
