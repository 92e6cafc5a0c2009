"""CLI layer: ``fednode start``, run a node until Ctrl-C (or SIGTERM).

It prints the node's peer ID and full multiaddrs (``/ip4/…/tcp/…/p2p/12D3…``, dialable as they
are by any libp2p implementation), then logs membership changes on stderr. The roles that train
and aggregate drive the same node; in this release every role joins, heartbeats and serves status.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fednode.cli.command import Subparsers
    from fednode.node.config import NodeConfig

ROLES = ("client", "combiner", "reducer", "bootstrap", "auto")


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "start",
        help="run a node",
        description="Run a fednode node until Ctrl-C. "
        "Flags override the config file's [node] table.",
    )
    parser.add_argument("--role", choices=ROLES, help="the node's role (default: auto)")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="a TOML file with a [node] table"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="key, peerstore and blobs (default: ./fednode-data)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="listen address, repeatable (default: /ip4/0.0.0.0/tcp/0; none for a client)",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        metavar="ADDR",
        help="a bootstrap peer's full multiaddr, repeatable",
    )
    parser.add_argument("--federation", metavar="ID", help="federation id (default: default)")
    parser.add_argument("--region", help="a region label advertised in heartbeats")
    parser.add_argument("--capacity", type=int, help="clients this node can take as a combiner")
    parser.add_argument(
        "--heartbeat-interval", type=float, metavar="SECONDS", help="heartbeat period (default: 1)"
    )
    parser.add_argument(
        "--mdns",
        action="store_true",
        default=None,
        help="also find peers on the LAN with mDNS: announce the listen addresses (not loopback) "
        "by multicast on their interfaces and dial the peers heard (default: off)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log membership changes")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    from fednode.node.config import load_config

    return load_config(
        args.config,
        role=args.role,
        data_dir=args.data_dir,
        listen=args.listen,
        bootstrap=args.bootstrap,
        federation=args.federation,
        region=args.region,
        capacity=args.capacity,
        heartbeat_interval=args.heartbeat_interval,
        mdns=args.mdns,
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    import trio

    config = config_from_args(args)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("fednode.net").setLevel(logging.WARNING)
    trio.run(_serve, config)
    return 0


async def _serve(config: NodeConfig) -> None:
    import signal

    import trio

    from fednode.cli.console import field_lines, show, stdout_console
    from fednode.crypto import load_or_create_key
    from fednode.net.libp2p_host import open_libp2p_host
    from fednode.node.runtime import open_node, system_load

    key, created = load_or_create_key(config.key_path)
    console = stdout_console()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_libp2p_host(key, config.listen_addrs(), mdns=config.mdns) as host:
            addrs = host.listen_addrs()
            rows = [
                ("peer ID", key.peer_id),
                ("role", config.role),
                ("federation", config.federation),
            ]
            rows += [("key", f"{config.key_path}{' (new)' if created else ''}")]
            rows += [("listening", addr) for addr in addrs] or [
                ("listening", "no inbound port (dials out only)")
            ]
            show(console, field_lines(rows, indent=0))
            console.file.flush()
            async with open_node(config, key, host, load=system_load):
                async for _ in signals:
                    break
            print("fednode: stopping", file=console.file, flush=True)
