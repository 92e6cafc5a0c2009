"""Data-plane throughput: one blob over fednode's libp2p data plane, over a stock py-libp2p stream,
and over raw trio TCP, measured in one run on loopback.

Measurements (best of ``--repeat``; MB = 10**6 bytes; the payload is ``--size-mb`` random MB):

* ``ours``: :func:`fednode.net.blob.fetch_blob` between two fednode hosts
  (``open_libp2p_host``; ``serve_blobs`` on the holder, a fresh :class:`BlobStore` per fetch on
  the fetcher). Timed from the call to its return: stream open, request and response, every
  1 MiB chunk hashed against the holder's list, written to the store and committed. This is the
  real data plane and the headline (``ratio_vs_raw``). Stores are not fsynced (``durable=False``:
  this measures the network path, not the disk); the holder's chunk list is computed before the
  first fetch (it is cached in the store, as it is for any blob served twice).
* ``ours_stream``: the same two hosts, a raw stream through fednode's ``Host`` interface without
  the blob protocol: 1 MiB ``send_all`` calls, ``send_eof``, the receiver reads 1 MiB at a time
  and answers an 8-byte count; timed from the first write to the count.
* ``stock``: two ``libp2p.new_host`` hosts with the library defaults (Noise + yamux negotiated),
  the stock usage: 64 KiB ``write`` calls, ``close_write``, ``read`` until ``StreamEOF``, then the
  count. ``stock_1mib`` is the same with 1 MiB writes (the notes' best stock figure).
* ``raw_tcp``: ``trio.open_tcp_stream`` / ``trio.serve_tcp``, 1 MiB writes, the same count.

By default both ends run in this process (one core does all the work, as in the notes' figures);
``--two-processes`` puts every receiver (the fetcher, the sinks) in a child process, so sender
and receiver each get a core. ``--no-fastpath`` builds fednode's hosts without
:mod:`fednode.net.libp2p_fastpath` (stock py-libp2p Noise and yamux), for an A/B comparison.
``--profile NAME`` runs one extra transfer of NAME (``ours``, ``ours_stream``, ``stock``) under
cProfile in one process and prints the top functions by own time to stderr.

Prints one JSON object::

    python benchmarks/transfer.py [--size-mb 100] [--repeat 3] [--two-processes]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.utils import read_exactly
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from fednode.crypto import NodeKey
from fednode.crypto import digest as blake3_digest
from fednode.net.blob import fetch_blob, serve_blobs
from fednode.net.blobstore import BlobStore
from fednode.net.framing import receive_exactly
from fednode.net.interface import Stream
from fednode.net.libp2p_host import Libp2pHost, open_libp2p_host
from fednode.net.libp2p_workarounds import FASTPATH_ENV, close_network, quiet_libp2p_logging
from fednode.wire import Digest

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SINK = "/fednode/bench/sink/1.0.0"
STOCK_SINK = TProtocol("/fednode/bench/stock-sink/1.0.0")
CHUNK = 1 << 20
STOCK_WRITE = 64 << 10
COUNT = struct.Struct(">Q")
TIMEOUT = 120.0
MB = 1e6
MEASURED = ("ours", "ours_stream", "stock", "stock_1mib", "raw_tcp")


# -- receivers (this process, or the child with --two-processes) ---------------------------------


async def fednode_sink(stream: Stream) -> None:
    received = 0
    while chunk := await stream.receive_some(CHUNK):
        received += len(chunk)
    await stream.send_all(COUNT.pack(received))


async def stock_sink(net_stream: Any) -> None:
    received = 0
    try:
        while True:
            received += len(await net_stream.read(CHUNK))
    except StreamEOF:
        pass
    await net_stream.write(COUNT.pack(received))
    await net_stream.close()


async def raw_sink(stream: trio.SocketStream) -> None:
    received = 0
    while chunk := await stream.receive_some(CHUNK):
        received += len(chunk)
    await stream.send_all(COUNT.pack(received))
    await stream.aclose()


@asynccontextmanager
async def running_stock_host() -> AsyncIterator[Any]:
    """``libp2p.new_host`` with its defaults (a given key, so nothing is read from or saved to a
    keystore), run on loopback and closed properly on the way out."""
    lhost = new_host(key_pair=create_new_key_pair())
    async with lhost.run([Multiaddr(LOOPBACK)]):
        try:
            yield lhost
        finally:
            with trio.CancelScope(shield=True):
                await close_network(lhost)


@dataclass
class Receiver:
    """The receiving ends: a fednode host (sink and fetcher), a stock host, a raw TCP listener."""

    host: Libp2pHost
    stock: Any
    raw_port: int
    workdir: Path
    fetches: int = 0

    def addresses(self) -> dict[str, Any]:
        return {
            "fednode": self.host.listen_addrs()[0],
            "stock": f"{self.stock.get_addrs()[0]}",
            "raw_port": self.raw_port,
        }

    async def fetch(self, holder_addr: str, key: Digest, size: int) -> float:
        """Fetch ``key`` from the holder into a fresh store; seconds taken by ``fetch_blob``."""
        peer = await self.host.connect(holder_addr)
        self.fetches += 1
        store = BlobStore(self.workdir / f"fetch{self.fetches}", durable=False)
        start = time.perf_counter()
        result = await fetch_blob(self.host, [peer], key, store, max_size=size, expected_size=size)
        seconds = time.perf_counter() - start
        if result.size != size or not store.has(key):
            raise RuntimeError(f"fetch returned {result}")
        store.remove(key)
        return seconds


@asynccontextmanager
async def open_receiver(workdir: Path) -> AsyncIterator[Receiver]:
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(
            open_libp2p_host(NodeKey.generate(), [LOOPBACK], stall_timeout=TIMEOUT)
        )
        host.set_stream_handler(SINK, fednode_sink)
        stock = await stack.enter_async_context(running_stock_host())
        stock.set_stream_handler(STOCK_SINK, stock_sink)
        nursery = await stack.enter_async_context(trio.open_nursery())
        listeners = await nursery.start(partial(trio.serve_tcp, raw_sink, 0, host="127.0.0.1"))
        raw_port = listeners[0].socket.getsockname()[1]
        try:
            yield Receiver(host, stock, raw_port, workdir)
        finally:
            nursery.cancel_scope.cancel()


# -- senders -----------------------------------------------------------------------------------


@dataclass
class Sender:
    host: Libp2pHost
    stock: Any
    store: BlobStore
    payload: bytes
    key: Digest


async def send_ours_stream(sender: Sender, addrs: dict[str, Any]) -> float:
    peer = await sender.host.connect(addrs["fednode"])
    stream = await sender.host.open_stream(peer, SINK)
    view = memoryview(sender.payload)
    start = time.perf_counter()
    for offset in range(0, len(view), CHUNK):
        await stream.send_all(view[offset : offset + CHUNK])
    await stream.send_eof()
    (count,) = COUNT.unpack(await receive_exactly(stream, COUNT.size, TIMEOUT))
    seconds = time.perf_counter() - start
    await stream.aclose()
    _check_count(count, len(view))
    return seconds


async def send_stock(sender: Sender, addrs: dict[str, Any], write_size: int) -> float:
    info = info_from_p2p_addr(Multiaddr(addrs["stock"]))
    await sender.stock.connect(info)
    net_stream = await sender.stock.new_stream(info.peer_id, [STOCK_SINK])
    payload = sender.payload
    start = time.perf_counter()
    for offset in range(0, len(payload), write_size):
        await net_stream.write(payload[offset : offset + write_size])
    await net_stream.close_write()
    (count,) = COUNT.unpack(await read_exactly(net_stream, COUNT.size))
    seconds = time.perf_counter() - start
    await net_stream.close()
    _check_count(count, len(payload))
    return seconds


async def send_raw(sender: Sender, addrs: dict[str, Any]) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", addrs["raw_port"])
    view = memoryview(sender.payload)
    start = time.perf_counter()
    for offset in range(0, len(view), CHUNK):
        await stream.send_all(view[offset : offset + CHUNK])
    await stream.send_eof()
    answer = b""
    while len(answer) < COUNT.size:
        chunk = await stream.receive_some(COUNT.size - len(answer))
        if not chunk:
            break
        answer += chunk
    seconds = time.perf_counter() - start
    await stream.aclose()
    _check_count(COUNT.unpack(answer)[0], len(view))
    return seconds


def _check_count(count: int, expected: int) -> None:
    if count != expected:
        raise RuntimeError(f"receiver counted {count} bytes, sent {expected}")


# -- the two modes -----------------------------------------------------------------------------

Fetch = Callable[[str, Digest, int], Awaitable[float]]


@dataclass
class Measurements:
    seconds: dict[str, list[float]]

    def best_mb_s(self, name: str, size: int) -> float:
        return size / min(self.seconds[name]) / MB


async def measure(
    sender: Sender, addrs: dict[str, Any], fetch: Fetch, repeat: int, only: set[str]
) -> Measurements:
    holder_addr = sender.host.listen_addrs()[0]
    size = len(sender.payload)
    runs: dict[str, Callable[[], Awaitable[float]]] = {
        "ours": lambda: fetch(holder_addr, sender.key, size),
        "ours_stream": lambda: send_ours_stream(sender, addrs),
        "stock": lambda: send_stock(sender, addrs, STOCK_WRITE),
        "stock_1mib": lambda: send_stock(sender, addrs, CHUNK),
        "raw_tcp": lambda: send_raw(sender, addrs),
    }
    runs = {name: run for name, run in runs.items() if name in only}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):  # interleaved, so a busy spell on the machine hits all of them
        for name, run in runs.items():
            seconds[name].append(await run())
    return Measurements(seconds)


@asynccontextmanager
async def open_sender(workdir: Path, size: int) -> AsyncIterator[Sender]:
    payload = os.urandom(size)
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(
            open_libp2p_host(NodeKey.generate(), [LOOPBACK], stall_timeout=TIMEOUT)
        )
        store = BlobStore(workdir / "holder", durable=False)
        key = await trio.to_thread.run_sync(store.put, payload)
        assert key == blake3_digest(payload)
        server = serve_blobs(host, store, timeout=TIMEOUT, stall_timeout=TIMEOUT)
        await trio.to_thread.run_sync(server.store.chunk_digests, key, CHUNK)
        stock = await stack.enter_async_context(running_stock_host())
        yield Sender(host, stock, store, payload, key)


async def one_process(size: int, repeat: int, workdir: Path, only: set[str]) -> Measurements:
    async with open_sender(workdir, size) as sender, open_receiver(workdir) as receiver:
        return await measure(sender, receiver.addresses(), receiver.fetch, repeat, only)


async def two_processes(size: int, repeat: int, workdir: Path, only: set[str]) -> Measurements:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(workdir / "child")]
    proc = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, lines = proc.stdin, _LineReader(proc.stdout)
    try:
        with trio.fail_after(60):  # importing libp2p takes seconds on a loaded machine
            addrs = json.loads(await lines.next())

        async def fetch(holder_addr: str, key: Digest, size: int) -> float:
            order = {"holder": holder_addr, "digest": key.hex(), "size": size}
            await stdin.send_all(json.dumps(order).encode() + b"\n")
            seconds: float = json.loads(await lines.next())["seconds"]
            return seconds

        async with open_sender(workdir, size) as sender:
            return await measure(sender, addrs, fetch, repeat, only)
    finally:
        with trio.CancelScope(shield=True):
            await stdin.aclose()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise RuntimeError("the receiver process exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


async def child(workdir: Path) -> None:
    """The receiving process: prints its addresses, then runs one fetch per line on stdin."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    lines = _LineReader(stdin)
    async with open_receiver(workdir) as receiver:
        print(json.dumps(receiver.addresses()), flush=True)
        while True:
            try:
                order = json.loads(await lines.next())
            except RuntimeError:  # stdin closed: the parent is done
                return
            seconds = await receiver.fetch(
                order["holder"], Digest(bytes.fromhex(order["digest"])), order["size"]
            )
            print(json.dumps({"seconds": seconds}), flush=True)


# -- profiling ---------------------------------------------------------------------------------


async def profile(name: str, size: int, workdir: Path, top: int) -> str:
    async with open_sender(workdir, size) as sender, open_receiver(workdir) as receiver:
        addrs = receiver.addresses()
        holder = sender.host.listen_addrs()[0]
        profiled: dict[str, Callable[[], Awaitable[float]]] = {
            "ours": lambda: receiver.fetch(holder, sender.key, size),
            "ours_stream": lambda: send_ours_stream(sender, addrs),
            "stock": lambda: send_stock(sender, addrs, STOCK_WRITE),
        }
        await profiled[name]()  # warm up: connections, caches
        profiler = cProfile.Profile()
        profiler.enable()
        seconds = await profiled[name]()
        profiler.disable()
    out = io.StringIO()
    out.write(f"{name}: {size / seconds / MB:.1f} MB/s under cProfile\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--two-processes", action="store_true", help="receivers in a child")
    parser.add_argument("--no-fastpath", action="store_true", help="stock Noise and yamux")
    parser.add_argument(
        "--only", default=",".join(MEASURED), help=f"comma-separated subset of {MEASURED}"
    )
    parser.add_argument("--profile", choices=("ours", "ours_stream", "stock"))
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.no_fastpath:
        os.environ[FASTPATH_ENV] = "0"  # read when each host is built (and by the child)
    quiet_libp2p_logging()
    if args.child is not None:
        trio.run(child, args.child)
        return
    size = int(args.size_mb * MB)
    with tempfile.TemporaryDirectory(prefix="fednode-transfer-") as tmp:
        if args.profile:
            report = trio.run(profile, args.profile, size, Path(tmp), args.profile_top)
            print(report, file=sys.stderr)
            return
        started = time.perf_counter()
        run = two_processes if args.two_processes else one_process
        only = set(args.only.split(","))
        if not only <= set(MEASURED):
            parser.error(f"--only takes names from {MEASURED}")
        result = trio.run(run, size, args.repeat, Path(tmp), only)
    best = {name: round(result.best_mb_s(name, size), 1) for name in result.seconds}
    raw = best.get("raw_tcp")

    def ratio(name: str) -> float | None:
        return round(best[name] / raw, 3) if raw and name in best else None

    print(
        json.dumps(
            {
                "ours_mb_s": best.get("ours"),
                "ours_stream_mb_s": best.get("ours_stream"),
                "stock_mb_s": best.get("stock"),
                "raw_tcp_mb_s": raw,
                "ratio_vs_raw": ratio("ours"),
                "stock_ratio_vs_raw": ratio("stock"),
                "ours_stream_ratio_vs_raw": ratio("ours_stream"),
                "stock_1mib_mb_s": best.get("stock_1mib"),
                "ours_is": "fetch_blob (blob protocol, chunk hashing, store writes)",
                "mode": "two-processes" if args.two_processes else "one-process",
                "fastpath": not args.no_fastpath,
                "size_mb": args.size_mb,
                "repeat": args.repeat,
                "runs_mb_s": {
                    name: [round(size / s / MB, 1) for s in seconds]
                    for name, seconds in result.seconds.items()
                },
                "wall_s": round(time.perf_counter() - started, 1),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
