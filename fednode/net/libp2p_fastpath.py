"""Net layer, libp2p adapter: the fast path for bulk data through py-libp2p 0.8.1's Noise and
yamux, wired in by :func:`fednode.net.libp2p_workarounds.build_host`.

Why: stock Noise + yamux moves ~150 MB/s on loopback where plain trio TCP moves 1-2.6 GB/s, and
the profile of a 100 MB transfer (``notes/py-libp2p-0.8.1.md`` §4) shows why: not the cipher (5 %)
but Python and trio work per frame. Every 64 KiB yamux frame is two Noise messages (65,519 +
17 bytes), each written with its own socket call and read back with a 2-byte read plus body
reads, each through two locks and a scheduler checkpoint; and a WINDOW_UPDATE follows nearly
every read.

What changes (targeted subclasses; the protocol logic and state stay py-libp2p's):

- :mod:`~fednode.net.libp2p_fastnoise`: after the stock XX handshake, the session seals a batch
  of messages into one buffer per socket write, and opens every message a socket read (up to
  1 MiB) completed in one go, with the keys and nonce counters the handshake produced;
- :mod:`~fednode.net.libp2p_fastyamux`: DATA frames sized to fill one Noise message, one batch
  per write, receive windows growing from 1 to 16 MiB with credit returned per half window, a
  reader that decodes a whole read at once and never waits to write, and writers woken by
  window updates instead of polling;
- :class:`~fednode.net.libp2p_stream.Libp2pStream` hands 1 MiB views down uncopied, waits for
  window credit on that event, and offers ``receive_into`` (one copy from the decrypted message
  to the caller's buffer), which :mod:`~fednode.net.framing`'s exact reads use.

What does not change: every byte is still a ChaCha20-Poly1305 Noise transport message of at most
65,535 bytes under the session py-libp2p's own Noise XX handshake negotiated, carrying standard
yamux frames. A stock py-libp2p, go-, rust- or js-libp2p peer sees nothing unusual
(``tests/net/test_libp2p_fastpath.py`` runs a stock py-libp2p host against ours both ways).
Stricter than stock: a message that fails authentication, a window overrun or an unknown frame
ends the connection. Measurements and what was tried: ``benchmarks/transfer.md``.
"""

from __future__ import annotations

from typing import Any

from libp2p.custom_types import TProtocol
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.upgrader import TransportUpgrader

from fednode.net.libp2p_fastnoise import FastNoiseSession, FastNoiseTransport
from fednode.net.libp2p_fastyamux import (
    FIRST_WINDOW,
    RECEIVE_WINDOW,
    FastMuxerMultistream,
    FastYamux,
    FastYamuxStream,
)
from fednode.net.noise_messages import NoiseDecryptError

__all__ = [
    "FIRST_WINDOW",
    "RECEIVE_WINDOW",
    "FastNoiseSession",
    "FastNoiseTransport",
    "FastYamux",
    "FastYamuxStream",
    "NoiseDecryptError",
    "use_fast_yamux",
]


def use_fast_yamux(upgrader: TransportUpgrader, negotiate_timeout: int) -> None:
    """Make ``upgrader`` negotiate ``/yamux/1.0.0`` (only) and run it as :class:`FastYamux` over
    a :class:`FastNoiseSession` (as stock ``Yamux`` over any other secure session)."""
    muxers: Any = {TProtocol(YAMUX_PROTOCOL_ID): FastYamux}
    upgrader.muxer_multistream = FastMuxerMultistream(muxers, negotiate_timeout)
