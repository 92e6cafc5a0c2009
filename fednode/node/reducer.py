"""Node layer: the reducer's trio driver, which pumps a ``ReducerMachine`` through a session.

:meth:`ReducerDriver.run` runs one session from start to end:

1. It builds the initial global model from the task's numpy-only ``initial_params(seed)`` (the
   reducer never imports torch) and stores it, pinned, in the node's blob store, which every node
   serves.
2. It waits until the membership view holds ``wait_for`` live clients (default: ``min_clients``)
   and ``wait_for_combiners`` live combiners (default 1): alive or suspect (not dead) nodes
   whose heartbeats say role
   ``client`` (or ``auto``), and role ``combiner`` (or ``auto``) with a capacity. Whom each plan
   assigns where is the machine's business (least-loaded first); the driver feeds it the eligible
   peers, again on every membership change, and reports deaths. A later plan (the next round's,
   or a re-plan of a round that fell short) that would hold fewer than ``min_clients`` clients or
   no combiner first waits up to ``plan_wait`` for peers to come back: on a loaded machine the
   failure detector declares live peers dead when their heartbeats run late, and they recover
   as soon as one arrives.
3. It pumps the machine: plans are sealed and gossiped on the control topic (and gossiped again
   every ``republish`` seconds with the latest result, so a peer that missed one catches up),
   and sent straight to each assigned combiner, and to each assigned client we hold a connection
   to, over ``/fednode/control/1.0.0`` (gossip can reach a peer outside the reducer's mesh a
   gossip heartbeat late, and the combiner must follow the plan before its clients push); gossip
   goes out from a task of its own, in order, so a slow publish never holds the next plan back;
   combiners push their sealed partials and blobs over ``/fednode/partial/1.0.0``
   (:func:`fednode.net.push.serve_partials`), where :meth:`ReducerMachine.on_partial` decides
   before any blob byte flows; a partial whose push broke is fetched from its combiner over
   ``/fednode/blob/1.0.0``. ``Reduce`` decodes the partials (in a worker thread if big), averages
   them weighted by ``total_weight`` in a :class:`~fednode.aggregation.StreamingMean` and applies
   the session's server optimiser, whose state lives as long as the session; the new model is
   stored and pinned.
4. Evaluation runs in a :class:`~fednode.task.runner.TaskRunner` (``process`` mode in
   ``fednode start``: the task, and torch, load in a worker process, never in the reducer's),
   every ``eval_every`` rounds and after the last; its metrics join the result as ``eval_*``.
5. Each sealed ``round-result`` (and the final ``session-ended``) is gossiped and written to
   ``<data-dir>/sessions/<session>/`` (``round-0001.result``, ..., ``session.ended``).

Who the plans can use, and the waits for them, are in ``reducer_peers``; the results directory,
the session's events and their phase times in ``reducer_record``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from fednode.aggregation import StreamingMean
from fednode.crypto import seal_bytes
from fednode.errors import AggregationError, ConfigError, TransportError, WireError
from fednode.net.blob import fetch_blob
from fednode.net.push import PushServer, serve_partials
from fednode.node.checkpoint import (
    make_checkpoint,
    members_of,
    resume_from,
    store_optimizer_state,
)
from fednode.node.context import (
    Params,
    RoleContext,
    check_params,
    layout,
    load_model,
    put_model,
    run_blocking,
)
from fednode.node.reducer_peers import PlanningPeers
from fednode.node.reducer_record import SessionRecord
from fednode.node.session import server_optimizer
from fednode.protocol.membership import PeerDied
from fednode.protocol.reducer import (
    CombinerLost,
    Evaluate,
    FetchPartial,
    PartialRejected,
    PublishPlan,
    PublishResult,
    Reduce,
    ReducerAction,
    ReducerMachine,
    SessionCompleted,
    SessionFailed,
)
from fednode.protocol.rounds import peer_of
from fednode.task import EvalConfig, load_task
from fednode.task.runner import TaskRunner
from fednode.wire import (
    Digest,
    Envelope,
    PartialAggregate,
    PeerId,
    RoundPlan,
    SessionCheckpoint,
    SessionConfig,
    SessionEnded,
)

log = logging.getLogger(__name__)

#: How long a reduce waits for partial blobs still on their way before it goes without them.
BLOB_WAIT = 30.0


class ReducerDriver:
    """Runs one session as its reducer (see the module docstring).

    Args:
        ctx: the node's shared role equipment.
        config: the session's settings. session: its ID.
        runner: evaluates global models (needed when ``config.eval_every`` > 0).
        wait_for: live clients to wait for before the first plan (default ``min_clients``).
        wait_for_combiners: live combiners to wait for (default 1).
        term: our reducer term (:class:`~fednode.node.leader.ReducerSeat` hands it out).
        resume: the checkpoint to resume the session from (a takeover), or None to start it.
        lease_ms: the lease our checkpoints carry.
        on_checkpoint_due: awaited once the session runs and after each round: the seat
            publishes our checkpoint (:meth:`checkpoint`).
        gate: awaited before each round closes: returns once we may close one (we lead, with
            a majority in sight).
        republish: seconds between re-gossips of the plan in force (default: two heartbeats).
        linger: seconds to keep re-gossiping the session end before :meth:`run` returns.
        plan_wait: the longest a plan waits for enough live peers (default: the failure
            detector's time from a peer's last heartbeat to its death).
        previous: taking over, the predecessor's last plan heard: our first tree stays near it.
    """

    def __init__(
        self,
        ctx: RoleContext,
        config: SessionConfig,
        session: str,
        *,
        runner: TaskRunner | None = None,
        wait_for: int | None = None,
        wait_for_combiners: int = 1,
        term: int = 0,
        resume: SessionCheckpoint | None = None,
        lease_ms: int = 15_000,
        on_checkpoint_due: Callable[[], Awaitable[None]] | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
        republish: float | None = None,
        linger: float | None = None,
        plan_wait: float | None = None,
        previous: RoundPlan | None = None,
    ) -> None:
        if runner is None and config.eval_every > 0:
            raise ConfigError("a session that evaluates needs a task runner at the reducer")
        self.ctx = ctx
        self.config = config
        self.session = session
        self.runner = runner
        self.wait_for = config.min_clients if wait_for is None else wait_for
        self.wait_for_combiners = wait_for_combiners
        interval = ctx.node.config.heartbeat_interval
        self.republish = 2 * interval if republish is None else republish
        self.linger = 2 * interval if linger is None else linger
        self.peers = PlanningPeers(
            ctx, session, min_clients=config.min_clients, plan_wait=plan_wait
        )
        self.term = term
        self.resume = resume
        self.previous = previous
        self.lease_ms = lease_ms
        self.on_checkpoint_due = on_checkpoint_due
        self.gate = gate
        self._optimizer_ref = None if resume is None else resume.optimizer
        #: (round, model, size, holders) the session starts or resumes from
        self._start_point: tuple[int, Digest, int, tuple[PeerId, ...]] | None = (
            None if resume is None else (resume.round, resume.model, resume.size, resume.holders)
        )
        self.machine: ReducerMachine | None = None
        self.ended: SessionEnded | None = None
        self.record = SessionRecord(ctx, session)
        self._optimizer = server_optimizer(config)
        self._params: dict[Digest, Params] = {}  # the global model, and a new one being made
        self._send, self._actions = trio.open_memory_channel[ReducerAction](math.inf)
        # Gossip goes out in order from a task of its own: a publish can wait (libp2p's queues,
        # our pacing), and the next plan's direct sends must not wait behind it.
        self._gossip_send, self._gossip = trio.open_memory_channel[bytes](math.inf)
        self._changed = trio.Event()
        self._done = trio.Event()
        self._pushes: dict[Digest, trio.Event] = {}  # partial blobs being pushed to us
        self._fetched: dict[Digest, trio.Event] = {}  # partial blobs fetched (or given up)
        self._partial_pins: list[Digest] = []
        self._sealed_plan: bytes | None = None
        self._sealed_result: bytes | None = None
        self._ended_sealed: bytes | None = None
        self._nursery: trio.Nursery | None = None
        self.partial_server: PushServer[PartialAggregate] | None = None

    @property
    def plan_wait(self) -> float:
        """How long a plan waits for peers to come back (:meth:`wait_for_planning_peers`)."""
        return self.peers.plan_wait

    @property
    def results_dir(self) -> Path:
        """Where the session's sealed results are written."""
        return self.record.results_dir

    # --- running ---

    async def run(self) -> SessionEnded:
        """Run the session to its end; returns the signed outcome (completed or failed)."""
        ctx = self.ctx
        resume = self.resume
        params = None
        if resume is None or resume.round == 0:  # the initial model: made here, no fetch
            params = await trio.to_thread.run_sync(self._initial_params)
            if resume is not None and not await self._is(params, resume):
                params = None
        if params is None:
            assert resume is not None
            params = await resume_from(ctx, resume, self._optimizer)
        model, size = await put_model(ctx.store, params, pin=True)
        self._params[model] = params
        first_round = 1 if resume is None else resume.round + 1
        holders = () if resume is None else resume.holders
        self._start_point = (first_round - 1, model, size, (ctx.peer, *holders))
        if self.on_checkpoint_due is not None:
            await self.on_checkpoint_due()  # our lease, from the start
        self.partial_server = serve_partials(
            ctx.host,
            ctx.store,
            self._admit_partial,
            on_stored=self._partial_stored,
            on_abandoned=self._partial_abandoned,
        )
        ctx.node.on_membership(self._on_membership)
        ctx.activity.session = self.session
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.runner is not None and self.config.eval_every > 0:
                nursery.start_soon(self._warm_up, self.runner)
            await self.peers.wait_for(self.wait_for, self.wait_for_combiners)
            self.machine = ReducerMachine(
                config=self.config,
                peer=ctx.peer,
                public_key=ctx.node.key.public_key,
                federation=ctx.node.config.federation,
                session=self.session,
                initial_model=model,
                initial_size=size,
                term=self.term,
                holders=holders,
                first_round=first_round,
                wall_offset_ms=ctx.wall_offset_ms,
                previous=self.previous,
            )
            actions = self.machine.start(trio.current_time(), candidates=self.peers.candidates())
            plan = self.machine.plan
            assert plan is not None
            self.record.started(plan, self.config.rounds)
            self._queue(actions)
            nursery.start_soon(self._gossip_out)
            nursery.start_soon(self._dispatch)
            nursery.start_soon(self._run_timers)
            await self._done.wait()
            await self._linger()
            nursery.cancel_scope.cancel()
        assert self.ended is not None
        return self.ended

    def checkpoint(self, now: float) -> SessionCheckpoint | None:
        """Our checkpoint now (None before the session runs): what a successor resumes from."""
        machine = self.machine
        progress = self._start_point if machine is None else machine.progress
        if progress is None:
            return None
        plan = None if machine is None else machine.plan
        plan_peers = [] if plan is None else [p for a in plan.assignments for p in a.clients]
        return make_checkpoint(
            self.ctx,
            config=self.config,
            session=self.session,
            term=self.term,
            progress=progress,
            optimizer=self._optimizer_ref,
            members=members_of(self.ctx, plan_peers),
            lease_ms=self.lease_ms,
            now=now,
        )

    async def _is(self, params: Params, resume: SessionCheckpoint) -> bool:
        """Whether ``params`` are the model ``resume`` names (by digest)."""
        model, _ = await put_model(self.ctx.store, params, pin=False)
        return model == resume.model

    def _initial_params(self) -> Params:
        return load_task(self.config.task).initial_params(self.config.seed)

    async def _warm_up(self, runner: TaskRunner) -> None:
        try:
            # (trio-typing, which libp2p installs, shadows trio's stubs with an older signature.)
            await trio.to_thread.run_sync(  # type: ignore[call-arg]
                runner.start, abandon_on_cancel=True
            )
        except Exception as exc:  # the task's own failure: evaluations will report it again
            log.warning("the evaluation task did not start: %s", exc)

    def short_of_peers(self) -> bool:
        """Whether a plan made now could only fall short (:meth:`PlanningPeers.too_few`)."""
        return self.peers.too_few()

    async def wait_for_planning_peers(self) -> None:
        """Before the machine plans, wait up to :attr:`plan_wait` while :meth:`short_of_peers`
        (:meth:`PlanningPeers.wait_for_enough`)."""
        await self.peers.wait_for_enough()

    def _on_membership(self, events: Sequence[object]) -> None:
        self.peers.changed()
        machine = self.machine
        if machine is None:
            return
        now = trio.current_time()
        self._queue(machine.on_candidates(self.peers.candidates(), now))  # may move orphans
        for event in events:
            if isinstance(event, PeerDied):
                self._queue(machine.on_peer_dead(event.peer, now))

    def _queue(self, actions: Sequence[ReducerAction]) -> None:
        for action in actions:
            self._send.send_nowait(action)
        self._changed.set()

    async def _run_timers(self) -> None:
        machine = self.machine
        assert machine is not None
        next_republish = trio.current_time() + self.republish
        while True:
            now = trio.current_time()
            deadline = machine.next_deadline()
            if (
                deadline is not None
                and now >= deadline
                and machine.statistics().covered < self.config.min_clients
            ):
                await self.wait_for_planning_peers()  # the attempt fell short: a re-plan follows
                now = trio.current_time()
            self._queue(machine.on_timer(now))
            if now >= next_republish:
                next_republish = now + self.republish
                await self._republish()
            deadline = machine.next_deadline()
            self._changed = trio.Event()
            with trio.move_on_at(min(next_republish, deadline or math.inf)):
                await self._changed.wait()

    async def _republish(self) -> None:
        """Gossip the latest result and the plan in force again, for peers that missed them."""
        machine = self.machine
        if machine is None or machine.next_deadline() is None:
            return
        machine.on_candidates(self.peers.candidates())  # loads change without membership events
        for sealed in (self._sealed_result, self._sealed_plan):
            if sealed is not None:
                await self.ctx.publish(sealed)

    async def _gossip_out(self) -> None:
        async for sealed in self._gossip:
            await self.ctx.publish(sealed)

    async def _linger(self) -> None:
        """Gossip the last result and the session end a few more times, then let go."""
        sealed = [s for s in (self._sealed_result, self._ended_sealed) if s is not None]
        repeats = 3
        for _ in range(repeats):
            await trio.sleep(self.linger / repeats)  # a pace for gossip, not a wait for an event
            for message in sealed:
                await self.ctx.publish(message)

    # --- partials pushed to us ---

    def _admit_partial(self, partial: PartialAggregate, envelope: Envelope) -> str | None:
        machine = self.machine
        if machine is None:
            return "wrong-round"
        actions = machine.on_partial(partial, trio.current_time())
        for action in actions:
            if isinstance(action, PartialRejected):
                log.info(
                    "refused a partial of round %d from %s: %s",
                    partial.round,
                    peer_of(partial.combiner),
                    action.reason,
                )
                return str(action.reason)
        self._pushes.setdefault(partial.partial, trio.Event())
        self._queue(actions)
        return None

    async def _partial_stored(self, partial: PartialAggregate, envelope: Envelope) -> str | None:
        self._partial_pins.append(partial.partial)
        self._pushes.setdefault(partial.partial, trio.Event()).set()
        return None

    def _partial_abandoned(self, partial: PartialAggregate, reason: str) -> None:
        log.info("the push of a partial from %s broke: %s", peer_of(partial.combiner), reason)
        self._pushes.setdefault(partial.partial, trio.Event()).set()

    # --- actions ---

    async def _dispatch(self) -> None:
        async for action in self._actions:
            await self._execute(action)

    async def _execute(self, action: ReducerAction) -> None:
        nursery = self._nursery
        assert nursery is not None
        now = trio.current_time()
        key = self.ctx.node.key
        if isinstance(action, PublishPlan):
            plan = action.plan
            self._sealed_plan = seal_bytes(key, plan)
            self.ctx.activity.round = plan.round
            self.record.planned(plan, now)
            self._deliver(plan, self._sealed_plan)
            self._gossip_send.send_nowait(self._sealed_plan)
        elif isinstance(action, FetchPartial):
            self._fetched[action.partial] = trio.Event()
            nursery.start_soon(self._fetch_partial, action)
        elif isinstance(action, Reduce):
            self.record.closed(action.round, len(action.partials), now)
            nursery.start_soon(self._reduce, action)
        elif isinstance(action, Evaluate):
            nursery.start_soon(self._evaluate, action)
        elif isinstance(action, PublishResult):
            await self._publish_result(action, now)
        elif isinstance(action, CombinerLost):
            self.record.combiner_lost(action)
        elif isinstance(action, SessionCompleted | SessionFailed):
            await self._end(action)
        elif isinstance(action, PartialRejected):  # pragma: no cover - returned by admit
            log.info("partial rejected: %s", action.reason)

    def _deliver(self, plan: RoundPlan, sealed: bytes) -> None:
        """Send a plan straight to its combiners (dialling them if need be) and to the clients
        we hold a connection to, besides gossip: gossip can reach a peer outside our mesh a
        gossip heartbeat late, and a client's fetch, training and push, and its combiner's
        acceptance of that push, all wait on the plan. (Combiners forward it to their clients
        too; a second copy is dropped as a duplicate.)"""
        nursery = self._nursery
        assert nursery is not None
        connected = set(self.ctx.host.connected_peers())
        for assignment in plan.assignments:
            nursery.start_soon(self._tell, assignment.combiner, sealed, True)
        for assignment in plan.assignments:
            for client in assignment.clients:
                if client in connected:
                    nursery.start_soon(self._tell, client, sealed, False)

    async def _tell(self, peer: PeerId, sealed: bytes, dial: bool) -> None:
        try:
            if dial:
                await self.ctx.reach(peer)
            await self.ctx.node.send_control(peer, sealed)
        except TransportError as exc:
            log.info("could not send the plan to %s directly (gossip carries it): %s", peer, exc)

    async def _fetch_partial(self, action: FetchPartial) -> None:
        """Have the partial's blob: from its push under way, else from its combiner."""
        store = self.ctx.store
        try:
            pushing = self._pushes.get(action.partial)
            if pushing is not None:
                with trio.move_on_after(BLOB_WAIT):
                    await pushing.wait()
            if not store.has(action.partial):
                await self.ctx.reach(action.peer)
                await fetch_blob(
                    self.ctx.host,
                    [action.peer],
                    action.partial,
                    store,
                    max_size=action.size,
                    expected_size=action.size,
                    pin=True,
                )
                self._partial_pins.append(action.partial)
        except TransportError as exc:
            log.warning("partial %s from %s: %s", action.partial.hex()[:16], action.peer, exc)
        finally:
            self._fetched.setdefault(action.partial, trio.Event()).set()

    async def _reduce(self, action: Reduce) -> None:
        machine = self.machine
        assert machine is not None
        with trio.move_on_after(BLOB_WAIT):
            for partial in action.partials:
                await self._fetched.setdefault(partial.partial, trio.Event()).wait()
        if self.gate is not None:
            await self.gate()  # no round closes without the lease and a majority
        parent = self._params[action.parent]
        decoded: list[tuple[PartialAggregate, Params, dict[str, float]]] = []
        missing: list[Digest] = []
        for partial in action.partials:
            try:
                params, metrics = await load_model(self.ctx.store, partial.partial)
            except (KeyError, WireError) as exc:
                log.warning("partial %s is unusable: %r", partial.partial.hex()[:16], exc)
                missing.append(partial.partial)
                continue
            problem = check_params(params, layout(parent))
            if problem is not None:
                log.warning("partial from %s: %s", peer_of(partial.combiner), problem)
                missing.append(partial.partial)
                continue
            decoded.append((partial, params, metrics))
        if missing:
            self._queue(machine.on_partials_missing(missing, trio.current_time()))
            return
        size = sum(a.nbytes for a in parent.values()) * max(1, len(decoded))
        new, metrics = await run_blocking(size, self._reduce_sync, decoded, parent)
        model, model_size = await put_model(self.ctx.store, new, pin=True)
        self._params[model] = new
        if self.config.server_optimizer != "fedavg":
            old = self._optimizer_ref
            self._optimizer_ref = await store_optimizer_state(self.ctx, self._optimizer)
            if old is not None and old != self._optimizer_ref:
                self.ctx.store.unpin(old.digest)
        if action.round < self.config.rounds:
            await self.wait_for_planning_peers()  # the next plan may follow at once
        self._queue(machine.on_reduced(model, model_size, metrics, trio.current_time()))

    def _reduce_sync(
        self, decoded: list[tuple[PartialAggregate, Params, dict[str, float]]], parent: Params
    ) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, float]]:
        """FedAvg of the partials weighted by their total weight, then the server optimiser."""
        mean = StreamingMean()
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        for partial, params, metrics in decoded:
            mean.add(params, partial.total_weight, key=partial.combiner)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value * partial.total_weight
                weights[name] = weights.get(name, 0) + partial.total_weight
        try:
            new = self._optimizer.step(parent, mean.result())
        except AggregationError:
            log.exception("the server optimiser failed")
            raise
        return new, {name: sums[name] / weights[name] for name in sorted(sums)}

    async def _evaluate(self, action: Evaluate) -> None:
        machine = self.machine
        assert machine is not None and self.runner is not None
        params = self._params[action.model]
        try:
            metrics = await trio.to_thread.run_sync(
                self.runner.evaluate, dict(params), EvalConfig(round=action.round)
            )
        except Exception as exc:  # the task's own failure: the round goes on without it
            log.warning("evaluating round %d failed: %s", action.round, exc)
            metrics = {}
        named = {f"eval_{k}": float(v) for k, v in metrics.items()}
        if action.round < self.config.rounds:
            await self.wait_for_planning_peers()
        self._queue(machine.on_evaluated(named, trio.current_time()))

    async def _publish_result(self, action: PublishResult, now: float) -> None:
        result = action.result
        sealed = seal_bytes(self.ctx.node.key, result)
        self._sealed_result = sealed
        self.record.save(f"round-{result.round:04d}.result", sealed)
        for digest in [d for d in self._params if d != result.model]:
            del self._params[digest]
        self.ctx.store.unpin(result.parent)
        for digest in self._partial_pins:
            self.ctx.store.unpin(digest)
        self._partial_pins.clear()
        self._gossip_send.send_nowait(sealed)
        if self.on_checkpoint_due is not None:
            await self.on_checkpoint_due()
        self.record.completed(result, now)

    async def _end(self, action: SessionCompleted | SessionFailed) -> None:
        ended = action.ended
        self.ended = ended
        self._ended_sealed = seal_bytes(self.ctx.node.key, ended)
        self.record.save("session.ended", self._ended_sealed)
        self._gossip_send.send_nowait(self._ended_sealed)
        self.ctx.activity.round = -1
        self.record.ended(action)
        self._done.set()


__all__ = ["BLOB_WAIT", "ReducerDriver"]
