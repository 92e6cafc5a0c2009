"""CLI layer: ``fednode id PATH [--json]``, the peer ID and public key of a key file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fednode.cli.command import Subparsers


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "id",
        help="show the peer ID of a key file",
        description="Print the peer ID and the Ed25519 public key (hex) of a key file. "
        "Refuses a key file that others can read.",
    )
    parser.add_argument("path", metavar="PATH", type=Path, help="the key file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run(args: argparse.Namespace) -> int:
    from fednode.cli.console import field_lines, show, stdout_console
    from fednode.crypto import load_key

    key = load_key(args.path)
    console = stdout_console()
    if args.json:
        console.print_json(
            data={
                "peer_id": key.peer_id,
                "public_key": key.public_key.hex(),
                "path": str(args.path),
            }
        )
    else:
        show(
            console,
            field_lines([("peer ID", key.peer_id), ("public key", key.public_key.hex())], indent=0),
        )
    return 0
