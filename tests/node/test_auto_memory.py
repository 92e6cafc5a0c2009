"""A federation of ``auto`` nodes only, over the in-memory transport: given the session, the
best-ranked one starts it once its grace period ends (no explicit reducer in sight), leads it and
trains no more; the others train, two of them elected combiners."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from federation_kit import open_federation, session_config

from fednode.node.auto import AutoDriver
from fednode.task import load_task
from fednode.task.runner import TaskRunner

pytestmark = pytest.mark.timeout(120)


async def test_auto_nodes_alone_elect_one_to_start_and_lead_the_session(tmp_path: Path) -> None:
    # Prepare: four auto nodes, each given the same session; room for two clients each
    config = session_config(rounds=2, min_clients=3)
    load_task(config.task)
    async with open_federation(tmp_path) as fed:
        members = [await fed.add(f"auto-{i}", "auto", 40 + i, capacity=2) for i in range(4)]
        runners = [TaskRunner(config.task, mode="thread") for _ in members]
        drivers = [
            AutoDriver(
                m.ctx,
                runners[i],
                partition_index=i,
                partition_count=4,
                session=("s-auto", config),
                wait_for=3,
                exit_after_session=True,
            )
            for i, m in enumerate(members)
        ]
        try:
            # Execute
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for driver in drivers:
                        nursery.start_soon(driver.run)
        finally:
            for runner in runners:
                runner.close()
    # Assert: exactly one led, term 1, and the session completed with the three others
    leaders = [d for d in drivers if d.led is not None]
    assert len(leaders) == 1
    (leader,) = leaders
    assert leader.led is not None and leader.led.outcome == "completed"
    index = drivers.index(leader)
    elected = members[index].events.named("reducer-elected")
    assert [e["term"] for e in elected] == [1]
    completed = members[index].events.named("round-completed")
    assert [e["clients_included"] for e in completed] == [3, 3]
    assert members[index].events.named("update-pushed") == []  # a leader trains no more
    for i, member in enumerate(members):
        if i != index:
            assert [e["round"] for e in member.events.named("update-included")] == [1, 2]
