"""Control-plane cost: heartbeat traffic per node per second, and connect-to-first-heartbeat time.

Runs N real fednode nodes (py-libp2p hosts, TCP + Noise + yamux + GossipSub) in one process on
loopback, each publishing a signed heartbeat every second, bootstrapped through node 0. After the
membership views converge it counts the bytes every node writes to its TCP sockets over a window
(all of it: gossip, IHAVE/IWANT, identify, ping, Noise and yamux framing). Prints one JSON object.

One process hosts all N nodes on 2 cores, so N is bounded by CPU rather than by the protocol; the
result reports, for each N, bytes per node per second and bytes per heartbeat delivered, and the
linear model it implies at 100 peers (every node receives every heartbeat, so traffic grows as N).

    python benchmarks/heartbeat.py --nodes 10 20 --window 10
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from libp2p.io.trio import TrioTCPStream

from fednode.crypto import NodeKey, seal_bytes
from fednode.net.libp2p_fastnoise import FastNoiseSession
from fednode.net.libp2p_host import open_libp2p_host
from fednode.node.config import NodeConfig
from fednode.node.runtime import Node, open_node
from fednode.protocol.membership import PeerState

SENT = {"bytes": 0}


def _count_writes() -> None:
    """Count every byte written to a TCP socket: libp2p's own stream wrapper (handshakes) and
    fednode's fast Noise session, which writes to the socket descriptor itself."""
    original = TrioTCPStream.write

    async def write(self: TrioTCPStream, data: bytes) -> None:
        SENT["bytes"] += len(data)
        await original(self, data)

    TrioTCPStream.write = write  # type: ignore[method-assign]
    original_send = FastNoiseSession._send

    async def send(self: FastNoiseSession, wire: memoryview) -> None:
        if self._socket is not None:  # otherwise it goes through TrioTCPStream.write
            SENT["bytes"] += len(wire)
        await original_send(self, wire)

    FastNoiseSession._send = send  # type: ignore[method-assign]


def _converged(nodes: list[Node]) -> bool:
    n = len(nodes)
    return all(
        sum(m.state is PeerState.ALIVE for m in node.view.members()) == n - 1 for node in nodes
    )


async def _first_heartbeat_time(boot_addr: str, tmp: Path) -> float:
    """From dialling the bootstrap to the first heartbeat accepted by a fresh node."""
    key = NodeKey.generate()
    config = NodeConfig(role="client", federation="bench", data_dir=tmp / "probe")
    async with open_libp2p_host(key, ()) as host:
        started = trio.current_time()
        async with open_node(config, key, host) as node:
            await host.connect(boot_addr)
            while node.view.statistics().accepted == 0:
                await trio.sleep(0.005)
            return trio.current_time() - started


async def run(n: int, window: float, tmp: Path) -> dict[str, float]:
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        boot_addr = ""
        for i in range(n):
            key = NodeKey.generate()
            host = await stack.enter_async_context(open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"]))
            config = NodeConfig(
                role="bootstrap" if i == 0 else "combiner",
                federation="bench",
                data_dir=tmp / f"n{n}-{i}",
                bootstrap=(boot_addr,) if i else (),
            )
            nodes.append(
                await stack.enter_async_context(open_node(config, key, host, rng=random.Random(i)))
            )
            boot_addr = boot_addr or host.listen_addrs()[0]
        t0 = trio.current_time()
        with trio.fail_after(120):
            while not _converged(nodes):
                await trio.sleep(0.1)
        converge = trio.current_time() - t0
        before, accepted_before = SENT["bytes"], sum(x.view.statistics().accepted for x in nodes)
        t1 = trio.current_time()
        await trio.sleep(window)
        elapsed = trio.current_time() - t1
        sent = SENT["bytes"] - before
        accepted = sum(x.view.statistics().accepted for x in nodes) - accepted_before
        first = [await _first_heartbeat_time(boot_addr, tmp) for _ in range(3)]
        hb_size = len(seal_bytes(nodes[1].key, nodes[1].make_heartbeat()))
        return {
            "nodes": n,
            "heartbeat_bytes": hb_size,
            "bytes_per_node_per_s": sent / n / elapsed,
            "heartbeats_accepted_per_node_per_s": accepted / n / elapsed,
            "bytes_per_heartbeat_delivered": sent / max(1, accepted),
            "converge_seconds": converge,
            "connect_to_first_heartbeat_s": statistics.median(first),
        }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    _count_writes()
    with tempfile.TemporaryDirectory() as tmp:
        results = [await run(n, args.window, Path(tmp)) for n in args.nodes]
    per_hb = max(r["bytes_per_heartbeat_delivered"] for r in results)
    return {
        "benchmark": "fednode heartbeat traffic",
        "interval_s": 1.0,
        "runs": results,
        # Every node receives each of the other N-1 heartbeats every interval; the measured bytes
        # per delivered heartbeat (gossip amplification, IHAVE, framing) carry over.
        "model_at_100_peers_bytes_per_node_per_s": round(per_hb * 99),
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 20])
    parser.add_argument(
        "--window", type=float, default=10.0, help="seconds of steady state to measure"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    result = trio.run(main_async, args)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
