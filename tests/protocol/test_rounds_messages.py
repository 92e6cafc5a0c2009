"""The round messages as they travel: sealed sizes for many clients, author rules, the global
model a result rebuilds, and ``protocols/rounds.md`` drawn from the three transition tables."""

from __future__ import annotations

import enum
from functools import cache
from pathlib import Path

import pytest
from rounds_kit import (
    C1,
    C2,
    K1,
    OUTSIDER_KEY,
    REDUCER_KEY,
    ended,
    plan,
    reducer,
    replace,
    result,
    update,
)

from fednode.crypto import NodeKey, contributions_digest, digest, open_envelope, seal_bytes
from fednode.errors import BadSignatureError
from fednode.protocol import client, combiner
from fednode.protocol import reducer as reducer_mod
from fednode.protocol.rounds import (
    CombinerLoad,
    PlanRejection,
    ResultRejection,
    open_round_plan,
    open_round_result,
    open_session_ended,
)
from fednode.wire import Assignment, Contribution, GlobalModel, PartialRef
from fednode.wire.rounds import MAX_PLAN_CLIENTS

GOSSIP_CAP = 512 * 1024
ROUNDS_MD = Path(__file__).resolve().parents[2] / "protocols" / "rounds.md"
N_COMBINERS = 10
#: (clients, the most a sealed plan or result may take): far below the cap at 1,000 clients,
#: below it at the most a plan may hold.
CROWDS = [(1000, GOSSIP_CAP // 4), (MAX_PLAN_CLIENTS, GOSSIP_CAP)]


@cache
def crowd(n: int) -> tuple[list[NodeKey], list[NodeKey]]:
    """``n`` client keys and ten combiner keys."""
    keys = [NodeKey(i.to_bytes(4, "big") * 8) for i in range(n + N_COMBINERS)]
    return keys[:n], keys[n:]


@pytest.mark.parametrize(("n", "limit"), CROWDS, ids=lambda v: str(v))
def test_a_plan_for_many_clients_seals_below_the_gossip_cap(n: int, limit: int) -> None:
    # Prepare
    clients, combiners = crowd(n)
    r = reducer(holders=[k.peer_id for k in combiners[:7]])
    loads = [CombinerLoad(peer=k.peer_id, capacity=n) for k in combiners]
    # Execute
    (published,) = r.start(0.0, [k.peer_id for k in clients], loads)
    assert isinstance(published, reducer_mod.PublishPlan)
    sealed = seal_bytes(REDUCER_KEY, published.plan)
    # Assert
    assert sum(len(a.clients) for a in published.plan.assignments) == n
    assert len(sealed) < limit, len(sealed)
    assert open_round_plan(sealed) == published.plan


@pytest.mark.parametrize(("n", "limit"), CROWDS, ids=lambda v: str(v))
def test_a_result_for_many_clients_seals_below_the_gossip_cap(n: int, limit: int) -> None:
    # Prepare: ten partials sharing the contributions
    clients, combiners = crowd(n)
    share = -(-n // N_COMBINERS)
    partials = []
    for i, combiner_key in enumerate(combiners):
        contributions = tuple(
            sorted(
                (
                    Contribution(signer=k.public_key, update=digest(k.seed), weight=600)
                    for k in clients[share * i : share * (i + 1)]
                ),
                key=lambda c: c.signer,
            )
        )
        partials.append((combiner_key.public_key, contributions))
    included = sorted((c for _, cs in partials for c in cs), key=lambda c: c.signer)
    refs = sorted(
        (
            PartialRef(
                combiner=key,
                partial=digest(key),
                total_weight=sum(c.weight for c in cs),
                contributions=contributions_digest(cs),
            )
            for key, cs in partials
        ),
        key=lambda p: p.combiner,
    )
    made = replace(
        result(3),
        partials=tuple(refs),
        included=tuple(included),
        num_examples=600 * n,
        metrics={"loss": 0.3, "accuracy": 0.9, "eval_loss": 0.35, "eval_accuracy": 0.88},
    )
    # Execute
    sealed = seal_bytes(REDUCER_KEY, made)
    # Assert
    assert len(sealed) < limit, len(sealed)
    assert open_round_result(sealed) == made


def test_a_plan_or_result_beyond_the_client_limit_does_not_construct() -> None:
    clients, _ = crowd(MAX_PLAN_CLIENTS)
    too_many = tuple(sorted([k.peer_id for k in clients] + [OUTSIDER_KEY.peer_id]))
    with pytest.raises(ValueError, match="at most"):
        replace(plan(), assignments=(Assignment(combiner=C1, clients=too_many),))
    every = [*clients, OUTSIDER_KEY]
    contributions = sorted(
        (Contribution(signer=k.public_key, update=digest(k.seed), weight=1) for k in every),
        key=lambda c: c.signer,
    )
    with pytest.raises(ValueError, match="at most"):
        replace(result(1), included=tuple(contributions), num_examples=len(contributions))


def test_round_messages_must_be_sealed_by_the_reducer_they_name() -> None:
    for message, opener in (
        (plan(), open_round_plan),
        (result(1), open_round_result),
        (ended(), open_session_ended),
    ):
        assert opener(seal_bytes(REDUCER_KEY, message)) == message
        with pytest.raises(BadSignatureError, match="reducer"):
            opener(seal_bytes(OUTSIDER_KEY, message))


def test_a_result_rebuilds_its_global_model_under_the_same_signature_rules() -> None:
    # Prepare
    made = result(2, [update(K1, round=2)])
    # Execute
    model = made.global_model()
    opened, _ = open_envelope(seal_bytes(REDUCER_KEY, model), GlobalModel)
    # Assert
    assert opened == model
    assert (model.round, model.model, model.parent, model.partials) == (
        2,
        made.model,
        made.parent,
        made.partials,
    )
    assert model.num_examples == made.num_examples
    assert made.contribution_of(update(K1, round=2).signer) == made.included[0]
    assert made.contribution_of(OUTSIDER_KEY.public_key) is None


def test_plan_lookups() -> None:
    p = plan()
    assert p.combiner_of(K1) == C1
    assert p.combiner_of(OUTSIDER_KEY.peer_id) is None
    assert p.clients_of(C2) != () and p.clients_of(OUTSIDER_KEY.peer_id) == ()


# ------------------------------------------------------------------------- the protocol doc


@pytest.mark.parametrize("machine", [reducer_mod, combiner, client], ids=lambda m: m.__name__)
def test_rounds_md_draws_each_machines_table_and_diagram_from_the_code(machine: object) -> None:
    # Prepare
    text = ROUNDS_MD.read_text()
    # Execute
    table = machine.describe_transitions()  # type: ignore[attr-defined]
    diagram = machine.describe_states()  # type: ignore[attr-defined]
    # Assert
    assert table in text, f"protocols/rounds.md lacks the current table of {machine}"
    assert f"```mermaid\n{diagram}\n```" in text, f"rounds.md lacks the diagram of {machine}"
    assert table.count("\n") == len(machine.TRANSITIONS) + 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "reasons",
    [
        reducer_mod.PartialRejection,
        combiner.UpdateRejection,
        PlanRejection,
        ResultRejection,
    ],
    ids=lambda e: e.__name__,
)
def test_rounds_md_names_every_rejection_reason(reasons: type[enum.StrEnum]) -> None:
    text = ROUNDS_MD.read_text()
    for reason in reasons:
        assert f"`{reason.value}`" in text, f"rounds.md does not explain `{reason.value}`"


if __name__ == "__main__":
    for module in (reducer_mod, combiner, client):
        print(f"## {module.__name__}\n")
        print(f"```mermaid\n{module.describe_states()}\n```\n")
        print(module.describe_transitions(), "\n")
