"""Whole sessions: one reducer, two combiners and four clients wired by hand through a tiny
in-test network (``rounds_kit.Network``), every control message sealed and opened for real, the
clock stepped by hand and loss simulated by not delivering."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from rounds_kit import (
    C1,
    C2,
    DEADLINE_S,
    K1,
    K2,
    K3,
    K4,
    KEY_OF,
    OUTSIDER_KEY,
    Network,
    config,
    partial,
    plan,
    reducer,
    replace,
    update,
)

from fednode.crypto import open_envelope, seal, seal_bytes
from fednode.errors import BadSignatureError, WireError
from fednode.protocol import client as cl
from fednode.protocol import combiner as co
from fednode.protocol import reducer as re_
from fednode.protocol.rounds import CombinerLoad, peer_of
from fednode.wire import ModelUpdate, PartialAggregate, PeerId, encode

CUTOFF = DEADLINE_S - 6.0


def included_peers(result: Any) -> list[PeerId]:
    return sorted(peer_of(c.signer) for c in result.included)


def forgets(net: Network, client: PeerId) -> list[bool]:
    return [a.included for a in net.actions_of(client, cl.ForgetUpdate)]


# ------------------------------------------------------------------------- the happy path


def test_two_rounds_through_two_combiners_equal_flat_fedavg() -> None:
    # Prepare: weights 10, 20, 30, 40; client i trains to parent + 1 + i
    net = Network(config(rounds=2, eval_every=2))
    # Execute
    net.start()
    # Assert: each round moves the model by 1 + (0*10 + 1*20 + 2*30 + 3*40) / 100 = 3
    first, second = net.results
    assert np.array_equal(net.blobs[first.model], np.full(3, 3.0))
    assert np.array_equal(net.blobs[second.model], np.full(3, 6.0))
    assert second.parent == first.model
    for result in net.results:
        assert included_peers(result) == sorted([K1, K2, K3, K4])
        assert result.num_examples == 100
        assert {peer_of(p.combiner) for p in result.partials} == {C1, C2}
    assert "eval_accuracy" not in first.metrics and second.metrics["eval_accuracy"] == 0.2
    (done,) = net.ended
    assert isinstance(done, re_.SessionCompleted)
    assert (done.ended.rounds, done.ended.model) == (2, second.model)
    for client in (K1, K2, K3, K4):
        assert forgets(net, client) == [True, True]
        assert net.clients[client].state is cl.State.DONE
        assert net.trained[client] == 2
    assert all(c.state is co.State.DONE for c in net.combiners.values())
    assert net.reducer.state is re_.State.COMPLETED
    assert net.now == 0.0  # nobody waited for a deadline


def test_assignment_spreads_clients_over_combiners_least_loaded_first() -> None:
    net = Network(config(rounds=1))
    net.start()
    plan_ = net.reducer.plan
    assert plan_ is not None
    assert plan_.clients_of(C1) == (K1, K3) and plan_.clients_of(C2) == (K2, K4)


# ------------------------------------------------------------------------- stragglers


def test_a_straggler_is_cut_off_and_its_late_update_refused_as_stale() -> None:
    # Prepare: K4's pushes are lost until t=55, after C2's cut-off at 54, and so is everything
    # after the first plan that would tell it to stop
    def drop(kind: str, src: PeerId, dst: PeerId) -> bool:
        cut_off = kind in ("plan", "result", "ended") and dst == K4 and net.now > 0
        return cut_off or (kind == "update" and src == K4 and net.now < 55.0)

    net = Network(config(rounds=1), drop=drop)
    net.start()
    assert net.results == []
    # Execute
    net.advance(DEADLINE_S + 1)
    # Assert: C2 pushed K2 alone at its cut-off; the round closed then, before the deadline
    (result,) = net.results
    assert included_peers(result) == sorted([K1, K2, K3])
    assert result.created_ms == CUTOFF * 1000
    assert forgets(net, K1) == [True]
    # K4's retry at 56.5 s reached C2 after its cut-off: refused as stale, the update kept
    assert net.combiners[C2].statistics().rejected[co.UpdateRejection.STALE] == 1
    assert net.clients[K4].state is cl.State.WAITING
    assert net.clients[K4].statistics().kept == (1,)


def test_a_straggler_that_sees_the_result_stops_pushing_and_forgets_its_update() -> None:
    # Prepare: as above, but the result reaches K4 (at 54 s, while it waits to retry)
    net = Network(
        config(rounds=1),
        drop=lambda kind, src, dst: kind == "update" and src == K4 and net.now < 55.0,
    )
    # Execute
    net.start()
    net.advance(DEADLINE_S + 1)
    # Assert
    assert forgets(net, K4) == [False]
    assert net.clients[K4].state is cl.State.DONE
    assert net.combiners[C2].statistics().rejected[co.UpdateRejection.STALE] == 0


def test_a_lost_partial_leaves_the_round_to_close_at_the_deadline_with_what_arrived() -> None:
    # Prepare: C2's partial never reaches the reducer
    net = Network(config(rounds=1), drop=lambda kind, src, dst: kind == "partial" and src == C2)
    # Execute
    net.start()
    net.advance(DEADLINE_S - 0.001)
    assert net.results == []
    net.advance(DEADLINE_S)
    # Assert
    (result,) = net.results
    assert result.created_ms == DEADLINE_S * 1000
    assert included_peers(result) == sorted([K1, K3])
    assert forgets(net, K2) == [False] and forgets(net, K4) == [False]


def test_a_lost_ack_is_retried_and_the_update_counted_once() -> None:
    # Prepare: K1's first ack is lost; K3 (C1's other client) gets through only after t=5
    acks_lost: list[PeerId] = []

    def drop(kind: str, src: PeerId, dst: PeerId) -> bool:
        if kind == "ack" and dst == K1 and not acks_lost:
            acks_lost.append(dst)
            return True
        return kind == "update" and src == K3 and net.now < 5.0

    net = Network(config(rounds=1), drop=drop)
    # Execute
    net.start()
    net.advance(10.0)
    # Assert: K1 re-pushed after the push timeout and backoff, answered "have"
    (result,) = net.results
    assert included_peers(result) == sorted([K1, K2, K3, K4])
    assert net.combiners[C1].statistics().rejected[co.UpdateRejection.HAVE] == 1
    assert len(net.actions_of(K1, cl.PushUpdate)) == 2
    assert all(net.trained[c] == 1 for c in (K1, K2, K3, K4))
    assert forgets(net, K1) == [True]


# ------------------------------------------------------------------------- too few clients


def test_a_short_round_is_retried_and_succeeds_without_retraining() -> None:
    # Prepare: min 3; K3's and K4's updates are lost in the first attempt only
    net = Network(
        config(rounds=1, min_clients=3, max_retries=2),
        drop=lambda kind, src, dst: kind == "update" and src in (K3, K4) and net.now < 60.0,
    )
    net.start()
    # Execute
    net.advance(DEADLINE_S)  # attempt 0 closes with 2 < 3: re-planned
    retry = net.reducer.plan
    net.advance(2 * DEADLINE_S)
    # Assert
    assert retry is not None and (retry.round, retry.amendment) == (1, 1)
    (result,) = net.results
    assert result.amendment == 1
    assert included_peers(result) == sorted([K1, K2, K3, K4])
    assert all(net.trained[c] == 1 for c in (K1, K2, K3, K4))  # kept updates re-pushed
    have = sum(c.statistics().rejected[co.UpdateRejection.HAVE] for c in net.combiners.values())
    assert have == 2  # K1 and K2 re-pushed what their combiners held
    assert all(forgets(net, c) == [True] for c in (K1, K2, K3, K4))


def test_a_round_short_after_every_retry_fails_the_session_with_a_clear_message() -> None:
    # Prepare: min 3, but only K1 and K2 ever get through
    net = Network(
        config(rounds=2, min_clients=3, max_retries=1),
        drop=lambda kind, src, dst: kind == "update" and src in (K3, K4),
    )
    net.start()
    # Execute
    net.advance(3 * DEADLINE_S)
    # Assert
    (failed,) = net.ended
    assert isinstance(failed, re_.SessionFailed)
    assert failed.reason.startswith(
        "round 1 fell short after 1 retries: 2 client update(s) counted by the deadline, 3 needed"
    )
    assert net.now == 3 * DEADLINE_S
    assert net.results == []
    assert net.reducer.state is re_.State.FAILED
    for client in (K1, K2, K3, K4):
        assert net.clients[client].state is cl.State.DONE
        assert net.trained[client] == 1
    assert forgets(net, K1) == [False]  # settled by the session's end, never counted


# ------------------------------------------------------------------------- bad updates


def combiner_with_plan() -> co.CombinerMachine:
    c = co.CombinerMachine(peer=C1, capacity=4, federation="demo")
    c.on_plan(plan(), 0.0)
    return c


def offer(c: co.CombinerMachine, sealed: bytes) -> co.UpdateRejection | None:
    """What the push protocol does first: open the envelope, then ask the combiner."""
    made, envelope = open_envelope(sealed, ModelUpdate)
    return c.admit(made, peer_of(envelope.signer), 1.0)


def test_an_unsigned_update_never_reaches_the_combiner() -> None:
    # Prepare
    u = update(K1)
    good = seal(KEY_OF[K1], u)
    forged = encode(replace(good, signature=bytes(64)))
    by_another = seal_bytes(KEY_OF[K2], u)  # K2 signs an update naming K1 as its signer
    # Execute / Assert
    with pytest.raises(WireError):
        open_envelope(encode(u), ModelUpdate)  # a bare update, no envelope at all
    with pytest.raises(BadSignatureError):
        open_envelope(forged, ModelUpdate)
    with pytest.raises(BadSignatureError, match="signer"):
        open_envelope(by_another, ModelUpdate)


@pytest.mark.parametrize(
    ("signer", "changes", "reason"),
    [
        (OUTSIDER_KEY.peer_id, {}, co.UpdateRejection.NOT_ASSIGNED),
        (K3, {}, co.UpdateRejection.NOT_ASSIGNED),
        (K1, {"round": 2}, co.UpdateRejection.EARLY),
        (K1, {"round": 0}, co.UpdateRejection.STALE),
        (K1, {"parent": update(K1).update}, co.UpdateRejection.WRONG_PARENT),
    ],
    ids=["unassigned-client", "other-combiners-client", "future-round", "past-round", "parent"],
)
def test_signed_updates_the_plan_does_not_allow_are_refused(
    signer: PeerId, changes: dict[str, Any], reason: co.UpdateRejection
) -> None:
    # Prepare
    c = combiner_with_plan()
    key = OUTSIDER_KEY if signer == OUTSIDER_KEY.peer_id else KEY_OF[signer]
    u = replace(update(K1), signer=key.public_key, **changes)
    # Execute
    verdict = offer(c, seal_bytes(key, u))
    # Assert
    assert verdict is reason


def test_a_duplicated_update_counts_once_and_a_second_one_is_refused() -> None:
    # Prepare
    c = combiner_with_plan()
    first = seal_bytes(KEY_OF[K1], update(K1))
    assert offer(c, first) is None
    c.on_update_stored(update(K1), 1.0)
    # Execute / Assert
    assert offer(c, first) is co.UpdateRejection.HAVE
    retrained = seal_bytes(KEY_OF[K1], update(K1, blob=b"again"))
    assert offer(c, retrained) is co.UpdateRejection.DUPLICATE
    assert c.statistics().counted == 1


# ------------------------------------------------------------------------- bad partials


def test_a_partial_signed_for_another_combiner_never_reaches_the_reducer() -> None:
    p = partial(C1, [K1])
    with pytest.raises(BadSignatureError):
        open_envelope(seal_bytes(OUTSIDER_KEY, p), PartialAggregate)


def test_a_signed_partial_from_an_unassigned_combiner_is_rejected() -> None:
    # Prepare
    r = reducer()
    r.start(0.0, [K1, K2, K3, K4], [CombinerLoad(peer=C1, capacity=4)])
    p = replace(partial(C1, [K1]), combiner=OUTSIDER_KEY.public_key)
    made, _ = open_envelope(seal_bytes(OUTSIDER_KEY, p), PartialAggregate)
    # Execute
    (rejected,) = r.on_partial(made, 1.0)
    # Assert
    assert isinstance(rejected, re_.PartialRejected)
    assert rejected.reason is re_.PartialRejection.NOT_ASSIGNED
