"""Federated training end to end over the in-memory transport: the real reducer, combiner and
client drivers, signed plans and results on gossip, updates and partials on the push protocols,
models on the blob protocol. The clock is trio's real one; every wait is on an event."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from federation_kit import (
    INTERVAL,
    LINREG,
    Outcome,
    key,
    open_federation,
    run_session,
    session_config,
)

from fednode.crypto import NodeKey, digest, seal_bytes
from fednode.errors import ConfigError
from fednode.net.blob import fetch_blob
from fednode.net.interface import Host
from fednode.net.push import PushResult, push_partial, push_update
from fednode.node.combiner import CombinerDriver
from fednode.node.context import decode_model, encode_model
from fednode.node.reducer import ReducerDriver
from fednode.node.session import load_session
from fednode.protocol.membership import PeerState
from fednode.task import TrainConfig, TrainResult, load_task
from fednode.task.reference import run_reference
from fednode.task.runner import TaskRunner
from fednode.wire import (
    Contribution,
    Envelope,
    FederationId,
    Model,
    ModelUpdate,
    Nonce,
    PartialAggregate,
    RoundPlan,
    SessionEnded,
    SessionId,
)

pytestmark = pytest.mark.timeout(120)


def _assert_every_client_once(outcome: Outcome, rounds: int) -> None:
    clients = {m.key.public_key for m in outcome.clients}
    assert [r.round for r in outcome.results] == list(range(1, rounds + 1))
    for result in outcome.results:
        signers = [c.signer for c in result.included]
        assert len(signers) == len(set(signers))
        assert set(signers) == clients


def _assert_close_to_reference(outcome: Outcome, final: dict[str, np.ndarray], task: str) -> None:
    config = outcome.reducer_driver.config
    history = run_reference(
        load_task(task),
        clients=len(outcome.clients),
        rounds=config.rounds,
        config=TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr),
        scheme=config.partition,
        alpha=config.alpha,
        seed=config.seed,
    )
    expected = history[-1].model
    assert list(final) == list(expected)
    for name, array in expected.items():
        scale = float(np.max(np.abs(array))) or 1.0
        np.testing.assert_allclose(final[name], array, rtol=1e-6, atol=1e-6 * scale)


async def test_a_session_completes_and_equals_flat_fedavg(tmp_path: Path) -> None:
    # Prepare
    config = session_config(rounds=2, min_clients=4)
    # Execute
    outcome = await run_session(tmp_path, config, clients=4, combiners=2)
    final = await outcome.final_model()
    # Assert
    assert outcome.ended.outcome == "completed" and outcome.ended.rounds == 2
    _assert_every_client_once(outcome, 2)
    assert all(len(r.partials) == 2 for r in outcome.results)  # both combiners took clients
    _assert_close_to_reference(outcome, final, LINREG)
    events = outcome.reducer.events
    assert [e["round"] for e in events.named("round-completed")] == [1, 2]
    assert all(e["accuracy"] is not None for e in events.named("round-completed"))
    assert events.named("session-completed")[0]["model"] == outcome.ended.model.hex()
    for client in outcome.clients:
        assert [e["round"] for e in client.events.named("update-included")] == [1, 2]
    pushed = sum(len(m.events.named("partial-pushed")) for m in outcome.combiners)
    assert pushed == 4


async def test_auto_nodes_elected_combiners_count_their_own_update_once(tmp_path: Path) -> None:
    # Prepare: no combiner at all; four auto nodes with room for two clients each, so the
    # reducer must elect two of them, each aggregating itself and one other.
    config = session_config(rounds=2, min_clients=4)
    # Execute
    outcome = await run_session(tmp_path, config, clients=0, combiners=0, autos=4)
    final = await outcome.final_model()
    # Assert
    assert outcome.ended.outcome == "completed" and outcome.ended.rounds == 2
    _assert_every_client_once(outcome, 2)
    autos = {m.key.public_key for m in outcome.clients}
    for result in outcome.results:
        assert len(result.partials) == 2
        assert {p.combiner for p in result.partials} <= autos
    _assert_close_to_reference(outcome, final, LINREG)
    pushes = [a.combiner.push_server.statistics() for a in outcome.autos if a.combiner.push_server]
    # Each elected auto node took its own update without a stream, once a round, and one
    # other node's over the wire: 2 rounds x 2 combiners local, 2 x 4 stored in all.
    assert sum(s.local for s in pushes) == 4
    assert sum(s.stored for s in pushes) == 8
    assert sum(s.rejected for s in pushes) == 0


async def test_the_digits_task_trains_to_the_reference(tmp_path: Path) -> None:
    # Prepare: the built-in torch task, small
    config = session_config(
        task="fednode.task.digits", rounds=2, min_clients=4, epochs=1, batch_size=32, lr=0.5
    )
    # Execute
    outcome = await run_session(tmp_path, config, clients=4, combiners=2)
    final = await outcome.final_model()
    # Assert
    assert outcome.ended.outcome == "completed"
    _assert_every_client_once(outcome, 2)
    _assert_close_to_reference(outcome, final, "fednode.task.digits")
    completed = outcome.reducer.events.named("session-completed")[0]
    assert isinstance(completed["final_accuracy"], float) and completed["final_accuracy"] > 0.5


class BlockingRunner(TaskRunner):
    """A client whose training never finishes until :meth:`release`: a straggler."""

    def __init__(self, spec: str) -> None:
        super().__init__(spec, mode="thread")
        self.released = threading.Event()
        self.calls = 0

    def train(self, params: Model, config: TrainConfig) -> TrainResult:
        self.calls += 1
        self.released.wait()
        return super().train(params, config)

    def close(self) -> None:
        self.released.set()
        super().close()


async def test_a_straggler_is_left_out_and_rounds_close_with_min_clients(tmp_path: Path) -> None:
    # Prepare: client 0 never finishes training; three clients suffice
    deadline = 2.0
    config = session_config(rounds=2, min_clients=3, round_deadline=deadline)
    straggler = BlockingRunner(LINREG)

    def runner(index: int) -> TaskRunner:
        return straggler if index == 0 else TaskRunner(LINREG, mode="thread")

    # Execute
    outcome = await run_session(tmp_path, config, clients=4, runner=runner)
    # Assert
    late = outcome.clients[0]
    assert outcome.ended.outcome == "completed" and outcome.ended.rounds == 2
    assert straggler.calls >= 1
    for result in outcome.results:
        included = {c.signer for c in result.included}
        assert late.key.public_key not in included
        assert included == {m.key.public_key for m in outcome.clients[1:]}
    # The straggler's combiner gave up on it at its cut-off, the deadline minus 10 %.
    for event in outcome.reducer.events.named("round-completed"):
        assert isinstance(event["seconds"], float) and event["seconds"] >= 0.85 * deadline
    assert late.events.named("update-pushed") == []


def _update(
    signer: NodeKey, plan: RoundPlan, blob: bytes, **changes: Any
) -> tuple[ModelUpdate, bytes]:
    fields: dict[str, Any] = {
        "federation": plan.federation,
        "session": plan.session,
        "round": plan.round,
        "parent": plan.parent,
        "update": digest(blob),
        "size": len(blob),
        "num_examples": 10,
        "metrics": {"loss": 1.0},
        "signer": signer.public_key,
        "created_ms": plan.created_ms,
        "nonce": Nonce(bytes(16)),
    }
    fields.update(changes)
    update = ModelUpdate(**fields)
    return update, seal_bytes(signer, update)


async def test_bad_updates_and_partials_are_refused_before_their_bytes(tmp_path: Path) -> None:
    # Prepare: a reducer, one combiner and two clients that run no driver: the test pushes for them
    config = session_config(rounds=1, min_clients=2, round_deadline=60.0, eval_every=0)
    async with open_federation(tmp_path) as fed:
        reducer = await fed.add("reducer", "reducer", 1)
        combiner = await fed.add("combiner", "combiner", 10)
        k1, k2 = [await fed.add(f"client-{i}", "client", 20 + i) for i in range(2)]
        outsider_key = key(99)
        outsider = await fed.stack.enter_async_context(fed.net.open_host(outsider_key))
        reducer_driver = ReducerDriver(reducer.ctx, config, "s1", runner=None, wait_for=2)
        combiner_driver = CombinerDriver(combiner.ctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(combiner_driver.run)
            nursery.start_soon(reducer_driver.run)
            with trio.fail_after(30):
                plan = await combiner_driver.wait_for_plan(1)
            assert set(plan.clients_of(combiner.ctx.peer)) == {k1.ctx.peer, k2.ctx.peer}
            target = combiner.ctx.peer
            for member in (k1, k2):
                await member.host.connect(combiner.host.listen_addrs()[0])
            await outsider.connect(combiner.host.listen_addrs()[0])
            await fetch_blob(
                k1.host, [reducer.ctx.peer], plan.parent, k1.ctx.store, max_size=plan.parent_size
            )
            parent, _ = decode_model(k1.ctx.store.get(plan.parent))
            good = encode_model({n: a + 1 for n, a in parent.items()})
            other = encode_model({n: a + 2 for n, a in parent.items()})

            async def push(host: Host, sealed: bytes, blob: bytes) -> PushResult:
                return await push_update(host, target, sealed, blob)

            # Execute
            stored = await push(k1.host, _update(k1.key, plan, good)[1], good)
            refused = {
                "duplicate": await push(k1.host, _update(k1.key, plan, other)[1], other),
                "unassigned": await push(outsider, _update(outsider_key, plan, good)[1], good),
                "next round": await push(k2.host, _update(k2.key, plan, good, round=2)[1], good),
                "old round": await push(k2.host, _update(k2.key, plan, good, round=0)[1], good),
                "wrong parent": await push(
                    k2.host, _update(k2.key, plan, good, parent=digest(b"x"))[1], good
                ),
            }
            again = await push(k1.host, _update(k1.key, plan, good)[1], good)
            partial = PartialAggregate(
                federation=plan.federation,
                session=plan.session,
                round=1,
                parent=plan.parent,
                partial=digest(good),
                size=len(good),
                contributions=(
                    Contribution(signer=k2.key.public_key, update=digest(good), weight=10),
                ),
                total_weight=10,
                combiner=outsider_key.public_key,
                created_ms=plan.created_ms,
                nonce=Nonce(bytes(16)),
            )
            await outsider.connect(reducer.host.listen_addrs()[0])
            foreign = await push_partial(
                outsider, reducer.ctx.peer, seal_bytes(outsider_key, partial), good
            )
            nursery.cancel_scope.cancel()
    # Assert
    assert stored.status == "stored" and stored.bytes_sent == len(good)
    assert {k: (r.status, r.reason, r.bytes_sent) for k, r in refused.items()} == {
        "duplicate": ("refused", "duplicate", 0),
        "unassigned": ("refused", "not-assigned", 0),
        "next round": ("refused", "early", 0),
        "old round": ("refused", "stale", 0),
        "wrong parent": ("refused", "wrong-parent", 0),
    }
    assert (again.status, again.bytes_sent) == ("already-held", 0)  # "have": counted once
    assert (foreign.status, foreign.reason, foreign.bytes_sent) == ("refused", "not-assigned", 0)
    assert combiner_driver.push_server is not None
    assert combiner_driver.push_server.statistics().bytes_received == len(good)
    assert reducer_driver.partial_server is not None
    assert reducer_driver.partial_server.statistics().bytes_received == 0
    assert combiner_driver.machine.statistics().counted == 1


def test_reducer_and_combiner_drivers_never_import_torch() -> None:
    # Execute: a fresh interpreter loads what `fednode start --role reducer|combiner` loads, and
    # builds the digits task's initial model as the reducer does
    code = (
        "import sys, fednode.cli.start, fednode.node.reducer, fednode.node.combiner;"
        " from fednode.task import load_task;"
        " load_task('fednode.task.digits').initial_params(0);"
        " print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    loaded = set(out.stdout.split())
    assert "fednode" in loaded and "trio" in loaded
    assert not loaded & {"torch", "sklearn"}


async def test_a_round_that_stays_short_fails_the_session_saying_why(tmp_path: Path) -> None:
    # Prepare: two clients, both needed, one never finishes; one retry
    config = session_config(rounds=2, min_clients=2, round_deadline=1.0, max_retries=1)
    straggler = BlockingRunner(LINREG)

    def runner(index: int) -> TaskRunner:
        return straggler if index == 0 else TaskRunner(LINREG, mode="thread")

    # Execute
    outcome = await run_session(tmp_path, config, clients=2, combiners=1, runner=runner)
    # Assert
    assert outcome.ended.outcome == "failed" and outcome.ended.rounds == 0
    assert outcome.results == []
    failed = outcome.reducer.events.named("session-failed")
    assert len(failed) == 1 and failed[0]["reason"] == outcome.ended.reason
    assert "round 1 fell short after 1 retries" in outcome.ended.reason
    assert outcome.reducer.events.named("session-completed") == []


def test_session_settings_come_from_a_toml_file_and_flags_win(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "session.toml"
    path.write_text(
        '[session]\nid = "digits-1"\nrounds = 7\nround_deadline = 2.5\n'
        'server_optimizer = "fedadam"\npartition = "dirichlet"\nalpha = 0.3\n'
    )
    # Execute
    name, config = load_session(path, rounds=3, epochs=None)
    # Assert
    assert name == "digits-1"
    assert (config.rounds, config.round_deadline_ms, config.epochs) == (3, 2500, 5)
    assert (config.server_optimizer, config.server_lr) == ("fedadam", 0.01)
    assert (config.partition, config.alpha) == ("dirichlet", 0.3)
    for bad in ({"rounds": 2.5}, {"partition": "skewed"}, {"bogus": 1}, {"min_clients": 0}):
        with pytest.raises(ConfigError):
            load_session(None, **bad)


async def test_a_control_message_sent_straight_to_a_peer_reaches_its_role_driver(
    tmp_path: Path,
) -> None:
    # Prepare: two nodes; the receiver's driver is a list
    async with open_federation(tmp_path) as fed:
        sender = await fed.add("reducer", "reducer", 1)
        receiver = await fed.add("combiner", "combiner", 10)
        got: list[tuple[Envelope, str]] = []
        arrived = trio.Event()

        def handler(envelope: Envelope, source: str) -> None:
            got.append((envelope, source))
            arrived.set()

        receiver.ctx.node.on_control(handler)
        sealed = seal_bytes(sender.key, ended_message(sender.key))
        # Execute
        with trio.fail_after(10):
            await sender.host.connect(receiver.host.listen_addrs()[0])
            await sender.ctx.node.send_control(receiver.ctx.peer, sealed)
            await arrived.wait()
    # Assert
    ((envelope, source),) = got
    assert source == sender.ctx.peer
    assert receiver.ctx.open_round_message(envelope, source) == ended_message(sender.key)


def ended_message(signer: NodeKey) -> SessionEnded:
    return SessionEnded(
        federation=FederationId("fed"),
        session=SessionId("s1"),
        term=0,
        outcome="completed",
        rounds=1,
        model=digest(b"model"),
        reason="",
        reducer=signer.public_key,
        created_ms=1,
    )


async def test_a_plan_waits_for_peers_the_failure_detector_declared_dead_too_soon(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Under CPU load live peers' heartbeats run late and the detector declares them dead; a plan
    made right then would hold too few clients to finish. The reducer waits for them (on a
    virtual clock: every time below is exact)."""
    # Prepare: a reducer that sees two clients and a combiner, then loses them all
    async with open_federation(tmp_path) as fed:
        reducer = await fed.add("reducer", "reducer", 1)
        others = [
            await fed.add("combiner", "combiner", 10),
            *[await fed.add(f"client-{i}", "client", 20 + i) for i in range(2)],
        ]
        driver = ReducerDriver(reducer.ctx, session_config(min_clients=2, eval_every=0), "s1")
        reducer.ctx.node.on_membership(driver._on_membership)  # as run() does
        view = reducer.ctx.node.view

        async def states_become(state: PeerState) -> None:
            while any(
                (m := view.member(o.ctx.peer)) is None or m.state is not state for o in others
            ):
                await trio.sleep(INTERVAL / 10)

        with trio.fail_after(30):
            await states_become(PeerState.ALIVE)
            assert not driver.short_of_peers()
            net_cut = [[reducer.ctx.peer], [o.ctx.peer for o in others]]
            fed.net.partition(net_cut)
            await states_become(PeerState.DEAD)
            assert driver.short_of_peers()
            # Execute: the peers come back 0.2 s into the wait (the partition heals: they redial)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def heal_soon() -> None:
                    await trio.sleep(0.2)
                    fed.net.heal()

                nursery.start_soon(heal_soon)
                await driver.wait_for_planning_peers()
            came_back = trio.current_time() - started
            # ... and when they stay away, the plan goes ahead after plan_wait
            fed.net.partition(net_cut)
            await states_become(PeerState.DEAD)
            started = trio.current_time()
            await driver.wait_for_planning_peers()
            gave_up = trio.current_time() - started
    # Assert
    assert driver.plan_wait == pytest.approx(5 * INTERVAL)  # the detector's silence-to-death
    assert 0.2 < came_back < driver.plan_wait
    assert gave_up == pytest.approx(driver.plan_wait)
