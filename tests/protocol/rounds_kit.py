"""Shared pieces of the round-protocol tests: keys, a session config, messages, and a tiny
in-test network that carries the three machines' actions between them by hand (a message is lost
by not delivering it). Time is whatever the test says ``now`` is."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fednode.crypto import NodeKey, contributions_digest, digest, open_envelope, seal_bytes
from fednode.protocol import client as cl
from fednode.protocol import combiner as co
from fednode.protocol import reducer as re_
from fednode.protocol.rounds import (
    CombinerLoad,
    open_round_plan,
    open_round_result,
    open_session_ended,
    peer_of,
)
from fednode.wire import (
    Assignment,
    Contribution,
    Digest,
    FederationId,
    ModelUpdate,
    Nonce,
    PartialAggregate,
    PartialRef,
    PeerId,
    RoundPlan,
    RoundResult,
    SessionConfig,
    SessionEnded,
    SessionId,
)

FED = FederationId("demo")
SESSION = SessionId("s1")
REDUCER_KEY = NodeKey(b"\x01" * 32)
# Two combiners and four clients, ordered by peer ID so tests can name "the first client".
COMBINER_KEYS = sorted((NodeKey(bytes([0x10 + i]) * 32) for i in range(2)), key=lambda k: k.peer_id)
CLIENT_KEYS = sorted((NodeKey(bytes([0x20 + i]) * 32) for i in range(4)), key=lambda k: k.peer_id)
OUTSIDER_KEY = NodeKey(b"\x7f" * 32)
SUCCESSOR_KEY = NodeKey(b"\x02" * 32)  # a reducer that takes a session over
REDUCER, SUCCESSOR = REDUCER_KEY.peer_id, SUCCESSOR_KEY.peer_id
C1, C2 = (k.peer_id for k in COMBINER_KEYS)
K1, K2, K3, K4 = (k.peer_id for k in CLIENT_KEYS)
KEY_OF = {
    k.peer_id: k for k in [REDUCER_KEY, SUCCESSOR_KEY, *COMBINER_KEYS, *CLIENT_KEYS, OUTSIDER_KEY]
}
D0 = digest(b"initial model")
DEADLINE_S = 60.0
#: How long the in-test push driver waits for an ack before it reports the push failed.
PUSH_TIMEOUT = 1.0


def config(**changes: Any) -> SessionConfig:
    fields: dict[str, Any] = {
        "rounds": 3,
        "min_clients": 2,
        "max_retries": 1,
        "round_deadline_ms": int(DEADLINE_S * 1000),
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "aggregator": "fedavg",
        "server_optimizer": "fedavg",
        "server_lr": 1.0,
        "server_momentum": 0.0,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
        "eval_every": 0,
        "seed": 7,
        "task": "fednode.task.digits",
        "partition": "iid",
        "alpha": 0.5,
        "proximal_mu": 0.0,
    }
    fields.update(changes)
    return SessionConfig(**fields)


def loads(capacity: int = 2, *peers: PeerId) -> list[CombinerLoad]:
    return [CombinerLoad(peer=p, capacity=capacity) for p in (peers or (C1, C2))]


def reducer(cfg: SessionConfig | None = None, **kwargs: Any) -> re_.ReducerMachine:
    return re_.ReducerMachine(
        config=cfg or config(),
        peer=REDUCER,
        public_key=REDUCER_KEY.public_key,
        federation=FED,
        session=SESSION,
        initial_model=D0,
        initial_size=100,
        **kwargs,
    )


def plan(
    *,
    round: int = 1,
    amendment: int = 0,
    term: int = 0,
    parent: Digest = D0,
    assignments: dict[PeerId, Iterable[PeerId]] | None = None,
    created_ms: int = 0,
    cfg: SessionConfig | None = None,
    key: NodeKey = REDUCER_KEY,
    **changes: Any,
) -> RoundPlan:
    """A plan by hand (default: C1 takes K1, K2; C2 takes K3, K4)."""
    cfg = cfg or config()
    table = assignments if assignments is not None else {C1: (K1, K2), C2: (K3, K4)}
    fields: dict[str, Any] = {
        "federation": FED,
        "session": SESSION,
        "term": term,
        "round": round,
        "amendment": amendment,
        "parent": parent,
        "parent_size": 100,
        "holders": (REDUCER,),
        "assignments": tuple(
            Assignment(combiner=c, clients=tuple(sorted(ks))) for c, ks in sorted(table.items())
        ),
        "min_clients": cfg.min_clients,
        "deadline_ms": created_ms + cfg.round_deadline_ms,
        "config": cfg,
        "reducer": key.public_key,
        "created_ms": created_ms,
    }
    fields.update(changes)
    return RoundPlan(**fields)


def update(
    client: PeerId = K1,
    *,
    round: int = 1,
    parent: Digest = D0,
    blob: bytes | None = None,
    num_examples: int = 10,
    **changes: Any,
) -> ModelUpdate:
    fields: dict[str, Any] = {
        "federation": FED,
        "session": SESSION,
        "round": round,
        "parent": parent,
        "update": digest(blob if blob is not None else f"{client}/{round}".encode()),
        "size": 50,
        "num_examples": num_examples,
        "metrics": {"loss": 1.0},
        "signer": KEY_OF[client].public_key,
        "created_ms": 1000,
        "nonce": Nonce(bytes(16)),
    }
    fields.update(changes)
    return ModelUpdate(**fields)


def partial(
    combiner: PeerId = C1,
    clients: Iterable[PeerId] = (K1, K2),
    *,
    round: int = 1,
    parent: Digest = D0,
    weight: int = 10,
    **changes: Any,
) -> PartialAggregate:
    contributions = sorted(
        (
            Contribution(
                signer=KEY_OF[c].public_key, update=update(c, round=round).update, weight=weight
            )
            for c in clients
        ),
        key=lambda c: c.signer,
    )
    fields: dict[str, Any] = {
        "federation": FED,
        "session": SESSION,
        "round": round,
        "parent": parent,
        "partial": digest(f"partial/{combiner}/{round}/{len(contributions)}".encode()),
        "size": 50,
        "contributions": tuple(contributions),
        "total_weight": weight * len(contributions),
        "combiner": KEY_OF[combiner].public_key,
        "created_ms": 1000,
        "nonce": Nonce(bytes(16)),
    }
    fields.update(changes)
    return PartialAggregate(**fields)


def result(
    round: int = 1,
    included: Iterable[ModelUpdate] = (),
    *,
    parent: Digest = D0,
    term: int = 0,
    key: NodeKey = REDUCER_KEY,
    **changes: Any,
) -> RoundResult:
    """A round result counting ``included`` (default: one update of K2's), as one partial."""
    updates = list(included) or [update(K2, round=round, parent=parent)]
    contributions = tuple(
        sorted(
            (
                Contribution(signer=u.signer, update=u.update, weight=u.num_examples)
                for u in updates
            ),
            key=lambda c: c.signer,
        )
    )
    total = sum(c.weight for c in contributions)
    fields: dict[str, Any] = {
        "federation": FED,
        "session": SESSION,
        "term": term,
        "round": round,
        "amendment": 0,
        "parent": parent,
        "model": digest(f"model/{round}".encode()),
        "size": 100,
        "partials": (
            PartialRef(
                combiner=COMBINER_KEYS[0].public_key,
                partial=digest(b"partial"),
                total_weight=total,
                contributions=contributions_digest(contributions),
            ),
        ),
        "included": contributions,
        "num_examples": total,
        "metrics": {"loss": 0.5},
        "reducer": key.public_key,
        "created_ms": 2000,
    }
    fields.update(changes)
    return RoundResult(**fields)


def ended(outcome: str = "completed", *, term: int = 0, key: NodeKey = REDUCER_KEY) -> SessionEnded:
    return SessionEnded(
        federation=FED,
        session=SESSION,
        term=term,
        outcome="completed" if outcome == "completed" else "failed",
        rounds=1,
        model=D0,
        reason="" if outcome == "completed" else "fell short",
        reducer=key.public_key,
        created_ms=3000,
    )


def kinds(actions: Iterable[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


# ------------------------------------------------------------------------------ the network


def blob_of(array: np.ndarray[Any, Any]) -> tuple[Digest, bytes]:
    data = array.astype("<f8").tobytes()
    return digest(data), data


Hook = Callable[[PeerId, object], None]


class Network:
    """Reducers, combiners and clients, wired by hand.

    Control messages are sealed and opened for real (so every delivery checks signatures); blobs
    live in one dict, served by whichever listed holder is alive. A message travels as a queued
    delivery; ``drop`` decides, per ``(kind, sender, receiver)``, whether it is lost, and nothing
    reaches or leaves a dead peer (a push to one is reported failed after :data:`PUSH_TIMEOUT`).
    ``examples`` gives each client's weight; client ``k`` trains to ``parent + 1 + index`` so
    tests can check the arithmetic. Fetches take ``fetch_s`` and trainings ``train_s`` seconds of
    the hand-stepped clock (0: at once). ``hook(who, action)`` sees every action before it is
    carried out: a test kills peers there, at the phase it wants (:meth:`kill`); a peer killed
    by its own action does not carry it out.
    """

    def __init__(
        self,
        cfg: SessionConfig,
        *,
        combiners: dict[PeerId, int] | None = None,
        clients: Iterable[PeerId] = (K1, K2, K3, K4),
        examples: dict[PeerId, int] | None = None,
        drop: Callable[[str, PeerId, PeerId], bool] = lambda kind, src, dst: False,
        fetch_s: float = 0.0,
        train_s: float = 0.0,
        hook: Hook | None = None,
    ) -> None:
        self.cfg = cfg
        self.drop = drop
        self.fetch_s, self.train_s = fetch_s, train_s
        self.hook = hook
        self.now = 0.0
        initial = np.zeros(3)
        d0, _ = blob_of(initial)
        self.blobs: dict[Digest, np.ndarray[Any, Any]] = {d0: initial}
        self.initial = d0
        self.reducers: dict[PeerId, re_.ReducerMachine] = {}
        self.reducer = self._add_reducer(REDUCER_KEY, term=0, first_round=1, model=d0)
        caps = combiners if combiners is not None else {C1: 2, C2: 2}
        self.combiners = {
            p: co.CombinerMachine(peer=p, capacity=cap, federation=FED) for p, cap in caps.items()
        }
        self.clients = {
            p: cl.ClientMachine(peer=p, public_key=KEY_OF[p].public_key, federation=FED)
            for p in clients
        }
        self.examples = examples or {p: 10 * (i + 1) for i, p in enumerate(sorted(self.clients))}
        self.dead: set[PeerId] = set()
        self.sums: dict[PeerId, tuple[np.ndarray[Any, Any], int]] = {}
        self.queue: deque[Callable[[], None]] = deque()
        self.later: list[tuple[float, int, Callable[[], None]]] = []  # driver timeouts
        self._order = itertools.count()
        self.log: list[tuple[str, object]] = []  # (who, action) for every action taken
        self.ended: list[object] = []
        self.results: list[Any] = []
        self.trained: dict[PeerId, int] = {}  # how many times each client trained

    # --- driving ---

    def start(self) -> None:
        self._start(REDUCER)

    def take_over(self, key: NodeKey, *, term: int, first_round: int, model: Digest) -> None:
        """A reducer of ``term`` resumes the session at ``first_round`` from ``model``."""
        self.reducer = self._add_reducer(key, term=term, first_round=first_round, model=model)
        self._start(key.peer_id)

    def kill(self, peer: PeerId, *, detect_after: float | None = 1.0) -> None:
        """``peer`` stops. Unless ``detect_after`` is None, the live reducers' failure detectors
        report it that many seconds later."""
        self.dead.add(peer)
        if detect_after is not None:
            self._after(detect_after, lambda: self._detected(peer))

    def revive(self, peer: PeerId) -> None:
        """A killed reducer comes back, with the state it had."""
        self.dead.discard(peer)

    def pump(self) -> None:
        while self.queue:
            self.queue.popleft()()

    def advance(self, to: float) -> None:
        """Move the clock to ``to``, firing the machines' timers in deadline order on the way."""
        for _ in range(10_000):
            due = [d for _, d in self._deadlines() if d is not None and d <= to]
            if not due:
                break
            self.now = max(self.now, min(due))
            self._fire_timers()
            self.pump()
        else:
            raise AssertionError("timers keep firing: a machine asks for a deadline it ignores")
        self.now = to
        self._fire_timers()
        self.pump()

    def _start(self, peer: PeerId) -> None:
        live = [p for p in self.clients if p not in self.dead]
        loads_ = [
            CombinerLoad(peer=p, capacity=m.capacity)
            for p, m in self.combiners.items()
            if p not in self.dead
        ]
        self._reducer_actions(peer, self.reducers[peer].start(self.now, live, loads_))
        self.pump()

    def _add_reducer(
        self, key: NodeKey, *, term: int, first_round: int, model: Digest
    ) -> re_.ReducerMachine:
        machine = re_.ReducerMachine(
            config=self.cfg,
            peer=key.peer_id,
            public_key=key.public_key,
            federation=FED,
            session=SESSION,
            initial_model=model,
            initial_size=len(blob_of(self.blobs[model])[1]),
            term=term,
            first_round=first_round,
        )
        self.reducers[key.peer_id] = machine
        return machine

    def _detected(self, peer: PeerId) -> None:
        for p, machine in self.reducers.items():
            if p not in self.dead:
                self._reducer_actions(p, machine.on_peer_dead(peer, self.now))

    def _live(self, machines: dict[PeerId, Any]) -> list[tuple[PeerId, Any]]:
        return [(p, m) for p, m in machines.items() if p not in self.dead]

    def _deadlines(self) -> list[tuple[str, float | None]]:
        found: list[tuple[str, float | None]] = [("driver", self.later[0][0])] if self.later else []
        for machines in (self.reducers, self.combiners, self.clients):
            found += [(p, m.next_deadline()) for p, m in self._live(machines)]
        return found

    def _fire_timers(self) -> None:
        while self.later and self.later[0][0] <= self.now:
            heapq.heappop(self.later)[2]()
        for p, r in self._live(self.reducers):
            self._reducer_actions(p, r.on_timer(self.now))
        for p, c in self._live(self.combiners):
            self._combiner_actions(p, c.on_timer(self.now))
        for p, k in self._live(self.clients):
            self._client_actions(p, k.on_timer(self.now))

    def _send(
        self,
        kind: str,
        src: PeerId,
        dst: PeerId,
        deliver: Callable[[], None],
        lost: Callable[[], None] | None = None,
    ) -> None:
        """Queue a delivery; ``lost`` runs instead if it is dropped or ``dst`` is dead by then."""
        if self.drop(kind, src, dst) or src in self.dead:
            if lost is not None:
                lost()
            return

        def arrive() -> None:
            if dst not in self.dead:
                deliver()
            elif lost is not None:
                lost()

        self.queue.append(arrive)

    def _after(self, delay: float, fire: Callable[[], None]) -> None:
        heapq.heappush(self.later, (self.now + delay, next(self._order), fire))

    def _acting(self, who: PeerId, action: object) -> bool:
        """Log ``action`` and let the hook see it: whether ``who`` still carries it out."""
        if who in self.dead:
            return False
        if self.hook is not None:
            self.hook(who, action)
        if who in self.dead:
            return False
        self.log.append((who, action))
        return True

    # --- reducers ---

    def _reducer_actions(self, peer: PeerId, actions: list[re_.ReducerAction]) -> None:
        machine, key = self.reducers[peer], KEY_OF[peer]
        for action in actions:
            if not self._acting(peer, action):
                return
            if isinstance(action, re_.PublishPlan):
                self._gossip("plan", peer, seal_bytes(key, action.plan))
            elif isinstance(action, re_.Reduce):
                total = sum(p.total_weight for p in action.partials)
                mean = sum(self.blobs[p.partial] * p.total_weight for p in action.partials) / total
                new = self.blobs[action.parent] + self.cfg.server_lr * (
                    mean - self.blobs[action.parent]
                )
                d, data = blob_of(new)
                self.blobs[d] = new
                reduced = machine.on_reduced(d, len(data), {"loss": 0.5}, self.now)
                self._reducer_actions(peer, reduced)
            elif isinstance(action, re_.Evaluate):
                metrics = {"eval_accuracy": float(action.round) / 10}
                self._reducer_actions(peer, machine.on_evaluated(metrics, self.now))
            elif isinstance(action, re_.PublishResult):
                self.results.append(action.result)
                self._gossip("result", peer, seal_bytes(key, action.result))
            elif isinstance(action, (re_.SessionCompleted, re_.SessionFailed)):
                self.ended.append(action)
                self._gossip("ended", peer, seal_bytes(key, action.ended))

    def _gossip(self, kind: str, src: PeerId, sealed: bytes) -> None:
        for p in self.reducers:
            if p != src:
                self._send(kind, src, p, lambda p=p: self._to_reducer_control(p, kind, sealed))
        for p in self.combiners:
            self._send(kind, src, p, lambda p=p: self._to_combiner(p, kind, sealed))
        for p in self.clients:
            self._send(kind, src, p, lambda p=p: self._to_client(p, kind, sealed))

    def _to_reducer_control(self, peer: PeerId, kind: str, sealed: bytes) -> None:
        machine = self.reducers[peer]
        if kind == "plan":
            actions = machine.on_plan(open_round_plan(sealed), self.now)
        elif kind == "result":
            actions = machine.on_result(open_round_result(sealed), self.now)
        else:
            actions = machine.on_session_ended(open_session_ended(sealed), self.now)
        self._reducer_actions(peer, actions)

    def _to_reducer(self, peer: PeerId, sealed: bytes) -> None:
        made, _ = open_envelope(sealed, PartialAggregate)
        self._reducer_actions(peer, self.reducers[peer].on_partial(made, self.now))

    # --- combiners ---

    def _to_combiner(self, peer: PeerId, kind: str, sealed: bytes) -> None:
        machine = self.combiners[peer]
        if kind == "plan":
            self._combiner_actions(peer, machine.on_plan(open_round_plan(sealed), self.now))
        elif kind == "ended":
            ended = open_session_ended(sealed)
            self._combiner_actions(peer, machine.on_session_ended(ended, self.now))

    def _combiner_actions(self, peer: PeerId, actions: list[co.CombinerAction]) -> None:
        for action in actions:
            if not self._acting(peer, action):
                return
            if isinstance(action, co.ResetAccumulator):
                self.sums[peer] = (np.zeros(3), 0)
            elif isinstance(action, co.Accumulate):
                total, weight = self.sums[peer]
                u = action.update
                self.sums[peer] = (
                    total + self.blobs[u.update] * u.num_examples,
                    weight + u.num_examples,
                )
            elif isinstance(action, co.DiscardAccumulator):
                self.sums.pop(peer, None)
            elif isinstance(action, co.PushPartial):
                total, weight = self.sums[peer]
                assert weight == action.total_weight
                d, data = blob_of(total / weight)
                self.blobs[d] = total / weight
                made = PartialAggregate(
                    federation=action.federation,
                    session=action.session,
                    round=action.round,
                    parent=action.parent,
                    partial=d,
                    size=len(data),
                    contributions=action.contributions,
                    total_weight=action.total_weight,
                    combiner=KEY_OF[peer].public_key,
                    created_ms=1000,
                    nonce=Nonce(bytes(16)),
                )
                sealed = seal_bytes(KEY_OF[peer], made)
                to = peer_of(action.reducer)
                self._send("partial", peer, to, lambda s=sealed, to=to: self._to_reducer(to, s))

    # --- clients ---

    def _to_client(self, peer: PeerId, kind: str, sealed: bytes) -> None:
        machine = self.clients[peer]
        if kind == "plan":
            self._client_actions(peer, machine.on_plan(open_round_plan(sealed), self.now))
        elif kind == "result":
            self._client_actions(peer, machine.on_result(open_round_result(sealed), self.now))
        elif kind == "ended":
            ended = open_session_ended(sealed)
            self._client_actions(peer, machine.on_session_ended(ended, self.now))

    def _client_call(self, peer: PeerId, call: Callable[[cl.ClientMachine], Any]) -> None:
        """Report to a client's machine (if it is still alive) and carry out what it says."""
        if peer not in self.dead:
            self._client_actions(peer, call(self.clients[peer]))

    def _in(self, delay: float, fire: Callable[[], None]) -> None:
        if delay > 0:
            self._after(delay, fire)
        else:
            self.queue.append(fire)

    def _client_actions(self, peer: PeerId, actions: list[cl.ClientAction]) -> None:
        for action in actions:
            if not self._acting(peer, action):
                return
            if isinstance(action, cl.FetchModel):
                self._in(self.fetch_s, lambda a=action: self._fetched(peer, a))
            elif isinstance(action, cl.Train):
                self.trained[peer] = self.trained.get(peer, 0) + 1
                self._in(self.train_s, lambda job=action: self._trained(peer, job))
            elif isinstance(action, cl.PushUpdate):
                sealed = seal_bytes(KEY_OF[peer], action.update)
                made, to = action.update, action.combiner
                self._send(
                    "update",
                    peer,
                    to,
                    lambda to=to, s=sealed: self._push(peer, to, s),
                    lost=lambda made=made: self._no_ack(peer, made),
                )

    def _fetched(self, peer: PeerId, action: cl.FetchModel) -> None:
        """The fetch ends: served by the first listed holder alive then, or failed."""
        served = action.model in self.blobs and any(h not in self.dead for h in action.holders)
        model = action.model
        if served:
            self._client_call(peer, lambda m: m.on_model_fetched(model, self.now))
        else:
            self._client_call(peer, lambda m: m.on_fetch_failed(model, self.now))

    def _trained(self, peer: PeerId, job: cl.Train) -> None:
        value = self.blobs[job.parent] + 1.0 + sorted(self.clients).index(peer)
        d, data = blob_of(value)
        self.blobs[d] = value
        self._client_call(
            peer,
            lambda m: m.on_trained(
                job,
                update=d,
                size=len(data),
                num_examples=self.examples[peer],
                metrics={"loss": 1.0},
                nonce=Nonce(bytes(16)),
                now=self.now,
            ),
        )

    def _no_ack(self, client: PeerId, made: ModelUpdate) -> None:
        """The push driver hears nothing back: after its timeout it reports the push failed."""
        self._after(
            PUSH_TIMEOUT,
            lambda: self._client_call(client, lambda m: m.on_push_failed(made.update, self.now)),
        )

    def _push(self, client: PeerId, combiner: PeerId, sealed: bytes) -> None:
        """The push protocol: offer, admit, bytes, store, ack (the ack may be lost)."""
        made, envelope = open_envelope(sealed, ModelUpdate)
        machine = self.combiners[combiner]
        verdict = machine.admit(made, peer_of(envelope.signer), self.now)
        reply: Callable[[cl.ClientMachine], list[cl.ClientAction]]
        if verdict is None or verdict is co.UpdateRejection.HAVE:
            if verdict is None:
                actions = machine.on_update_stored(made, self.now)
                self._combiner_actions(combiner, actions)
                refused = [a for a in actions if isinstance(a, co.UpdateRejected)]
                if refused:
                    reason = str(refused[0].reason)
                    reply = lambda m: m.on_push_refused(made.update, reason, self.now)  # noqa: E731
                else:
                    reply = lambda m: m.on_push_acked(made.update, self.now)  # noqa: E731
            else:
                reply = lambda m: m.on_push_acked(made.update, self.now)  # noqa: E731
        else:
            reason = str(verdict)
            reply = lambda m: m.on_push_refused(made.update, reason, self.now)  # noqa: E731
        self._send(
            "ack",
            combiner,
            client,
            lambda: self._client_call(client, reply),
            lost=lambda: self._no_ack(client, made),
        )

    # --- reading the log ---

    def actions_of(self, who: PeerId, kind: type[Any]) -> list[Any]:
        return [a for w, a in self.log if w == who and isinstance(a, kind)]


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
