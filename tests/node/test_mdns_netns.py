"""Real mDNS over real multicast: two ``fednode start --mdns`` combiners, each in a network
namespace of its own joined by a veth pair, find each other with no bootstrap address (one
listens on its veth address, the other on the wildcard address, which it announces as its veth
address and not loopback); a client with no inbound port (it announces nothing, it only
listens) finds both.

All traffic stays inside the namespaces this test creates: the nodes cannot see the machine's
real interfaces, so no multicast ever leaves on them. Needs root and iproute2's ``ip``; waits are
on the nodes' own log lines, never on the clock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fednode.scenario.processes import NodeProcess

pytestmark = [pytest.mark.libp2p, pytest.mark.timeout(90)]

WAIT = 45.0  # seconds for each awaited log line; the hard timeout above bounds the whole test
SUBNET = "10.231.0"  # private to the namespaces: nothing outside them routes it
LISTEN = [f"/ip4/{SUBNET}.1/tcp/0", "/ip4/0.0.0.0/tcp/0"]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextmanager
def two_namespaces_on_a_veth() -> Iterator[list[tuple[str, str]]]:
    """Two fresh namespaces joined by a veth pair (``<ns>``, ``<address>``); both are deleted
    on exit, which deletes the veth pair with them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` (apt-get install iproute2)")
    tag = f"{os.getpid() % 100_000}"
    names = [f"fednode{tag}a", f"fednode{tag}b"]
    created: list[str] = []
    try:
        for name in names:
            try:
                _ip("netns", "add", name)
            except OSError as exc:
                pytest.skip(f"cannot create a network namespace here: {exc}")
            created.append(name)
        links = [f"fnv{tag}a", f"fnv{tag}b"]
        _ip("link", "add", links[0], "netns", names[0], "type", "veth",
            "peer", "name", links[1], "netns", names[1])  # fmt: skip
        ends = []
        for i, (name, link) in enumerate(zip(names, links, strict=True)):
            address = f"{SUBNET}.{i + 1}"
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "multicast", "on", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            ends.append((name, address))
        yield ends
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def lan() -> Iterator[list[tuple[str, str]]]:
    with two_namespaces_on_a_veth() as ends:
        yield ends


def _node(namespace: str, data_dir: Path, *flags: str) -> NodeProcess:
    return NodeProcess(
        data_dir,
        *("--mdns", "--heartbeat-interval", "0.5", *flags),
        wait=WAIT,
        command_prefix=("ip", "netns", "exec", namespace),
    )


def test_nodes_on_one_lan_find_each_other_with_mdns_and_no_bootstrap(
    tmp_path: Path, lan: list[tuple[str, str]]
) -> None:
    # Prepare: fresh data directories (empty peerstores), no --bootstrap
    nodes: list[NodeProcess] = []
    try:
        for i, (listen, (namespace, _)) in enumerate(zip(LISTEN, lan, strict=True)):
            nodes.append(
                _node(namespace, tmp_path / f"n{i}", "--role", "combiner", "--listen", listen)
            )
        a, b = nodes
        client = _node(lan[1][0], tmp_path / "client", "--role", "client")
        nodes.append(client)

        # Execute: nothing but waiting for what each node says
        for node, other, (_, other_address) in ((a, b, lan[1]), (b, a, lan[0])):
            node.wait_for("PeerDiscovered", other.peer_id, f"/ip4/{other_address}/tcp/")
            node.wait_for("PeerJoined", other.peer_id)
        for combiner, (_, address) in zip((a, b), lan, strict=True):
            client.wait_for("PeerDiscovered", combiner.peer_id, f"/ip4/{address}/tcp/")
            client.wait_for("PeerJoined", combiner.peer_id)
            combiner.wait_for("PeerJoined", client.peer_id)
        codes = [node.stop() for node in nodes]
    finally:
        for node in nodes:
            node.stop()

    # Assert: found through mDNS at the namespace addresses, then joined; the client, which has
    # no address, was never announced; everyone stopped cleanly (goodbyes, zeroconf closed)
    assert a.addr.startswith(f"/ip4/{lan[0][1]}/tcp/")
    assert codes == [0, 0, 0]
    logs = [node.stderr_after_exit() for node in nodes]
    assert not any("Traceback" in log for log in logs)
    assert not any(f"PeerDiscovered {client.peer_id}" in log for log in logs)
    discovered = [line for log in logs for line in log.splitlines() if "PeerDiscovered" in line]
    assert discovered and not any("/ip4/127." in line for line in discovered)
