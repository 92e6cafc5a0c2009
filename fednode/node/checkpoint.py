"""Node layer: what a reducer hands its successor: the signed session checkpoint it publishes
after each round (and as its lease), and the state a new reducer resumes from one.

The checkpoint names the global model and, for a stateful server optimiser, a blob of the
optimiser's state (a model blob of ``ServerOptimizer.state()``); both are content-addressed, so
the successor fetches them from any holder and verifies them against the digests the reducer
signed. ``members`` is the quorum (``protocols/rounds.md``, "Reducer election"): the reducer and
the reducer-eligible peers alive in its view, then the combiners, then the clients, capped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import trio

from fednode.aggregation import ServerOptimizer
from fednode.errors import TransportError, WireError
from fednode.node.context import Params, RoleContext, load_model, put_model
from fednode.protocol.leader_actions import ELIGIBLE_ROLES, choose_members
from fednode.protocol.membership import PeerState
from fednode.protocol.rounds import wall_ms
from fednode.wire import (
    BlobRef,
    Digest,
    FederationId,
    PeerId,
    SessionCheckpoint,
    SessionConfig,
    SessionId,
)
from fednode.wire.rounds import MAX_HOLDERS

log = logging.getLogger(__name__)

#: The largest model or optimiser-state blob a successor fetches for a checkpoint.
MAX_STATE_BLOB = 1 << 31


def members_of(ctx: RoleContext, plan_peers: Iterable[PeerId] = ()) -> tuple[PeerId, ...]:
    """The quorum a checkpoint names: us and the eligible standbys, the combiners, the clients
    alive or suspect in our view, and every peer of the plan in force."""
    eligible: list[PeerId] = [ctx.peer]
    combiners: list[PeerId] = []
    clients: list[PeerId] = []
    for member in ctx.node.view.members():
        if member.state not in (PeerState.ALIVE, PeerState.SUSPECT):
            continue
        if member.role in ELIGIBLE_ROLES:
            eligible.append(member.peer)
        elif member.role == "combiner":
            combiners.append(member.peer)
        elif member.role == "client":
            clients.append(member.peer)
    return choose_members(eligible, combiners, [*clients, *plan_peers])


async def store_optimizer_state(ctx: RoleContext, optimizer: ServerOptimizer) -> BlobRef | None:
    """Store the optimiser's state as a pinned blob; None for a stateless optimiser."""
    state = optimizer.state()
    if not state:
        return None
    key, size = await put_model(ctx.store, state, pin=True)
    return BlobRef(digest=key, size=size)


def make_checkpoint(
    ctx: RoleContext,
    *,
    config: SessionConfig,
    session: str,
    term: int,
    progress: tuple[int, Digest, int, tuple[PeerId, ...]],
    optimizer: BlobRef | None,
    members: tuple[PeerId, ...],
    lease_ms: int,
    now: float,
) -> SessionCheckpoint:
    """The checkpoint of a reducer at ``term`` whose machine reports ``progress``."""
    completed, model, size, holders = progress
    if config.server_optimizer == "fedavg" or completed == 0:
        optimizer = None
    return SessionCheckpoint(
        federation=FederationId(ctx.node.config.federation),
        session=SessionId(session),
        term=term,
        round=completed,
        model=model,
        size=size,
        holders=tuple(dict.fromkeys([ctx.peer, *holders]))[:MAX_HOLDERS],
        config=config,
        optimizer=optimizer,
        members=members,
        lease_ms=lease_ms,
        reducer=ctx.node.key.public_key,
        created_ms=wall_ms(now, ctx.wall_offset_ms),
    )


async def fetch_state_blob(ctx: RoleContext, ref: BlobRef, holders: Iterable[PeerId]) -> None:
    """Have blob ``ref`` in our store (pinned): from the checkpoint's holders, then any peer;
    those alive in our view first (a checkpoint names its reducer first, which may be the peer
    that just died). A fetch of the same blob under way (a prefetch when a takeover resumes)
    is waited for, not doubled.

    Raises:
        TransportError: no peer had it.
    """
    if ctx.store.has(ref.digest):
        ctx.store.pin(ref.digest)
        return
    alive = {m.peer for m in ctx.node.view.members() if m.state is PeerState.ALIVE}
    peers = [p for p in dict.fromkeys(holders) if p != ctx.peer]
    peers += [m.peer for m in ctx.node.view.members() if m.peer not in peers]
    peers.sort(key=lambda p: p not in alive)  # stable: the holders' order kept
    for peer in [p for p in peers if p in alive][:4]:
        await ctx.reach(peer)
    started = trio.current_time()
    await ctx.fetch(
        peers, ref.digest, max_size=min(ref.size, MAX_STATE_BLOB), expected_size=ref.size
    )
    log.info("state blob %s had in %.2f s", ref.digest.hex()[:16], trio.current_time() - started)


async def resume_from(
    ctx: RoleContext, checkpoint: SessionCheckpoint, optimizer: ServerOptimizer
) -> Params:
    """The global model ``checkpoint`` names, with ``optimizer`` loaded with its state.

    Raises:
        TransportError: a blob could not be had from any peer.
        AggregationError: the optimiser state does not fit the optimiser.
    """
    await fetch_state_blob(
        ctx, BlobRef(digest=checkpoint.model, size=checkpoint.size), checkpoint.holders
    )
    params, _ = await load_model(ctx.store, checkpoint.model)
    if checkpoint.optimizer is not None:
        await fetch_state_blob(ctx, checkpoint.optimizer, checkpoint.holders)
        try:
            state, _ = await load_model(ctx.store, checkpoint.optimizer.digest)
        except (KeyError, WireError) as exc:
            raise TransportError(f"the optimiser state blob is unusable: {exc}") from exc
        state_arrays: dict[str, np.ndarray[Any, Any]] = {k: np.array(v) for k, v in state.items()}
        optimizer.load_state(state_arrays)
    return dict(params)


__all__ = [
    "fetch_state_blob",
    "make_checkpoint",
    "members_of",
    "resume_from",
    "store_optimizer_state",
]
