"""A fednode libp2p host in a process of its own, for tests that freeze (SIGSTOP) or kill
(SIGKILL) a peer. Run as ``python tests/net/libp2p_peer.py``; it prints its listen address as
the first line of stdout, then serves until it is killed:

- ``/fednode/test/sink/1.0.0`` reads and discards everything;
- ``/fednode/test/trickle/1.0.0`` writes 1 KiB every 20 ms until the stream breaks;
- ``/fednode/test/echo/1.0.0`` sends back what it receives.
"""

from __future__ import annotations

import trio

from fednode.crypto.keys import NodeKey
from fednode.net.interface import Stream
from fednode.net.libp2p_host import open_libp2p_host

SINK = "/fednode/test/sink/1.0.0"
TRICKLE = "/fednode/test/trickle/1.0.0"
ECHO = "/fednode/test/echo/1.0.0"


async def sink(stream: Stream) -> None:
    while await stream.receive_some(1024 * 1024):
        pass


async def trickle(stream: Stream) -> None:
    while True:
        await stream.send_all(bytes(1024))
        await trio.sleep(0.02)


async def echo(stream: Stream) -> None:
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)


async def main() -> None:
    async with open_libp2p_host(NodeKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_stream_handler(SINK, sink)
        host.set_stream_handler(TRICKLE, trickle)
        host.set_stream_handler(ECHO, echo)
        print(host.listen_addrs()[0], flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
