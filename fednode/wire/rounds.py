"""Wire layer: the round protocol's control messages, sealed by the reducer and gossiped on the
federation's control topic.

A :class:`RoundPlan` opens (or amends) a round: which global model to train from, which combiner
each client reports to, and the deadline. A :class:`RoundResult` closes it: the new global model,
the contributions it counts and the metrics. A :class:`SessionEnded` says the session completed or
failed. A :class:`SessionCheckpoint` is the reducer's signed record of what a successor needs to
resume the session, re-published as its lease. The state machines that send and follow them are in
``fednode/protocol/`` (``reducer``, ``combiner``, ``client``, ``leader``); the protocol is
``protocols/rounds.md``. Spec'd in
``protocols/wire.md`` and ``protocols/messages.cddl``. No crypto, no trio, no libp2p.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from fednode.wire.control import MAX_SESSION, is_federation_id
from fednode.wire.messages import Contribution, GlobalModel, PartialRef
from fednode.wire.schema import (
    Digest,
    FederationId,
    PeerId,
    PublicKey,
    SessionId,
    message,
    record,
)

Aggregator = Literal["fedavg"]
ServerOptimizer = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
PartitionScheme = Literal["iid", "dirichlet"]
SessionOutcome = Literal["completed", "failed"]

_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")  # base58btc alphabet, as in heartbeats
_TASK = re.compile(r"[^\s\x00]{1,256}")
#: A round deadline of at most a week.
MAX_ROUND_DEADLINE_MS = 7 * 24 * 3600 * 1000
#: At most this many peers known to hold a plan's parent model.
MAX_HOLDERS = 64
#: At most this many clients in one plan or result, so both stay below gossipsub's 512 KiB message
#: cap: at 1,000 clients a sealed plan is about 56 KB and a sealed result about 95 KB.
MAX_PLAN_CLIENTS = 4096
MAX_REASON = 1024
#: At most this many quorum members in a checkpoint: a sealed checkpoint at the cap (and 64
#: holders) is about 18 KB, far below gossipsub's cap, however many peers take part.
MAX_MEMBERS = 256
#: A reducer lease of at most ten minutes.
MAX_LEASE_MS = 600_000


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _is_peer_id(value: str) -> bool:
    return _PEER_ID.fullmatch(value) is not None


def _check_ids(federation: str, session: str) -> None:
    _require(is_federation_id(federation), "federation must be 1 to 64 of [A-Za-z0-9._-]")
    _require(0 < len(session) <= MAX_SESSION, f"session must be 1 to {MAX_SESSION} characters")


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """A training session's settings, fixed for the whole session and carried in every plan.

    ``server_lr``, ``server_momentum`` (FedAvgM), ``beta1``, ``beta2`` and ``tau`` (FedAdam,
    FedYogi, FedAdagrad) are the server optimiser's hyper-parameters; an optimiser ignores the ones
    it does not use. ``alpha`` is the Dirichlet concentration, ignored for ``"iid"``.
    """

    rounds: int  #: training rounds; the initial model is round 0, training rounds are 1..rounds
    min_clients: int  #: fewest clients whose updates may close a round
    max_retries: int  #: times a round is re-planned when it falls short before the session fails
    round_deadline_ms: int  #: how long a round stays open after its plan
    epochs: int
    batch_size: int
    lr: float
    aggregator: Aggregator
    server_optimizer: ServerOptimizer
    server_lr: float
    server_momentum: float
    beta1: float
    beta2: float
    tau: float
    eval_every: int  #: evaluate the global model every k rounds (and after the last); 0: never
    seed: int
    task: str  #: the task module (``fednode.task.digits``) or entry point clients train with
    partition: PartitionScheme
    alpha: float
    proximal_mu: float  #: FedProx coefficient; 0 is plain FedAvg

    def __post_init__(self) -> None:
        for name in ("lr", "server_lr", "server_momentum", "beta1", "beta2", "tau", "alpha",
                     "proximal_mu"):  # fmt: skip
            value = getattr(self, name)
            if type(value) is int:  # a local caller may pass 1 for 1.0; the wire needs floats
                object.__setattr__(self, name, float(value))
            _require(_finite(getattr(self, name)), f"{name} must be finite")
        _require(self.rounds >= 1, "rounds must be at least 1")
        _require(self.min_clients >= 1, "min_clients must be at least 1")
        _require(self.max_retries >= 0, "max_retries must be non-negative")
        _require(
            1 <= self.round_deadline_ms <= MAX_ROUND_DEADLINE_MS,
            f"round_deadline_ms must be 1 to {MAX_ROUND_DEADLINE_MS}",
        )
        _require(self.epochs >= 1, "epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.lr > 0, "lr must be positive")
        _require(self.server_lr > 0, "server_lr must be positive")
        _require(0 <= self.server_momentum < 1, "server_momentum must be in [0, 1)")
        _require(0 <= self.beta1 < 1, "beta1 must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "beta2 must be in [0, 1)")
        _require(self.tau > 0, "tau must be positive")
        _require(self.eval_every >= 0, "eval_every must be non-negative")
        _require(self.seed >= 0, "seed must be non-negative")
        _require(_TASK.fullmatch(self.task) is not None, "task must be 1 to 256 non-space chars")
        _require(self.alpha > 0, "alpha must be positive")
        _require(self.proximal_mu >= 0, "proximal_mu must be non-negative")


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """The clients one combiner takes in a round: sorted by peer ID, at least one."""

    combiner: PeerId
    clients: tuple[PeerId, ...]

    def __post_init__(self) -> None:
        _require(_is_peer_id(self.combiner), "combiner must be a base58 peer ID")
        _require(len(self.clients) > 0, "an assignment needs at least one client")
        _require(all(_is_peer_id(c) for c in self.clients), "clients must be base58 peer IDs")
        _require(
            list(self.clients) == sorted(set(self.clients)), "clients must be sorted, each once"
        )


@message("round-plan")
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPlan:
    """The reducer's signed plan for one attempt at a round.

    A plan is identified by ``(term, round, amendment)``, and a newer one replaces an older one.
    ``term`` is the reducer's election term (a plan of an older term is ignored); ``amendment``
    counts the re-plans of one round (a retry after falling short, or, later, moving the clients
    of a dead combiner), 0 for the first plan. No client is in two assignments.
    """

    federation: FederationId
    session: SessionId
    term: int
    round: int
    amendment: int
    parent: Digest  #: the global model to train from
    parent_size: int  #: that blob's size in bytes
    holders: tuple[PeerId, ...]  #: peers known to hold the parent blob
    assignments: tuple[Assignment, ...]  #: sorted by combiner, each once
    min_clients: int
    deadline_ms: int  #: the round closes at this wall-clock time (ms since the epoch)
    config: SessionConfig
    reducer: PublicKey
    created_ms: int

    def __post_init__(self) -> None:
        _check_ids(self.federation, self.session)
        _require(self.term >= 0, "term must be non-negative")
        _require(self.round >= 1, "round must be at least 1")
        _require(self.amendment >= 0, "amendment must be non-negative")
        _require(self.parent_size >= 0, "parent_size must be non-negative")
        _require(len(self.holders) <= MAX_HOLDERS, f"at most {MAX_HOLDERS} holders")
        _require(all(_is_peer_id(h) for h in self.holders), "holders must be base58 peer IDs")
        combiners = [a.combiner for a in self.assignments]
        _require(
            combiners == sorted(set(combiners)), "assignments must be sorted by combiner, each once"
        )
        clients = [c for a in self.assignments for c in a.clients]
        _require(len(clients) <= MAX_PLAN_CLIENTS, f"at most {MAX_PLAN_CLIENTS} clients")
        _require(len(clients) == len(set(clients)), "no client may be in two assignments")
        _require(self.min_clients >= 1, "min_clients must be at least 1")
        _require(self.created_ms >= 0, "created_ms must be non-negative")
        _require(self.deadline_ms > self.created_ms, "deadline_ms must be after created_ms")

    def combiner_of(self, client: PeerId) -> PeerId | None:
        """The combiner ``client`` reports to in this plan, or None if it is not in it."""
        for assignment in self.assignments:
            if client in assignment.clients:
                return assignment.combiner
        return None

    def clients_of(self, combiner: PeerId) -> tuple[PeerId, ...]:
        """The clients assigned to ``combiner``; empty if it is not in this plan."""
        for assignment in self.assignments:
            if assignment.combiner == combiner:
                return assignment.clients
        return ()


@message("round-result")
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundResult:
    """The reducer's signed close of a round: the new global model and what it counts.

    It carries every field of the round's :class:`GlobalModel` (:meth:`global_model` rebuilds it,
    so one signature covers both), plus ``included``, every contribution the partials counted, so
    a client can see its own update there and let it go.
    """

    federation: FederationId
    session: SessionId
    term: int
    round: int
    amendment: int  #: the plan attempt it closes
    parent: Digest  #: the global model the round trained from
    model: Digest  #: the new global model's blob
    size: int  #: that blob's size in bytes
    partials: tuple[PartialRef, ...]  #: sorted by combiner, each once
    included: tuple[Contribution, ...]  #: sorted by signer, each once
    num_examples: int
    metrics: dict[str, float]  #: weighted training metrics; evaluation metrics when evaluated
    reducer: PublicKey
    created_ms: int

    def __post_init__(self) -> None:
        if any(type(v) is int for v in self.metrics.values()):
            object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})
        _check_ids(self.federation, self.session)
        _require(self.term >= 0, "term must be non-negative")
        _require(self.round >= 1, "round must be at least 1")
        _require(self.amendment >= 0, "amendment must be non-negative")
        _require(self.size >= 0, "size must be non-negative")
        _require(self.created_ms >= 0, "created_ms must be non-negative")
        _require(len(self.partials) > 0, "a round result needs at least one partial")
        combiners = [p.combiner for p in self.partials]
        _require(
            combiners == sorted(set(combiners)), "partials must be sorted by combiner, each once"
        )
        signers = [c.signer for c in self.included]
        _require(len(signers) <= MAX_PLAN_CLIENTS, f"at most {MAX_PLAN_CLIENTS} included")
        _require(signers == sorted(set(signers)), "included must be sorted by signer, each once")
        _require(
            self.num_examples == sum(p.total_weight for p in self.partials),
            "num_examples must be the sum of partial weights",
        )
        _require(
            self.num_examples == sum(c.weight for c in self.included),
            "num_examples must be the sum of included weights",
        )

    def global_model(self) -> GlobalModel:
        """The :class:`GlobalModel` this result announces (same reducer, same time)."""
        return GlobalModel(
            federation=self.federation,
            session=self.session,
            round=self.round,
            model=self.model,
            size=self.size,
            parent=self.parent,
            partials=self.partials,
            num_examples=self.num_examples,
            reducer=self.reducer,
            created_ms=self.created_ms,
        )

    def contribution_of(self, signer: PublicKey) -> Contribution | None:
        """The included contribution signed by ``signer``, or None."""
        for contribution in self.included:
            if contribution.signer == signer:
                return contribution
        return None


@message("session-ended")
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnded:
    """The reducer's signed word that a session is over: completed, or failed and why."""

    federation: FederationId
    session: SessionId
    term: int
    outcome: SessionOutcome
    rounds: int  #: rounds completed (the last round with a result), 0 if none
    model: Digest  #: the last global model: the final one, or where a failed session stopped
    reason: str  #: why it failed; empty when completed
    reducer: PublicKey
    created_ms: int

    def __post_init__(self) -> None:
        _check_ids(self.federation, self.session)
        _require(self.term >= 0, "term must be non-negative")
        _require(self.rounds >= 0, "rounds must be non-negative")
        _require(len(self.reason) <= MAX_REASON, f"reason must be at most {MAX_REASON} chars")
        _require(
            (self.outcome == "failed") == (self.reason != ""),
            "a failed session says why; a completed one has no reason",
        )
        _require(self.created_ms >= 0, "created_ms must be non-negative")


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRef:
    """A content-addressed blob named from a control message: its digest and size in bytes."""

    digest: Digest
    size: int

    def __post_init__(self) -> None:
        _require(self.size >= 0, "size must be non-negative")


@message("session-checkpoint")
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCheckpoint:
    """The reducer's signed record of what a successor needs to resume the session, and its lease.

    ``round`` is the last round closed (0 before the first); ``model`` is the global model after
    it (the initial model at round 0). The server optimiser's state travels as a blob, the
    canonical encoding of a ``model`` message holding ``ServerOptimizer.state()``; ``optimizer``
    is None when there is none to carry (plain FedAvg, or before the first round). ``members`` are
    the peers whose majority a reducer must see to close rounds and a successor to take over
    (``protocols/rounds.md``, "Reducer election"). The reducer re-publishes a fresh checkpoint
    (a new ``created_ms``) every ``lease_ms / 3``: its lease runs ``lease_ms`` past each one.
    """

    federation: FederationId
    session: SessionId
    term: int
    round: int  #: the last round closed, 0 before the first
    model: Digest  #: the global model after ``round``
    size: int  #: that blob's size in bytes
    holders: tuple[PeerId, ...]  #: peers known to hold the model's blob
    config: SessionConfig
    optimizer: BlobRef | None  #: the server optimiser's state; None for plain FedAvg or round 0
    members: tuple[PeerId, ...]  #: the quorum: sorted, each once
    lease_ms: int  #: the lease runs this long after ``created_ms`` unless renewed
    reducer: PublicKey
    created_ms: int

    def __post_init__(self) -> None:
        _check_ids(self.federation, self.session)
        _require(self.term >= 1, "term must be at least 1")
        _require(0 <= self.round <= self.config.rounds, "round must be within 0..config.rounds")
        _require(self.size >= 0, "size must be non-negative")
        _require(len(self.holders) <= MAX_HOLDERS, f"at most {MAX_HOLDERS} holders")
        _require(all(_is_peer_id(h) for h in self.holders), "holders must be base58 peer IDs")
        stateless = self.config.server_optimizer == "fedavg" or self.round == 0
        _require(
            (self.optimizer is None) == stateless,
            "optimizer state is carried exactly when a stateful optimiser has run a round",
        )
        _require(0 < len(self.members) <= MAX_MEMBERS, f"1 to {MAX_MEMBERS} members")
        _require(all(_is_peer_id(m) for m in self.members), "members must be base58 peer IDs")
        _require(
            list(self.members) == sorted(set(self.members)), "members must be sorted, each once"
        )
        _require(0 < self.lease_ms <= MAX_LEASE_MS, f"lease_ms must be 1 to {MAX_LEASE_MS}")
        _require(self.created_ms >= 0, "created_ms must be non-negative")


__all__ = [
    "MAX_HOLDERS",
    "MAX_LEASE_MS",
    "MAX_MEMBERS",
    "MAX_PLAN_CLIENTS",
    "MAX_ROUND_DEADLINE_MS",
    "Aggregator",
    "Assignment",
    "BlobRef",
    "PartitionScheme",
    "RoundPlan",
    "RoundResult",
    "ServerOptimizer",
    "SessionCheckpoint",
    "SessionConfig",
    "SessionEnded",
    "SessionOutcome",
]
