"""Net layer, libp2p adapter: the fast path for bulk data through py-libp2p 0.8.1's Noise and
yamux, wired in by :func:`fednode.net.libp2p_workarounds.build_host`.

Why: stock Noise + yamux moves ~150 MB/s on loopback where plain trio TCP moves 1-2.6 GB/s, and
the profile of a 100 MB transfer (``notes/py-libp2p-0.8.1.md`` §4) shows why: not the cipher (5 %)
but Python and trio work per frame. Every 64 KiB yamux frame is two Noise messages (65,519 +
17 bytes), each written with its own socket call, read back with a 2-byte read plus body reads,
each through two locks and a checkpoint; and a WINDOW_UPDATE follows nearly every read.

What changes (targeted subclasses; the protocol logic and state stay py-libp2p's):

- :mod:`~fednode.net.libp2p_fastnoise`: after the stock XX handshake the session encrypts a
  batch of messages into one buffer per socket write and decrypts every message of a 1 MiB
  socket read per wake-up (with the same negotiated keys and nonce sequence);
- :mod:`~fednode.net.libp2p_fastyamux`: DATA frames sized to fill one Noise message, one batch
  per write, a 16 MiB receive window with credit returned at half, an event for window waits,
  a reader that decodes a whole read at once and never blocks on a write;
- :class:`~fednode.net.libp2p_stream.Libp2pStream` hands 1 MiB memoryviews down uncopied and
  waits for window credit on that event instead of polling every 10 ms.

What does not change: every byte is still a ChaCha20-Poly1305 Noise transport message of at most
65,535 bytes under the session negotiated by py-libp2p's own Noise XX handshake, carrying
standard yamux frames. A stock py-libp2p, go-, rust- or js-libp2p peer sees nothing unusual
(``tests/net/test_libp2p_fastpath.py`` runs a stock py-libp2p host against ours both ways).
Measured with ``benchmarks/transfer.py``; what was tried and what it gave is in the report of the
change that added this module.
"""

from __future__ import annotations

from typing import Any

from libp2p.custom_types import TProtocol
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.upgrader import TransportUpgrader

from fednode.net.libp2p_fastnoise import FastNoiseSession, FastNoiseTransport, NoiseDecryptError
from fednode.net.libp2p_fastyamux import (
    RECEIVE_WINDOW,
    FastMuxerMultistream,
    FastYamux,
    FastYamuxStream,
)

__all__ = [
    "RECEIVE_WINDOW",
    "FastNoiseSession",
    "FastNoiseTransport",
    "FastYamux",
    "FastYamuxStream",
    "NoiseDecryptError",
    "use_fast_yamux",
]


def use_fast_yamux(upgrader: TransportUpgrader, negotiate_timeout: int) -> None:
    """Make ``upgrader`` negotiate ``/yamux/1.0.0`` (only) and run it as :class:`FastYamux`."""
    muxers: Any = {TProtocol(YAMUX_PROTOCOL_ID): FastYamux}
    upgrader.muxer_multistream = FastMuxerMultistream(muxers, negotiate_timeout)
