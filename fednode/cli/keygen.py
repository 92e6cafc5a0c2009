"""CLI layer: ``fednode keygen PATH [--force]``, create a node's Ed25519 key file (mode 0600)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fednode.cli.command import Subparsers


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "keygen",
        help="create an Ed25519 key file",
        description="Create a node key file (mode 0600) and print its peer ID. "
        "One key is the node's libp2p identity and its signing key.",
    )
    parser.add_argument("path", metavar="PATH", type=Path, help="where to write the key")
    parser.add_argument("--force", action="store_true", help="replace an existing file at PATH")
    return parser


def run(args: argparse.Namespace) -> int:
    from fednode.cli.console import field_lines, show, stdout_console
    from fednode.crypto import NodeKey, save_key
    from fednode.errors import KeyFileError

    path: Path = args.path
    if path.is_dir():
        raise KeyFileError(f"{path} is a directory; give the path of a key file")
    existed = path.exists()
    key = NodeKey.generate()
    save_key(key, path, overwrite=args.force)
    action = "replaced" if existed else "created"
    show(
        stdout_console(),
        field_lines([("peer ID", key.peer_id), (action, f"{path} (mode 0600)")], indent=0),
    )
    return 0
