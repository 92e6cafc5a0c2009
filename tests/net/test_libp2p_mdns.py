"""The libp2p adapter's mDNS pieces without the network: parsing announcements (malformed ones
rejected), what we announce, the hop from zeroconf's thread to trio, and that a host opened
without mDNS never starts zeroconf. Real multicast runs in ``tests/node/test_mdns_netns.py``,
inside network namespaces.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest
import trio
import trio.testing
import zeroconf
from hypothesis import given
from hypothesis import strategies as st
from libp2p.discovery.mdns.listener import PeerListener

from fednode.crypto import NodeKey
from fednode.net import libp2p_mdns
from fednode.net.interface import PeerDiscovered
from fednode.net.libp2p_mdns import MAX_ADDRS, MdnsService, lan_addrs, parse_announcement
from fednode.wire import PeerId

PEER = NodeKey(b"\x01" * 32).peer_id
OTHER = NodeKey(b"\x02" * 32).peer_id
OWN = NodeKey(b"\x03" * 32).peer_id


def entry(addr: str) -> bytes:
    return addr.encode()


# -- parsing -------------------------------------------------------------------------------


def test_an_announcement_gives_the_peer_and_its_full_addresses() -> None:
    # Prepare
    properties: dict[bytes, bytes | None] = {
        b"dnsaddr": entry(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}"),
        b"dnsaddr2": entry(f"/ip6/fd00::2/tcp/4002/p2p/{PEER}"),
        b"dnsaddr3": entry(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}"),  # a repeat
        b"other": b"ignored",
    }
    # Execute
    event = parse_announcement(properties)
    # Assert
    assert event == PeerDiscovered(
        peer=PEER,
        addrs=(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}", f"/ip6/fd00::2/tcp/4002/p2p/{PEER}"),
    )


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"\xff\xfe",  # not UTF-8
        b"garbage",
        b"/ip4/10.0.0.2/tcp/4001",  # no peer ID
        b"/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWnotapeerid",
        f"/ip4/10.0.0.2/udp/4001/quic-v1/p2p/{PEER}".encode(),  # not our transport
        f"/dns4/node.local/tcp/4001/p2p/{PEER}".encode(),
        f"/ip4/10.0.0.2/tcp/0/p2p/{PEER}".encode(),
        f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}".encode(),
        f"/ip4/224.0.0.251/tcp/4001/p2p/{PEER}".encode(),
        f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}/p2p/{PEER}".encode(),
    ],
)
def test_a_malformed_entry_is_rejected(value: bytes | None) -> None:
    with pytest.raises(ValueError):
        parse_announcement({b"dnsaddr": value})


def test_malformed_entries_are_skipped_beside_good_ones() -> None:
    good = f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}"
    event = parse_announcement({b"dnsaddr": b"garbage", b"dnsaddr2": entry(good)})
    assert event == PeerDiscovered(peer=PEER, addrs=(good,))


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {b"id": PEER.encode()},  # the legacy form, without addresses
        {
            b"dnsaddr": entry(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}"),
            b"dnsaddr2": entry(f"/ip4/10.0.0.3/tcp/4001/p2p/{OTHER}"),
        },
    ],
    ids=["empty", "legacy-id-only", "two-peers"],
)
def test_an_announcement_without_one_dialable_peer_is_rejected(
    properties: dict[bytes, bytes | None],
) -> None:
    with pytest.raises(ValueError):
        parse_announcement(properties)


def test_at_most_max_addrs_are_taken() -> None:
    properties = {
        f"dnsaddr{i}".encode(): entry(f"/ip4/10.0.0.2/tcp/{4000 + i}/p2p/{PEER}")
        for i in range(MAX_ADDRS + 10)
    }
    assert len(parse_announcement(properties).addrs) == MAX_ADDRS


_FRAGMENTS = ["", "ip4", "ip6", "10.0.0.1", "::1", "tcp", "udp", "4001", "0", "p2p", PEER, OTHER]
_values = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=9).map(lambda parts: "/".join(parts).encode()),
)
_keys = st.one_of(st.sampled_from([b"dnsaddr", b"dnsaddr2", b"dnsaddr3", b"id"]), st.binary())


@given(st.dictionaries(_keys, _values, max_size=6))
def test_parsing_arbitrary_txt_records_rejects_or_gives_a_dialable_peer(
    properties: dict[bytes, bytes | None],
) -> None:
    try:
        event = parse_announcement(properties)
    except ValueError:
        return
    assert 1 <= len(event.addrs) <= MAX_ADDRS
    assert all(addr.endswith(f"/tcp/{addr.split('/')[4]}/p2p/{event.peer}") for addr in event.addrs)
    assert event.peer in (PEER, OTHER)


# -- what we announce ------------------------------------------------------------------------


def test_only_lan_dialable_listen_addresses_are_announced() -> None:
    listen = [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{OWN}",
        f"/ip4/192.168.1.5/tcp/4001/p2p/{OWN}",
        f"/ip6/::1/tcp/4001/p2p/{OWN}",
        f"/ip6/fe80::1/tcp/4001/p2p/{OWN}",
        f"/ip6/fd00::5/tcp/4001/p2p/{OWN}",
        f"/ip4/192.168.1.5/tcp/4001/p2p/{OWN}",
    ]
    assert lan_addrs(listen) == [listen[1], listen[4]]


def test_our_announcement_carries_exactly_our_addresses_and_stock_libp2p_reads_it() -> None:
    # Prepare: no zeroconf instance is needed to build the record
    addrs = [f"/ip4/10.231.0.1/tcp/4001/p2p/{OWN}", f"/ip4/10.9.0.1/tcp/4001/p2p/{OWN}"]
    broadcaster = libp2p_mdns._Broadcaster(cast(Any, None), "x._p2p._udp.local.", OWN, addrs)
    info = broadcaster.service_info
    assert info is not None
    stock_listener = PeerListener.__new__(PeerListener)  # its parser only: no browsers
    # Execute
    ours = parse_announcement(info.properties)
    stock = stock_listener._extract_peer_info(info)
    # Assert: A records are our listen IPs (0.8.1 would put the 8.8.8.8-route IP there)
    assert ours == PeerDiscovered(peer=OWN, addrs=tuple(addrs))
    assert stock is not None and str(stock.peer_id) == OWN
    assert [str(a) for a in stock.addrs] == ["/ip4/10.231.0.1/tcp/4001", "/ip4/10.9.0.1/tcp/4001"]
    assert [socket.inet_ntoa(a) for a in info.addresses] == ["10.231.0.1", "10.9.0.1"]
    assert info.port == 4001


# -- from zeroconf's thread to trio ----------------------------------------------------------


async def test_announcements_hop_from_zeroconf_threads_to_trio_and_bad_ones_are_counted() -> None:
    # Prepare: a service that is never started (no sockets); we play zeroconf's thread
    discovered: list[PeerDiscovered] = []
    gone: list[PeerId] = []
    said_goodbye = trio.Event()

    def on_discovered(event: PeerDiscovered) -> bool:
        trio.lowlevel.current_trio_token()  # raises unless called on the trio thread
        discovered.append(event)
        return True

    def on_gone(peer: PeerId) -> None:
        gone.append(peer)
        said_goodbye.set()

    service = MdnsService(OWN, [], on_discovered=on_discovered, on_gone=on_gone)
    good = {b"dnsaddr": entry(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}")}
    ours = {b"dnsaddr": entry(f"/ip4/10.0.0.9/tcp/4001/p2p/{OWN}")}

    def zeroconf_thread() -> None:
        service._from_zeroconf("bad._p2p._udp.local.", {b"dnsaddr": b"garbage"})
        service._from_zeroconf("silent._p2p._udp.local.", None)  # details never came
        service._from_zeroconf("own._p2p._udp.local.", ours)  # not news: ourselves
        service._from_zeroconf("peer._p2p._udp.local.", good)
        service._gone_from_zeroconf("unknown._p2p._udp.local.")
        service._gone_from_zeroconf("peer._p2p._udp.local.")

    # Execute
    with trio.fail_after(10):
        await trio.to_thread.run_sync(zeroconf_thread)
        await said_goodbye.wait()  # queued last, so everything before it has been handled
    stats = service.statistics()
    # Assert
    assert discovered == [PeerDiscovered(peer=PEER, addrs=(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}",))]
    assert gone == [PEER]
    assert (stats.discovered, stats.rejected, stats.unresolved) == (1, 1, 1)
    assert stats.announced == ()


async def test_after_close_late_announcements_are_dropped() -> None:
    # Prepare
    discovered: list[PeerDiscovered] = []

    def on_discovered(event: PeerDiscovered) -> bool:
        discovered.append(event)
        return True

    service = MdnsService(OWN, [], on_discovered=on_discovered, on_gone=lambda peer: None)
    await service.aclose()
    # Execute
    late = {b"dnsaddr": entry(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}")}
    service._from_zeroconf("p._p2p._udp.local.", late)
    await trio.testing.wait_all_tasks_blocked()  # trio has run what was queued
    # Assert
    assert discovered == []


# -- off by default --------------------------------------------------------------------------


@pytest.mark.libp2p
@pytest.mark.timeout(60)
async def test_a_host_opened_without_mdns_never_starts_zeroconf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: any Zeroconf would bind port 5353 and multicast on real interfaces
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("zeroconf started without mdns=True")

    monkeypatch.setattr(zeroconf.Zeroconf, "__init__", refuse)
    from fednode.net.libp2p_host import open_libp2p_host

    # Execute
    async with open_libp2p_host(NodeKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        statistics = host.mdns_statistics()
        channel = host.discoveries()
        with pytest.raises(trio.WouldBlock):
            channel.receive_nowait()
    # Assert
    assert statistics is None
    assert [event async for event in channel] == []
