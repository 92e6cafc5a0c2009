"""Net layer, libp2p adapter: opt-in mDNS discovery on the LAN with py-libp2p 0.8.1's zeroconf
pieces (its ``PeerBroadcaster`` and ``PeerListener``), reporting each valid announcement as a
:class:`~fednode.net.interface.PeerDiscovered` on the trio thread.

0.8.1's ``MDNSDiscovery`` does not fit as it is: it only adds what it finds to libp2p's peerstore
(from zeroconf's thread) and emits nothing; it binds every interface, and announces, as its A
record, the IP of whichever interface routes to 8.8.8.8. Here zeroconf binds only the interfaces
of the addresses we announce (every interface if there are none), we announce exactly our
LAN-dialable listen addresses, and zeroconf's browser thread hands each announcement to trio
through the run's token; parsing and bookkeeping happen on the trio thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import trio
from libp2p.discovery.mdns.broadcaster import PeerBroadcaster
from libp2p.discovery.mdns.listener import PeerListener
from libp2p.discovery.mdns.mdns import SERVICE_TYPE
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr
from zeroconf import InterfaceChoice, IPVersion, Zeroconf

from fednode.errors import TransportError
from fednode.net.interface import PeerDiscovered
from fednode.wire import PeerId

logger = logging.getLogger("fednode.net.libp2p.mdns")

MAX_ADDRS = 16
"""Addresses taken from one announcement (and announced by us), as in heartbeats."""
STOP_TIMEOUT = 2.0
"""Seconds ``aclose`` waits for zeroconf's goodbye and threads before abandoning them."""
_RESOLVE_ATTEMPTS = 3  # service-info lookups per announcement, 0.5 s then 1 s apart
_RESOLVE_BACKOFF = 0.5

Properties = Mapping[bytes, bytes | None]


@dataclass(frozen=True, slots=True)
class MdnsStatistics:
    """A snapshot of an :class:`MdnsService`'s counters."""

    announced: tuple[str, ...]
    """What we announce (empty: we only listen)."""
    discovered: int
    """Announcements that reported a new peer or changed addresses."""
    rejected: int
    """Malformed announcements ignored."""
    unresolved: int
    """Services seen whose details never arrived."""


# -- announcements: pure ---------------------------------------------------------------------


def _dialable(addr: str) -> tuple[str, PeerId]:
    """``(full multiaddr, peer)`` for ``/ip4|ip6/<ip>/tcp/<port>/p2p/<id>``, else ValueError."""
    try:
        maddr = Multiaddr(addr)
        names = [protocol.name for protocol in maddr.protocols()]
        info = info_from_p2p_addr(maddr)
    except Exception as exc:  # multiaddr raises ValueError subclasses, libp2p others
        raise ValueError(f"not a multiaddr with a peer ID: {exc}") from None
    if names not in (["ip4", "tcp", "p2p"], ["ip6", "tcp", "p2p"]):
        raise ValueError(f"not /ip4|ip6/…/tcp/…/p2p/…: {'/'.join(names)}")
    ip = ipaddress.ip_address(maddr.value_for_protocol(names[0]))
    port = int(maddr.value_for_protocol("tcp"))
    if ip.is_unspecified or ip.is_multicast or port == 0:
        raise ValueError(f"not dialable: {ip} port {port}")
    peer = PeerId(str(info.peer_id))
    return f"/{names[0]}/{ip}/tcp/{port}/p2p/{peer}", peer


def parse_announcement(properties: Properties) -> PeerDiscovered:
    """The peer and addresses in an mDNS service's TXT record (libp2p's spec: one
    ``dnsaddr=<multiaddr>/p2p/<id>`` entry per address). Entries we cannot dial are skipped;
    ``ValueError`` if none is left or they name more than one peer."""
    addrs: list[str] = []
    peers: set[PeerId] = set()
    problems: list[str] = []
    for key, value in properties.items():
        if not (isinstance(key, bytes) and key.startswith(b"dnsaddr")):
            continue
        if len(addrs) == MAX_ADDRS:
            break
        try:
            if not isinstance(value, bytes):
                raise ValueError("no value")
            addr, peer = _dialable(value.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{key!r}: {exc}")
            continue
        if addr not in addrs:
            addrs.append(addr)
        peers.add(peer)
    if len(peers) > 1:
        raise ValueError(f"addresses of {len(peers)} different peers")
    if not addrs:
        raise ValueError("; ".join(problems) or "no dnsaddr entry")
    return PeerDiscovered(peer=peers.pop(), addrs=tuple(addrs))


def lan_addrs(listen_addrs: Iterable[str]) -> list[str]:
    """Which of our listen addresses to announce: the dialable ones a LAN neighbour could reach
    (not loopback, not IPv6 link-local, which needs a zone)."""
    result: list[str] = []
    for text in listen_addrs:
        try:
            addr, _ = _dialable(text)
        except ValueError:
            continue
        ip = ipaddress.ip_address(_ip_of(addr))
        if ip.is_loopback or (ip.version == 6 and ip.is_link_local):
            continue
        if addr not in result:
            result.append(addr)
    return result[:MAX_ADDRS]


def _ip_of(addr: str) -> str:
    return addr.split("/")[2]


# -- zeroconf's side (its threads) -------------------------------------------------------------


class _Broadcaster(PeerBroadcaster):
    """Announces exactly ``addrs``: their IPs as the A/AAAA records (0.8.1 routes to 8.8.8.8
    to pick one) and the addresses themselves as dnsaddr TXT entries."""

    def __init__(self, zc: Zeroconf, service_name: str, peer: PeerId, addrs: list[str]) -> None:
        self._ips = list(dict.fromkeys(_ip_of(addr) for addr in addrs))
        port = int(Multiaddr(addrs[0]).value_for_protocol("tcp"))
        super().__init__(zc, SERVICE_TYPE, service_name, str(peer), port, listen_addrs=addrs)

    def _get_local_ips(self) -> list[str]:
        return self._ips


Deliver = Callable[[str, "dict[bytes, bytes | None] | None"], None]


class _Listener(PeerListener):
    """Hands every libp2p service seen (its name and TXT properties, or None when its details
    never came) to ``deliver``, and every goodbye to ``gone``. It never touches a peerstore:
    0.8.1's writes libp2p's from zeroconf's thread."""

    def __init__(
        self, zc: Zeroconf, service_name: str, deliver: Deliver, gone: Callable[[str], None]
    ) -> None:
        self._deliver = deliver
        self._gone = gone
        super().__init__(
            peerstore=cast(Any, None),  # unused: every method that would use it is overridden
            zeroconf=zc,
            service_type=SERVICE_TYPE,
            service_name=service_name,
            retry_attempts=_RESOLVE_ATTEMPTS,
            retry_base_delay=_RESOLVE_BACKOFF,
        )

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        if type_ != self.service_type or name == self.service_name:
            return  # the meta-query browser's service types, or our own announcement
        info = self._get_service_info_with_retry(zc, type_, name)
        self._deliver(name, None if info is None else dict(info.properties))

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        if type_ == self.service_type and name != self.service_name:
            self._gone(name)


# -- the service (trio's side) -----------------------------------------------------------------


class MdnsService:
    """mDNS for one host: announces ``lan_addrs(listen_addrs)`` (if any) and reports each valid
    announcement by another peer to ``on_discovered``, each goodbye to ``on_gone``, both on the
    trio thread. Start with :meth:`start`; :meth:`aclose` stops it."""

    def __init__(
        self,
        own: PeerId,
        listen_addrs: Iterable[str],
        *,
        on_discovered: Callable[[PeerDiscovered], bool],
        on_gone: Callable[[PeerId], None],
    ) -> None:
        self._own = own
        self._announced = lan_addrs(listen_addrs)
        self._on_discovered = on_discovered
        self._on_gone = on_gone
        self._token = trio.lowlevel.current_trio_token()
        self._service_name = f"{secrets.token_hex(16)}.{SERVICE_TYPE}"
        self._names: dict[str, PeerId] = {}  # service name -> peer it announced
        self._zeroconf: Zeroconf | None = None
        self._listener: _Listener | None = None
        self._broadcaster: _Broadcaster | None = None
        self._closed = False
        self._discovered = 0
        self._rejected = 0
        self._unresolved = 0

    @classmethod
    async def start(
        cls,
        own: PeerId,
        listen_addrs: Iterable[str],
        *,
        on_discovered: Callable[[PeerDiscovered], bool],
        on_gone: Callable[[PeerId], None],
    ) -> MdnsService:
        service = cls(own, listen_addrs, on_discovered=on_discovered, on_gone=on_gone)
        try:
            # Zeroconf binds sockets and probes the network before registering (~1 s): off trio.
            await trio.to_thread.run_sync(service._start_blocking)
        except Exception as exc:
            await service.aclose()
            raise TransportError(f"cannot start mDNS: {exc}") from exc
        except BaseException:
            await service.aclose()
            raise
        return service

    def statistics(self) -> MdnsStatistics:
        return MdnsStatistics(
            announced=tuple(self._announced),
            discovered=self._discovered,
            rejected=self._rejected,
            unresolved=self._unresolved,
        )

    async def aclose(self) -> None:
        """Say goodbye and stop zeroconf's threads (bounded by :data:`STOP_TIMEOUT`; past it they
        are abandoned and finish on their own); idempotent."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
            # (trio-typing, which libp2p installs, shadows trio's stubs with an older signature.)
            await trio.to_thread.run_sync(  # type: ignore[call-arg]
                self._stop_blocking, abandon_on_cancel=True
            )

    # zeroconf's threads

    def _start_blocking(self) -> None:
        ips = list(dict.fromkeys(_ip_of(addr) for addr in self._announced))
        if ips:
            self._zeroconf = Zeroconf(interfaces=cast(Any, ips), use_asyncio=False)
        else:  # nothing to announce: listen on every interface
            self._zeroconf = Zeroconf(
                interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only, use_asyncio=False
            )
        self._listener = _Listener(
            self._zeroconf, self._service_name, self._from_zeroconf, self._gone_from_zeroconf
        )
        if self._announced:
            self._broadcaster = _Broadcaster(
                self._zeroconf, self._service_name, self._own, self._announced
            )
            assert self._broadcaster.service_info is not None
            self._zeroconf.register_service(self._broadcaster.service_info)

    def _stop_blocking(self) -> None:
        if self._broadcaster is not None:
            self._broadcaster.unregister()  # goodbye packets; logs rather than raises
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.stop()
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                self._zeroconf.close()

    def _from_zeroconf(self, name: str, properties: dict[bytes, bytes | None] | None) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._guarded, self._on_announcement, name, properties)

    def _gone_from_zeroconf(self, name: str) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._guarded, self._on_goodbye, name)

    # trio's thread

    def _guarded(self, handler: Callable[..., None], *args: Any) -> None:
        # An exception escaping a run_sync_soon callback would end the whole trio run.
        try:
            if not self._closed:
                handler(*args)
        except Exception:
            logger.exception("mDNS handler failed")

    def _on_announcement(self, name: str, properties: dict[bytes, bytes | None] | None) -> None:
        if properties is None:
            self._unresolved += 1
            logger.debug("mDNS service %r did not answer with its details", name)
            return
        try:
            event = parse_announcement(properties)
        except ValueError as exc:
            self._rejected += 1
            logger.debug("ignored a malformed mDNS announcement %r: %s", name, exc)
            return
        if event.peer == self._own:
            return  # ours, from an earlier run still in caches, or a copy of our key
        self._names[name] = event.peer
        if self._on_discovered(event):
            self._discovered += 1
            logger.debug("mDNS: %s at %s", event.peer, ", ".join(event.addrs))

    def _on_goodbye(self, name: str) -> None:
        peer = self._names.pop(name, None)
        if peer is not None and peer not in self._names.values():
            self._on_gone(peer)
