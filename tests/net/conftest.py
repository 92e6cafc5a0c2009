"""Fixtures for the net contract suite: the same tests run on every transport.

``make_host`` opens hosts that live until the test ends, each in its own task of a nursery the
fixture owns; at teardown every host leaves its context and the fixture checks that no task
outlived it. Memory tests run on an autojumping ``MockClock`` (request the ``clock`` fixture so
pytest-trio uses it); libp2p tests run on the real clock under a hard per-test timeout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from fednode.crypto import NodeKey
from fednode.net.interface import Host
from fednode.net.memory import MemoryNetwork

LIBP2P_MODULE = "fednode.net.libp2p_host"
LIBP2P_TIMEOUT = 60  # seconds, per test: real sockets can hang, MockClock cannot
CLOSE_TIMEOUT = 20  # seconds for every host to leave its context at teardown
MEMORY_STREAM_BUFFER = 64 * 1024

Opener = Callable[[NodeKey], AbstractAsyncContextManager[Host]]


class HostFactory:
    """``await make_host()`` opens a new host on the test's transport, with a fresh key."""

    def __init__(
        self, transport: str, nursery: trio.Nursery, opener: Opener, network: MemoryNetwork | None
    ) -> None:
        self.transport = transport
        self.network = network  # the MemoryNetwork behind the memory transport, else None
        self.stream_buffer = MEMORY_STREAM_BUFFER if network is not None else None
        self._nursery = nursery
        self._opener = opener
        self._closing = trio.Event()

    async def __call__(self) -> Host:
        host: Host = await self._nursery.start(self._keep_open, NodeKey.generate())
        return host

    async def _keep_open(self, key: NodeKey, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with self._opener(key) as host:
            task_status.started(host)
            await self._closing.wait()

    def close_all(self) -> None:
        self._closing.set()


def _opener_for(transport: str) -> tuple[Opener, MemoryNetwork | None]:
    if transport == "memory":
        network = MemoryNetwork(seed=1, stream_buffer=MEMORY_STREAM_BUFFER)
        return network.open_host, network
    libp2p_host = importlib.import_module(LIBP2P_MODULE)

    def open_libp2p(key: NodeKey) -> AbstractAsyncContextManager[Host]:
        opened: AbstractAsyncContextManager[Host] = libp2p_host.open_libp2p_host(
            key, listen_addrs=["/ip4/127.0.0.1/tcp/0"]
        )
        return opened

    return open_libp2p, None


def _all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return tasks


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("libp2p", marks=[pytest.mark.libp2p, pytest.mark.timeout(LIBP2P_TIMEOUT)]),
    ]
)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    # Skip only while the adapter does not exist; once it does, import errors are failures.
    # (Here, outside trio.run, so pytest reports the reason.)
    if name == "libp2p" and importlib.util.find_spec(LIBP2P_MODULE) is None:
        pytest.skip(f"{LIBP2P_MODULE} is not written yet")
    return name


@pytest.fixture
def clock(transport: str) -> MockClock | None:
    """A clock that jumps ahead whenever every task waits, for the memory transport only."""
    return MockClock(autojump_threshold=0) if transport == "memory" else None


@pytest.fixture
async def make_host(transport: str) -> AsyncIterator[HostFactory]:
    opener, network = _opener_for(transport)
    before = _all_tasks()
    with trio.CancelScope() as teardown:
        async with trio.open_nursery() as nursery:
            factory = HostFactory(transport, nursery, opener, network)
            yield factory
            teardown.deadline = trio.current_time() + CLOSE_TIMEOUT
            factory.close_all()
    if teardown.cancelled_caught:
        pytest.fail(f"{transport} hosts did not close within {CLOSE_TIMEOUT} s")
    leaked = {task.name for task in _all_tasks() - before}
    assert not leaked, f"tasks outlived their hosts: {sorted(leaked)}"
