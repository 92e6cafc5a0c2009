"""Where a combiner fetches a round's global model from, over the in-memory transport: when the
reducer that held it is gone, from the holders of the plan it follows now and from its own
clients, which fetch a small model straight from the reducer (a combiner used to retry the dead
reducer until its clients' updates gave up waiting for the model, 10 s)."""

from __future__ import annotations

from pathlib import Path

import trio
from federation_kit import FED, key, open_federation, session_config

from fednode.crypto import NodeKey
from fednode.node.combiner import CombinerDriver
from fednode.protocol.combiner import FetchModel
from fednode.wire import Assignment, Digest, FederationId, PeerId, RoundPlan, SessionId


def _plan(
    reducer: NodeKey, combiner: PeerId, client: PeerId, model: Digest, size: int
) -> RoundPlan:
    """Round 3 of a new term: ``combiner`` takes ``client``; only ``reducer`` holds the model."""
    cfg = session_config(min_clients=1)
    return RoundPlan(
        federation=FederationId(FED),
        session=SessionId("s1"),
        term=2,
        round=3,
        amendment=0,
        parent=model,
        parent_size=size,
        holders=(reducer.peer_id,),
        assignments=(Assignment(combiner=combiner, clients=(client,)),),
        min_clients=1,
        deadline_ms=10**13,
        config=cfg,
        reducer=reducer.public_key,
        created_ms=10**12,
    )


async def test_a_combiner_gets_the_model_from_its_client_when_the_holder_is_dead(
    tmp_path: Path,
) -> None:
    # Prepare: the plan's only holder is a reducer that is gone; the client holds the model
    async with open_federation(tmp_path) as fed:
        combiner = await fed.add("combiner", "combiner", 10)
        client = await fed.add("client", "client", 20)
        gone = key(1)
        data = b"global model" * 1000
        model = client.ctx.store.put(data)
        driver = CombinerDriver(combiner.ctx)
        plan = _plan(gone, combiner.ctx.peer, client.ctx.peer, model, len(data))
        with trio.fail_after(10):
            await client.host.connect(combiner.host.listen_addrs()[0])
        actions = driver.machine.on_plan(plan, trio.current_time())
        (fetch,) = [a for a in actions if isinstance(a, FetchModel)]
        # Execute
        with trio.fail_after(5):
            await driver._fetch_model(fetch, trio.CancelScope())
        # Assert
        assert combiner.ctx.store.has(model)
        assert client.ctx.blobs.statistics().served == 1
