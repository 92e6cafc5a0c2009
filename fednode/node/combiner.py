"""Node layer: the combiner's trio driver, which pumps a ``CombinerMachine`` round after round.

Plans, results and session ends come off the control topic (:meth:`Node.on_control`), verified
before the machine sees them. Clients push their sealed updates over ``/fednode/push/1.0.0``
(:func:`fednode.net.push.serve_push`): :meth:`CombinerMachine.admit` answers each offer before a
single blob byte flows (``have`` is an accept: the push server then finds the blob held and acks
without bytes). A stored blob is decoded and checked (the global model's tensors, finite values)
before :meth:`CombinerMachine.on_update_stored` counts it, so the running sum never meets an
update it cannot take; then the ack goes out.

The machine's actions run in the order it emits them, one at a time, so the running sum (a
:class:`~fednode.aggregation.StreamingMean`: O(model) memory whatever the number of clients)
always matches what the machine counted: ``Accumulate`` folds an update in as soon as it is
stored (decoded once: the blob checked at the push is reused), ``PushPartial`` turns the sum into
the partial's blob (the weighted mean, plus the contributions' weighted training metrics as
``#metric:`` scalars), seals the ``partial-aggregate`` and pushes both to the reducer over
``/fednode/partial/1.0.0``, retrying with backoff until the round's deadline. ``FetchModel``
fetches the parent model from the plan's holders so the combiner can serve it to its clients.
A plan newly followed is also handed straight to the assigned clients we are connected to
(``/fednode/control/1.0.0``): the reducer hands it to the combiners, the combiners to their
clients, and gossip covers whoever that misses.
Stored updates stay pinned until a plan of a later round, in case an amended plan needs the sum
rebuilt.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import trio

from fednode.aggregation import StreamingMean
from fednode.crypto import seal_bytes
from fednode.errors import (
    AggregationError,
    CryptoError,
    LocalProtocolError,
    TransferError,
    TransportError,
    WireError,
)
from fednode.net.push import PushResult, PushServer, push_partial, serve_push
from fednode.node.context import (
    Layout,
    Params,
    RoleContext,
    Unpinner,
    check_params,
    layout,
    load_model,
    put_model,
    run_blocking,
)
from fednode.node.pump import TimerPump
from fednode.protocol.combiner import (
    Accumulate,
    CombinerAction,
    CombinerMachine,
    DiscardAccumulator,
    FetchModel,
    PushPartial,
    ResetAccumulator,
    State,
    UpdateRejected,
    UpdateRejection,
)
from fednode.protocol.membership import PeerState
from fednode.protocol.rounds import PlanRejected, ResultRejected, local_time, peer_of, wall_ms
from fednode.wire import (
    Digest,
    Envelope,
    ModelUpdate,
    Nonce,
    PartialAggregate,
    PeerId,
    RoundPlan,
    RoundResult,
    SessionEnded,
    encode,
)

log = logging.getLogger(__name__)

#: Waits between attempts to fetch a model or push a partial: doubling from the first to the last.
BACKOFF = (0.25, 4.0)
#: How long a stored update waits for our fetch of its parent model, whose tensors it must have.
PARENT_WAIT = 10.0


class CombinerDriver:
    """Runs the combiner role until cancelled (or, with ``exit_after_session``, until a session
    ends). See the module docstring."""

    def __init__(self, ctx: RoleContext, *, exit_after_session: bool = False) -> None:
        self.ctx = ctx
        self.exit_after_session = exit_after_session
        node = ctx.node
        self.machine = CombinerMachine(
            peer=ctx.peer,
            capacity=node.config.capacity,
            federation=node.config.federation,
            wall_offset_ms=ctx.wall_offset_ms,
        )
        self.partials_pushed = 0
        self._send, self._actions = trio.open_memory_channel[CombinerAction](math.inf)
        self._timers = TimerPump(self.machine, self._queue)
        self._ended = trio.Event()
        self._sum: StreamingMean | None = None
        self._sum_round: int | None = None
        self._counted: set[Digest] = set()  # updates in the running sum
        self._decoded: dict[Digest, Params] = {}  # checked at the push, not yet summed
        self._layouts: dict[Digest, Layout] = {}  # of global models we hold
        self._latest: Layout | None = None  # of the last global model fetched
        self._ready: dict[Digest, trio.Event] = {}  # set once a global model's layout is known
        self._model_bytes = 0
        self._updates = Unpinner(ctx.store)
        self._models = Unpinner(ctx.store)
        self._followed = trio.Event()  # set, and replaced, whenever a plan is followed
        self.push_server: PushServer[ModelUpdate] | None = None
        self._fetching: trio.CancelScope | None = None
        self._pushing: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        ctx = self.ctx
        self.push_server = serve_push(ctx.host, ctx.store, self._admit, on_stored=self._stored)
        ctx.node.on_control(self._on_control)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._dispatch)
                nursery.start_soon(self._timers.run)
                await self._ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._updates.release_all()
            self._models.release_all()

    async def wait_for_plan(self, round: int = 1) -> RoundPlan:
        """Wait until we follow a plan of ``round`` or later; returns it."""
        while (plan := self.machine.plan) is None or plan.round < round:
            await self._followed.wait()
        return plan

    async def deliver_local(self, sealed: bytes) -> PushResult:
        """Take an update this node's own client pushes to it (an ``auto`` node elected
        combiner): the checks and counting of a pushed update, the blob already in our store.

        Raises:
            TransportError: we do not serve pushes yet (not running), or the stored update was
                rejected (as a remote push's ``rejected`` ack: the client retries).
        """
        if self.push_server is None:
            raise TransferError("the combiner is not running yet")
        try:
            return await self.push_server.deliver_local(sealed)
        except (WireError, CryptoError) as exc:  # our own seal: a bug, not a peer's fault
            raise LocalProtocolError(f"our own update does not open: {exc}") from exc

    def _queue(self, actions: Sequence[CombinerAction]) -> None:
        for action in actions:
            self._send.send_nowait(action)
        self._timers.changed()

    # --- inputs ---

    def _on_control(self, envelope: Envelope, source: PeerId) -> None:
        msg = self.ctx.open_round_message(envelope, source)
        now = trio.current_time()
        if isinstance(msg, RoundPlan):
            actions = self.machine.on_plan(msg, now)
            self._queue(actions)
            plan = self.machine.plan
            if plan is msg:  # newly followed (a copy delivered again is a duplicate)
                clients = msg.clients_of(self.ctx.peer)
                log.info(
                    "round %d plan %d: %d client(s) assigned to us",
                    msg.round,
                    msg.amendment,
                    len(clients),
                )
                self._forward(encode(envelope), clients)
                if clients:
                    self.ctx.events.emit(
                        "combiner-assigned",
                        round=msg.round,
                        amendment=msg.amendment,
                        clients=len(clients),
                    )
            if plan is not None:
                self.ctx.activity.session = plan.session
                self.ctx.activity.round = plan.round
                self.ctx.activity.attached = len(plan.clients_of(self.ctx.peer))
            self._followed.set()
            self._followed = trio.Event()
        elif isinstance(msg, SessionEnded):
            was_done = self.machine.state is State.DONE
            actions = self.machine.on_session_ended(msg, now)
            self._queue(actions)
            if self.machine.state is State.DONE and not was_done:
                log.info("session %s ended: %s", msg.session, msg.outcome)
                self.ctx.activity.attached = 0
                if self.exit_after_session:
                    self._ended.set()
        elif isinstance(msg, RoundResult):
            log.debug("round %d result seen", msg.round)

    def _forward(self, sealed: bytes, clients: Sequence[PeerId]) -> None:
        """Hand the plan straight to our clients we hold a connection to (they listen on
        nothing, so only those): gossip can reach a peer a heartbeat or more late, and each
        client's fetch, training and push wait on it. The others hear it by gossip."""
        connected = set(self.ctx.host.connected_peers())
        for client in clients:
            if client in connected and self._nursery is not None:
                self._nursery.start_soon(self._tell, client, sealed)

    async def _tell(self, peer: PeerId, sealed: bytes) -> None:
        try:
            await self.ctx.node.send_control(peer, sealed)
        except TransportError as exc:
            log.debug("could not hand the plan to %s: %s", peer, exc)

    def _admit(self, update: ModelUpdate, envelope: Envelope) -> str | None:
        reason = self.machine.admit(update, peer_of(envelope.signer), trio.current_time())
        if reason is None or reason is UpdateRejection.HAVE:
            return None  # the push server finds a held blob and answers "have"
        log.info("refused an update of round %d: %s", update.round, reason)
        return str(reason)

    async def _stored(self, update: ModelUpdate, envelope: Envelope) -> str | None:
        """Check the stored blob, then let the machine count it (before the ack)."""
        key = update.update
        if key in self._counted or key in self._decoded:  # "have": the push pinned it again
            self.ctx.store.unpin(key)
            return self._recount(update)
        try:
            params, _ = await load_model(self.ctx.store, key)
        except (KeyError, WireError) as exc:
            return f"malformed: {exc}"
        if update.parent not in self._layouts and self._latest is None:
            # Updates can outrun our own fetch of their parent: give it a moment. (Later rounds
            # check against the last global model: a session's models share their tensors.)
            with trio.move_on_after(PARENT_WAIT):
                await self._ready.setdefault(update.parent, trio.Event()).wait()
        expected = self._layouts.get(update.parent, self._latest)
        size = sum(a.nbytes for a in params.values())
        problem = await run_blocking(size, check_params, params, expected)
        if problem is not None:
            log.info("rejected an update from %s: %s", peer_of(update.signer), problem)
            return str(problem)
        self._layouts.setdefault(update.parent, layout(params))
        self._decoded[key] = params
        reason = self._recount(update)
        if reason is not None:
            self._decoded.pop(key, None)
        else:
            self._updates.keep(update.round, key)
        return reason

    def _recount(self, update: ModelUpdate) -> str | None:
        actions = self.machine.on_update_stored(update, trio.current_time())
        self._queue(actions)
        for action in actions:
            if isinstance(action, UpdateRejected):
                return str(action.reason)
        return None

    # --- actions ---

    async def _dispatch(self) -> None:
        async for action in self._actions:
            await self._execute(action)

    async def _execute(self, action: CombinerAction) -> None:
        nursery = self._nursery
        assert nursery is not None
        if isinstance(action, FetchModel):
            if self._fetching is not None:
                self._fetching.cancel()
            self._fetching = trio.CancelScope()
            nursery.start_soon(self._fetch_model, action, self._fetching)
        elif isinstance(action, ResetAccumulator):
            self._sum, self._sum_round = StreamingMean(), action.round
            self._counted.clear()
            self._updates.release_before(action.round)
        elif isinstance(action, Accumulate):
            await self._accumulate(action.update)
        elif isinstance(action, DiscardAccumulator):
            self._sum, self._sum_round = None, None
            self._counted.clear()
            self._decoded.clear()
        elif isinstance(action, PushPartial):
            await self._push_partial(action)
        elif isinstance(action, UpdateRejected):
            log.info("an update of round %d came too late: %s", action.round, action.reason)
        elif isinstance(action, PlanRejected | ResultRejected):
            log.debug("ignored: %s", action)

    async def _accumulate(self, update: ModelUpdate) -> None:
        key = update.update
        params = self._decoded.pop(key, None)
        if params is None:  # an amended plan rebuilds the sum from the stored updates
            params, _ = await load_model(self.ctx.store, key)
        assert self._sum is not None
        self._model_bytes = sum(a.nbytes for a in params.values())
        try:
            await run_blocking(
                self._model_bytes, self._sum.add, params, update.num_examples, update.signer
            )
        except AggregationError as exc:
            # Checked at the push against the parent's tensors; this takes a client that pushed
            # before we had the parent and a layout of its own making. It stays counted.
            log.error("could not add the update of %s: %s", peer_of(update.signer), exc)
        self._counted.add(key)

    async def _push_partial(self, action: PushPartial) -> None:
        total = self._sum
        assert total is not None and self._nursery is not None
        mean = await run_blocking(self._model_bytes, total.result)
        key, size = await put_model(self.ctx.store, mean, action.metrics, pin=True)
        self._updates.keep(action.round, key)
        partial = PartialAggregate(
            federation=action.federation,
            session=action.session,
            round=action.round,
            parent=action.parent,
            partial=key,
            size=size,
            contributions=action.contributions,
            total_weight=action.total_weight,
            combiner=self.ctx.node.key.public_key,
            created_ms=wall_ms(trio.current_time(), self.ctx.wall_offset_ms),
            nonce=Nonce(os.urandom(16)),
        )
        plan = self.machine.plan
        deadline = (
            math.inf if plan is None else local_time(plan.deadline_ms, self.ctx.wall_offset_ms)
        )
        if self._pushing is not None:
            self._pushing.cancel()  # an amended plan's partial replaces the last one
        self._pushing = trio.CancelScope(deadline=deadline)
        sealed = seal_bytes(self.ctx.node.key, partial)
        reducer = peer_of(action.reducer)
        self._nursery.start_soon(self._send_partial, reducer, partial, sealed, self._pushing)

    async def _send_partial(
        self, reducer: PeerId, partial: PartialAggregate, sealed: bytes, scope: trio.CancelScope
    ) -> None:
        wait = BACKOFF[0]
        with scope:
            while True:
                try:
                    await self.ctx.reach(reducer)
                    result = await push_partial(self.ctx.host, reducer, sealed, self.ctx.store)
                except TransportError as exc:
                    log.info("pushing the partial of round %d failed: %s", partial.round, exc)
                    await trio.sleep(wait)
                    wait = min(2 * wait, BACKOFF[1])
                    continue
                self.ctx.pushed_bytes += result.bytes_sent
                if result.accepted:
                    self.partials_pushed += 1
                    log.info(
                        "round %d: partial of %d update(s) pushed",
                        partial.round,
                        len(partial.contributions),
                    )
                    self.ctx.events.emit(
                        "partial-pushed",
                        round=partial.round,
                        contributions=len(partial.contributions),
                    )
                else:
                    log.warning(
                        "the reducer refused the partial of round %d: %s",
                        partial.round,
                        result.reason,
                    )
                return
        log.warning("the partial of round %d never reached the reducer", partial.round)

    def _holders(self, action: FetchModel) -> tuple[PeerId, ...]:
        """Whom to ask for a global model, on each attempt: the holders of the plan we follow
        now (a new reducer's plan for the same round names other holders than the one that
        died: the fetch must not keep asking the dead one), those alive in our view first,
        then our assigned clients we are connected to (a client fetches a small model straight
        from the reducer, so it may hold it when the reducer is gone)."""
        plan = self.machine.plan
        current = plan is not None and plan.parent == action.model
        named = list(plan.holders if plan is not None and current else action.holders)
        view = self.ctx.node.view

        def down(peer: PeerId) -> bool:
            member = view.member(peer)
            return member is not None and member.state is not PeerState.ALIVE

        named.sort(key=down)  # stable: the plan's order otherwise
        connected = set(self.ctx.host.connected_peers())
        clients = plan.clients_of(self.ctx.peer) if plan is not None and current else ()
        extra = [c for c in clients if c in connected and c != self.ctx.peer]
        return tuple(dict.fromkeys([*named, *extra]))

    async def _fetch_model(self, action: FetchModel, scope: trio.CancelScope) -> None:
        # Our clients ask us for the model first, often while we fetch it: their requests wait
        # for it rather than hearing "not found" and turning to the reducer.
        with self.ctx.blobs.expecting(action.model):
            await self._fetch_model_expected(action, scope)

    async def _fetch_model_expected(self, action: FetchModel, scope: trio.CancelScope) -> None:
        store, wait = self.ctx.store, BACKOFF[0]
        started = trio.current_time()
        with scope:
            while True:
                holders = self._holders(action)
                for holder in holders[:4]:
                    await self.ctx.reach(holder)
                try:
                    await self.ctx.fetch(
                        holders, action.model, max_size=action.size, expected_size=action.size
                    )
                    break
                except TransportError as exc:
                    log.info("fetching model %s failed: %s", action.model.hex()[:16], exc)
                    await trio.sleep(wait)
                    wait = min(2 * wait, BACKOFF[1])
            plan = self.machine.plan
            round_ = plan.round if plan is not None else 0
            self._models.release_before(round_)
            self._models.keep(round_, action.model)
            try:
                params, _ = await load_model(store, action.model)
            except (KeyError, WireError) as exc:
                log.warning("model %s is unusable: %s", action.model.hex()[:16], exc)
                return
            self._layouts = {action.model: layout(params)}
            self._latest = self._layouts[action.model]
            log.info("round %d: model fetched in %.2f s", round_, trio.current_time() - started)
            for ready in self._ready.values():  # waiters for older parents stop waiting too
                ready.set()
            self._ready.clear()


__all__ = ["CombinerDriver"]
