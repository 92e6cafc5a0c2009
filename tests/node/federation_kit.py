"""A federation on the in-memory transport for the round-driver tests: a reducer that is also the
bootstrap, combiners and clients, each a real :class:`~fednode.node.runtime.Node` with its own
blob store, driven by the real role drivers. The clock is trio's real one (the task runners use
threads); every wait is on an event, bounded by ``fail_after``."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from fednode.crypto import NodeKey, open_envelope
from fednode.net.blobstore import BlobStore
from fednode.net.interface import Host
from fednode.net.memory import MemoryNetwork
from fednode.node.auto import AutoDriver
from fednode.node.client import ClientDriver
from fednode.node.combiner import CombinerDriver
from fednode.node.config import NodeConfig
from fednode.node.context import Activity, RoleContext, load_model
from fednode.node.events import EventLog
from fednode.node.reducer import ReducerDriver
from fednode.node.runtime import open_node
from fednode.node.session import load_session
from fednode.task import load_task
from fednode.task.runner import TaskRunner
from fednode.wire import RoundResult, SessionConfig, SessionEnded

LINREG = str(Path(__file__).parent / "linreg_task.py")
FED = "fed"
INTERVAL = 0.1  # heartbeat period, seconds


def session_config(**changes: Any) -> SessionConfig:
    settings: dict[str, Any] = {
        "rounds": 2,
        "min_clients": 4,
        "round_deadline": 30.0,
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.05,
        "eval_every": 1,
        "seed": 3,
        "task": LINREG,
    }
    settings.update(changes)
    _, config = load_session(None, **settings)
    return config


def key(n: int) -> NodeKey:
    return NodeKey(bytes([n]) * 32)


@dataclass
class Member:
    name: str
    key: NodeKey
    host: Host
    ctx: RoleContext

    @property
    def events(self) -> EventLog:
        return self.ctx.events


@dataclass
class Federation:
    """Open nodes on one :class:`MemoryNetwork`; the reducer's host is everyone's bootstrap."""

    root: Path
    stack: AsyncExitStack
    net: MemoryNetwork = field(default_factory=lambda: MemoryNetwork(seed=1))
    members: list[Member] = field(default_factory=list)
    bootstrap: tuple[str, ...] = ()

    async def add(self, name: str, role: str, n: int, *, capacity: int = 10) -> Member:
        node_key = key(n)
        host = await self.stack.enter_async_context(
            self.net.open_host(node_key, listen=role != "client")
        )
        config = NodeConfig(
            role=role,  # type: ignore[arg-type]
            federation=FED,
            data_dir=self.root / name,
            bootstrap=self.bootstrap,
            heartbeat_interval=INTERVAL,
            capacity=capacity,
        )
        activity = Activity()
        node = await self.stack.enter_async_context(
            open_node(config, node_key, host, load=activity.load())
        )
        store = BlobStore(config.data_dir, durable=False)
        ctx = RoleContext(node, store, events=EventLog(), activity=activity)
        member = Member(name, node_key, host, ctx)
        self.members.append(member)
        if not self.bootstrap and host.listen_addrs():
            self.bootstrap = (host.listen_addrs()[0],)
        return member


@asynccontextmanager
async def open_federation(root: Path) -> AsyncIterator[Federation]:
    async with AsyncExitStack() as stack:
        yield Federation(root, stack)


@dataclass
class Outcome:
    ended: SessionEnded
    reducer: Member
    reducer_driver: ReducerDriver
    combiners: list[Member]
    clients: list[Member]  #: every node with data, the ``auto`` ones last
    results: list[RoundResult]
    autos: list[AutoDriver] = field(default_factory=list)

    async def final_model(self) -> dict[str, np.ndarray[Any, Any]]:
        params, _ = await load_model(self.reducer.ctx.store, self.ended.model)
        return params


def read_results(driver: ReducerDriver, reducer: Member) -> list[RoundResult]:
    """The round results the reducer wrote, each opened (signature checked) and by it."""
    results = []
    for path in sorted(driver.results_dir.glob("round-*.result")):
        result, envelope = open_envelope(path.read_bytes(), RoundResult)
        assert envelope.signer == reducer.key.public_key
        results.append(result)
    return results


def thread_runner(task: str) -> Callable[[int], TaskRunner]:
    return lambda index: TaskRunner(task, mode="thread")


async def run_session(
    root: Path,
    config: SessionConfig,
    *,
    clients: int = 4,
    combiners: int = 2,
    autos: int = 0,
    auto_capacity: int = 2,
    runner: Callable[[int], TaskRunner] | None = None,
    wait_included: bool = True,
    limit: float = 90.0,
) -> Outcome:
    """Run one session to its end: the reducer, ``combiners`` combiners and ``clients``
    clients, then ``autos`` nodes of role ``auto`` (capacity ``auto_capacity``); data node ``i``
    trains partition ``i`` of ``clients + autos``. With ``wait_included``, also wait until every
    data node saw each of its updates that a result counts included."""
    make_runner = runner or thread_runner(config.task)
    # Loaded once up front: thread-mode runners loading one task file side by side can see it
    # half-imported (fednode.task.api registers a file's module before running it).
    load_task(config.task)
    async with open_federation(root) as fed:
        reducer = await fed.add("reducer", "reducer", 1)
        combiner_members = [
            await fed.add(f"combiner-{i}", "combiner", 10 + i) for i in range(combiners)
        ]
        client_members = [await fed.add(f"client-{i}", "client", 20 + i) for i in range(clients)]
        auto_members = [
            await fed.add(f"auto-{i}", "auto", 40 + i, capacity=auto_capacity) for i in range(autos)
        ]
        data = clients + autos
        runners = [make_runner(i) for i in range(data)]
        auto_drivers = [
            AutoDriver(
                member.ctx, runners[clients + i], partition_index=clients + i, partition_count=data
            )
            for i, member in enumerate(auto_members)
        ]
        reducer_driver = ReducerDriver(
            reducer.ctx,
            config,
            "s1",
            runner=TaskRunner(config.task, mode="thread"),
            wait_for=data,
            wait_for_combiners=max(combiners, 1),
        )
        try:
            async with trio.open_nursery() as nursery:
                for member in combiner_members:
                    nursery.start_soon(CombinerDriver(member.ctx).run)
                for i, member in enumerate(client_members):
                    driver = ClientDriver(
                        member.ctx, runners[i], partition_index=i, partition_count=data
                    )
                    nursery.start_soon(driver.run)
                for auto in auto_drivers:
                    nursery.start_soon(auto.run)
                client_members += auto_members
                with trio.fail_after(limit):
                    ended = await reducer_driver.run()
                    results = read_results(reducer_driver, reducer)
                    for member in client_members if wait_included else ():
                        rounds = [r for r in results if r.contribution_of(member.key.public_key)]
                        await member.events.wait_for("update-included", len(rounds))
                nursery.cancel_scope.cancel()
        finally:
            for task_runner in runners:
                task_runner.close()
        return Outcome(
            ended=ended,
            reducer=reducer,
            reducer_driver=reducer_driver,
            combiners=combiner_members,
            clients=client_members,
            results=results,
            autos=auto_drivers,
        )


def replace_config(config: SessionConfig, **changes: Any) -> SessionConfig:
    return dataclasses.replace(config, **changes)
