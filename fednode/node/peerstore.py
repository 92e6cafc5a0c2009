"""Node layer: peers remembered across restarts, so a restarted node finds its peers again.

A small JSON file in the node's data directory (local state, not a wire format): peer ID ->
addresses and when it was last seen. Written atomically; unreadable or foreign content is ignored
with a warning rather than stopping the node.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fednode.protocol.dialing import peer_of

log = logging.getLogger(__name__)

MAX_PEERS = 1000
MAX_ADDRS = 8


@dataclass(frozen=True, slots=True)
class KnownPeer:
    peer: str
    addrs: tuple[str, ...]
    last_seen: float  # Unix time


class PeerStore:
    """Addresses of peers seen recently, most recent first, capped at :data:`MAX_PEERS`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._peers: dict[str, KnownPeer] = {}
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            for entry in raw["peers"]:
                addrs = tuple(
                    a for a in entry["addrs"] if isinstance(a, str) and _dialable(a, entry["peer"])
                )
                if addrs:
                    self._peers[entry["peer"]] = KnownPeer(
                        str(entry["peer"]), addrs[:MAX_ADDRS], float(entry["last_seen"])
                    )
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable peerstore %s: %s", self.path, exc)

    def remember(
        self, peer: str, addrs: list[str] | tuple[str, ...], now: float | None = None
    ) -> None:
        full = tuple(dict.fromkeys(a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in addrs))
        full = tuple(a for a in full if _dialable(a, peer))[:MAX_ADDRS]
        if not full:
            return
        self._peers[peer] = KnownPeer(peer, full, time.time() if now is None else now)
        if len(self._peers) > MAX_PEERS:
            oldest = min(self._peers.values(), key=lambda p: p.last_seen)
            del self._peers[oldest.peer]

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def peers(self) -> list[KnownPeer]:
        return sorted(self._peers.values(), key=lambda p: -p.last_seen)

    def addrs(self) -> list[str]:
        return [a for p in self.peers() for a in p.addrs]

    def save(self) -> None:
        data = {
            "version": 1,
            "peers": [
                {"peer": p.peer, "addrs": list(p.addrs), "last_seen": p.last_seen}
                for p in self.peers()
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


def _dialable(addr: str, peer: str) -> bool:
    try:
        return peer_of(addr) == peer
    except ValueError:
        return False
