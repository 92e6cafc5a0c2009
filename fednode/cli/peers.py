"""CLI layer: ``fednode peers ADDR [--json]``, the peers a running node sees.

Dials the node at ADDR with a throwaway identity (no inbound port) and asks for its status over
``/fednode/status/1.0.0``: peer ID, role, state, load, RTT, last seen.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fednode.cli.command import Subparsers
    from fednode.wire.status import NodeStatus


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "peers",
        help="show the peers a running node sees",
        description="Connect to a running node and show its membership view.",
    )
    parser.add_argument(
        "addr", metavar="ADDR", help="the node's full multiaddr (/ip4/…/tcp/…/p2p/12D3…)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up after this long (default: 10)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import trio

    from fednode.errors import ConfigError
    from fednode.protocol.dialing import peer_of

    try:
        peer_of(args.addr)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    status = trio.run(_fetch, args.addr, args.timeout)
    _print(status, as_json=args.json)
    return 0


async def _fetch(addr: str, timeout: float) -> NodeStatus:
    import trio

    from fednode.crypto import NodeKey
    from fednode.errors import TransportError
    from fednode.net.libp2p_host import open_libp2p_host
    from fednode.node.runtime import fetch_status

    with trio.move_on_after(timeout) as scope:
        async with open_libp2p_host(NodeKey.generate(), ()) as host:
            peer = await host.connect(addr)
            return await fetch_status(host, peer, timeout)
    assert scope.cancelled_caught
    raise TransportError(f"no answer from {addr} within {timeout:g} s")


def _print(status: NodeStatus, *, as_json: bool) -> None:
    from rich.table import Table

    from fednode.cli.console import field_lines, show, stdout_console

    console = stdout_console()
    if as_json:
        import dataclasses

        console.print_json(data=dataclasses.asdict(status))
        return
    show(
        console,
        field_lines(
            [
                ("peer ID", status.peer),
                ("role", status.role),
                ("federation", status.federation),
                ("uptime", f"{status.uptime_ms / 1000:.1f} s"),
                ("connections", str(status.connected)),
                (
                    "heartbeats",
                    f"{status.heartbeats_accepted} accepted, {status.heartbeats_rejected} rejected",
                ),
            ],
            indent=0,
        ),
    )
    show_region = any(p.region for p in status.peers)
    table = Table(
        title=f"{len(status.peers)} peer(s)",
        title_justify="left",
        box=None,
        pad_edge=False,
        header_style="bold underline",
    )
    columns = [
        "peer",
        "role",
        "state",
        *(["region"] if show_region else []),
        "cpu",
        "mem",
        "clients",
        "RTT",
        "seen",
        "round",
    ]
    for column in columns:
        table.add_column(column, no_wrap=True)
    for p in status.peers:
        row = [
            f"{p.peer[:8]}…{p.peer[-6:]}",
            p.role,
            p.state,
            *([p.region or "-"] if show_region else []),
            f"{p.cpu:.0%}",
            f"{p.memory:.0%}",
            f"{p.attached}/{p.capacity}",
            "-" if p.rtt_ms is None else f"{p.rtt_ms:.1f}ms",
            f"{p.last_seen_ms / 1000:.1f}s",
            str(p.round),
        ]
        table.add_row(*row)
    console.print(table)
