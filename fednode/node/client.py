"""Node layer: the client's trio driver, which pumps a ``ClientMachine`` round after round.

Plans, results and session ends come off the control topic, verified before the machine sees
them. The machine's actions:

- ``FetchModel``: fetch the round's global model from its holders, our combiner first, or for
  a small model (:data:`DIRECT_FETCH_SIZE`) last (:func:`fednode.net.blob.fetch_blob`; each
  chunk verified, the whole blob checked against its digest), pinned in the node's blob store;
- ``Train``: train it on this client's share of the data in the :class:`TaskRunner` (``process``
  mode in ``fednode start``: the task runs in a warm worker process, the trio loop never waits on
  it), store the trained model and have the machine sign the update. Its metrics are the task's
  plus ``train_seconds`` and ``fetch_seconds``, which the reducer reports per round;
- ``PushUpdate``: seal the update and push it, with its blob, to our combiner
  (:func:`fednode.net.push.push_update`). A refusal is final for the plan, except ``early`` (the
  combiner has no plan yet) and ``busy`` (too many pushes at once), which are retried like a
  broken push, with backoff, until the deadline;
- ``Cancel``: stop the fetch, training or push under way;
- ``ForgetUpdate``: unpin an update a round result settled (``update-included`` if it counted).

The client trains the session's task only if it is its own (``--task``): a plan naming another
makes the training fail for that round, with one log line saying so. Which share of the data it
holds is its own configuration (``--partition-index``, ``--partition-count``); the scheme,
Dirichlet ``alpha`` and seed come from the session.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fednode.crypto import seal_bytes
from fednode.errors import ConfigError, TransferError, TransportError
from fednode.net.push import PushResult, push_update
from fednode.node.context import RoleContext, Unpinner, load_model, put_model
from fednode.node.pump import TimerPump
from fednode.protocol.client import (
    Cancel,
    ClientAction,
    ClientMachine,
    FetchModel,
    ForgetUpdate,
    PushUpdate,
    State,
    Train,
)
from fednode.protocol.rounds import PlanRejected, ResultRejected
from fednode.task import Partition, TrainConfig
from fednode.task.api import is_path_spec
from fednode.task.runner import TaskRunner
from fednode.wire import Digest, Envelope, Nonce, PeerId, RoundPlan, RoundResult, SessionEnded

if TYPE_CHECKING:
    from fednode.node.combiner import CombinerDriver

log = logging.getLogger(__name__)

#: Refusals that mean "not now" rather than "not this update": retried like a broken push.
RETRY_REFUSALS = frozenset({"early", "busy"})
#: Waits before retrying a fetch or push: doubling from the first to the last. Kept short: the
#: usual cause is a combiner that has not heard the plan yet ("early"), and gossip soon tells it.
BACKOFF = (0.25, 2.0)
#: Heartbeat periods a session end may wait for round results it overtook on gossip.
END_GRACE = 4
#: A global model at most this large is fetched from the plan's holders first, our combiner
#: last: our combiner fetches it from them too, and going through it would put its transfer
#: (and its hearing of the plan) before ours. Larger models come from the combiner first, so
#: the reducer's upload is not shared by every client.
DIRECT_FETCH_SIZE = 1 << 20


def same_task(session_task: str, ours: str) -> bool:
    """Whether the session's task is the one this client trains: the same module name, or for a
    task file the same file name (its folder differs from machine to machine)."""
    if is_path_spec(session_task) or is_path_spec(ours):
        return Path(session_task.strip()).name == Path(ours.strip()).name
    return session_task.strip() == ours.strip()


class ClientDriver:
    """Runs the client role until cancelled (or, with ``exit_after_session``, until a session
    ends). See the module docstring.

    Args:
        ctx: the node's shared role equipment.
        runner: trains (started, and so warmed up, by :meth:`run`).
        partition_index, partition_count: which share of the task's data this client holds.
    """

    def __init__(
        self,
        ctx: RoleContext,
        runner: TaskRunner,
        *,
        partition_index: int = 0,
        partition_count: int = 1,
        exit_after_session: bool = False,
        local_combiner: CombinerDriver | None = None,
    ) -> None:
        if not 0 <= partition_index < partition_count:
            raise ConfigError("need 0 <= partition_index < partition_count")
        self.ctx = ctx
        self.runner = runner
        self.partition_index = partition_index
        self.partition_count = partition_count
        self.exit_after_session = exit_after_session
        self.local_combiner = local_combiner
        self.machine = ClientMachine(
            peer=ctx.peer,
            public_key=ctx.node.key.public_key,
            federation=ctx.node.config.federation,
            wall_offset_ms=ctx.wall_offset_ms,
            backoff=BACKOFF[0],
            max_backoff=BACKOFF[1],
        )
        self._send, self._actions = trio.open_memory_channel[ClientAction](math.inf)
        self._timers = TimerPump(self.machine, self._queue)
        self._ended = trio.Event()
        self._scopes: dict[str, trio.CancelScope] = {}  # "fetch" / "train" / "push"
        self._fetch_seconds: dict[Digest, float] = {}
        self._train_seconds: dict[Digest, float] = {}  # by update blob
        self._pushed_rounds: set[int] = set()
        self._models = Unpinner(ctx.store)
        self._warm = trio.Event()  # the runner has loaded the task
        self._results = trio.Event()  # set, and replaced, on each round result
        self._ending = False  # a session end waits for the results it overtook
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        self.ctx.node.on_control(self._on_control)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._warm_up)
                nursery.start_soon(self._dispatch)
                nursery.start_soon(self._timers.run)
                await self._ended.wait()
                self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self._models.release_all()

    async def _warm_up(self) -> None:
        try:
            # (trio-typing, which libp2p installs, shadows trio's stubs with an older signature.)
            await trio.to_thread.run_sync(  # type: ignore[call-arg]
                self.runner.start, abandon_on_cancel=True
            )
        except Exception as exc:  # the task's own failure: training will report it again
            log.error("the task %s did not start: %s", self.runner.spec, exc)
        finally:
            self._warm.set()

    def _drain(self) -> None:
        """Run the actions still queued (the last ``update-included`` among them)."""
        while True:
            try:
                action = self._actions.receive_nowait()
            except trio.WouldBlock:
                return
            self._execute(action)

    def _queue(self, actions: Sequence[ClientAction]) -> None:
        for action in actions:
            self._send.send_nowait(action)
        self._timers.changed()

    # --- inputs ---

    def _on_control(self, envelope: Envelope, source: PeerId) -> None:
        msg = self.ctx.open_round_message(envelope, source)
        now = trio.current_time()
        if isinstance(msg, RoundPlan):
            self._queue(self.machine.on_plan(msg, now))
            plan = self.machine.plan
            if plan is msg:
                log.info(
                    "round %d plan %d: our combiner is %s",
                    msg.round,
                    msg.amendment,
                    msg.combiner_of(self.ctx.peer),
                )
            if plan is not None:
                self.ctx.activity.session = plan.session
                self.ctx.activity.round = plan.round
        elif isinstance(msg, RoundResult):
            self._queue(self.machine.on_result(msg, now))
            self._results.set()
            self._results = trio.Event()
        elif isinstance(msg, SessionEnded):
            if self._unsettled(msg) and self._nursery is not None:
                if not self._ending:  # wait a little for the results it overtook
                    self._ending = True
                    self._nursery.start_soon(self._end_when_settled, msg)
                return
            self._end(msg)

    def _unsettled(self, ended: SessionEnded) -> bool:
        """Whether we keep an update of a round the session end says had a result."""
        return any(r <= ended.rounds for r in self.machine.statistics().kept)

    async def _end_when_settled(self, ended: SessionEnded) -> None:
        """Gossip may deliver a session end before the last round's result (or lose that
        result, which the reducer re-gossips while it lingers): hold the end back until every
        kept update of a finished round is settled, for a few heartbeats at most."""
        with trio.move_on_after(END_GRACE * self.ctx.node.config.heartbeat_interval):
            while self._unsettled(ended):
                await self._results.wait()
        self._end(ended)

    def _end(self, ended: SessionEnded) -> None:
        was_done = self.machine.state is State.DONE
        self._queue(self.machine.on_session_ended(ended, trio.current_time()))
        if self.machine.state is State.DONE and not was_done:
            log.info("session %s ended: %s", ended.session, ended.outcome)
            if self.exit_after_session:
                self._ended.set()

    # --- actions ---

    async def _dispatch(self) -> None:
        async for action in self._actions:
            self._execute(action)

    def _execute(self, action: ClientAction) -> None:
        if isinstance(action, FetchModel):
            self._start("fetch", self._fetch, action)
        elif isinstance(action, Train):
            self._start("train", self._train, action)
        elif isinstance(action, PushUpdate):
            self._start("push", self._push, action)
        elif isinstance(action, Cancel):
            scope = self._scopes.pop(action.what, None)
            if scope is not None:
                scope.cancel()
        elif isinstance(action, ForgetUpdate):
            update = action.update
            self.ctx.store.unpin(update.update)
            self._train_seconds.pop(update.update, None)
            if action.included:
                log.info("round %d: our update was included", update.round)
                self.ctx.events.emit("update-included", round=update.round)
            else:
                log.info("round %d: our update was left out", update.round)
        elif isinstance(action, PlanRejected | ResultRejected):
            log.debug("ignored: %s", action)

    def _start(
        self,
        what: str,
        work: Callable[[Any, trio.CancelScope], Awaitable[None]],
        action: ClientAction,
    ) -> None:
        """Run ``work(action, scope)`` in a scope of its own, replacing any ``what`` under way."""
        old = self._scopes.pop(what, None)
        if old is not None:
            old.cancel()
        scope = self._scopes[what] = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(work, action, scope)

    async def _fetch(self, action: FetchModel, scope: trio.CancelScope) -> None:
        with scope:
            started = trio.current_time()
            self.ctx.events.emit("fetch-started", round=action.round)
            holders = action.holders  # our combiner, then the plan's holders (the reducer)
            if self.ctx.peer in holders:  # we are our own combiner: it fetches into our store
                holders = tuple(h for h in holders if h != self.ctx.peer)  # (ctx.fetch: once)
            elif action.size <= DIRECT_FETCH_SIZE and len(holders) > 1:
                holders = (*holders[1:], holders[0])
            try:
                for holder in holders[:2]:
                    await self.ctx.reach(holder)
                await self.ctx.fetch(
                    holders, action.model, max_size=action.size, expected_size=action.size
                )
            except TransportError as exc:
                log.info("round %d: fetching the model failed: %s", action.round, exc)
                self._queue(self.machine.on_fetch_failed(action.model, trio.current_time()))
                return
            self._models.release_before(action.round)
            self._models.keep(action.round, action.model)
            self._fetch_seconds = {action.model: trio.current_time() - started}
            self.ctx.events.emit("model-fetched", round=action.round)
            log.info(
                "round %d: model fetched in %.2f s", action.round, self._fetch_seconds[action.model]
            )
            self._queue(self.machine.on_model_fetched(action.model, trio.current_time()))

    async def _train(self, job: Train, scope: trio.CancelScope) -> None:
        with scope:
            config = job.config
            if not same_task(config.task, self.runner.spec):
                log.error(
                    "round %d: the session trains %s, this client is set up for %s",
                    job.round,
                    config.task,
                    self.runner.spec,
                )
                self._queue(self.machine.on_train_failed(job, trio.current_time()))
                return
            train_config = TrainConfig(
                round=job.round,
                epochs=config.epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                seed=config.seed,
                proximal_mu=config.proximal_mu,
                partition=Partition(
                    index=self.partition_index,
                    count=self.partition_count,
                    scheme=config.partition,
                    alpha=config.alpha,
                    seed=config.seed,
                ),
            )
            try:
                params, _ = await load_model(self.ctx.store, job.parent)
                await self._warm.wait()  # train_seconds counts training, not loading the task
                started = trio.current_time()
                # The worker cannot be interrupted: a cancelled training finishes unheard.
                trained, num_examples, metrics = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                    self.runner.train, params, train_config, abandon_on_cancel=True
                )
                seconds = trio.current_time() - started
                key, size = await put_model(self.ctx.store, trained, pin=True)
            except Exception as exc:  # the task's own failure, or a parent we cannot read
                log.error("round %d: training failed: %s: %s", job.round, type(exc).__name__, exc)
                self._queue(self.machine.on_train_failed(job, trio.current_time()))
                return
            self._train_seconds[key] = seconds
            reported = {
                **metrics,
                "train_seconds": seconds,
                "fetch_seconds": self._fetch_seconds.get(job.parent, 0.0),
            }
            log.info("round %d: trained on %d examples in %.2f s", job.round, num_examples, seconds)
            self._queue(
                self.machine.on_trained(
                    job,
                    update=key,
                    size=size,
                    num_examples=num_examples,
                    metrics=reported,
                    nonce=Nonce(os.urandom(16)),
                    now=trio.current_time(),
                )
            )

    async def _push(self, action: PushUpdate, scope: trio.CancelScope) -> None:
        update = action.update
        with scope:
            sealed = seal_bytes(self.ctx.node.key, update)
            started = trio.current_time()
            try:
                if action.combiner == self.ctx.peer:  # an auto node elected combiner
                    result = await self._push_to_self(sealed)
                else:
                    await self.ctx.reach(action.combiner)
                    result = await push_update(
                        self.ctx.host, action.combiner, sealed, self.ctx.store
                    )
            except TransportError as exc:
                log.info("round %d: pushing the update failed: %s", update.round, exc)
                self._queue(self.machine.on_push_failed(update.update, trio.current_time()))
                return
            self.ctx.pushed_bytes += result.bytes_sent
            now = trio.current_time()
            if result.accepted:
                log.info(
                    "round %d: update %s in %.2f s",
                    update.round,
                    result.status,
                    now - started,
                )
                if update.round not in self._pushed_rounds:
                    self._pushed_rounds.add(update.round)
                    self.ctx.events.emit(
                        "update-pushed",
                        round=update.round,
                        num_examples=update.num_examples,
                        train_seconds=round(self._train_seconds.get(update.update, 0.0), 4),
                    )
                self._queue(self.machine.on_push_acked(update.update, now))
            elif result.reason in RETRY_REFUSALS:
                self._queue(self.machine.on_push_failed(update.update, now))
            else:
                log.warning(
                    "round %d: the combiner refused our update: %s", update.round, result.reason
                )
                self._queue(self.machine.on_push_refused(update.update, result.reason, now))

    async def _push_to_self(self, sealed: bytes) -> PushResult:
        """Hand our update to the combiner half of this node (no stream: a libp2p host does not
        dial itself); the same admission and counting as a pushed update."""
        if self.local_combiner is None:
            raise TransferError("the plan makes us a combiner, and this node runs none")
        return await self.local_combiner.deliver_local(sealed)


__all__ = ["DIRECT_FETCH_SIZE", "RETRY_REFUSALS", "ClientDriver", "same_task"]
