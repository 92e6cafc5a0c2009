"""CLI layer: ``fednode inspect FILE``, decode a message or signed envelope from disk or stdin.

The input is read with a size bound, decoded with blob-sized limits, and an envelope's
signature is verified before its payload is decoded (:func:`fednode.crypto.open_envelope`). A
malformed input fails with ``WireError``'s exit code, a bad signature with
``BadSignatureError``'s, each as one line.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fednode.cli.command import Subparsers
    from fednode.cli.describe import Inspection

DEFAULT_MAX_SIZE = 64 << 20
_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(text: str) -> int:
    """``4096``, ``512K``, ``64M``, ``1GiB`` (binary units) as a positive number of bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive size like 4096, 512K or 64M, got {text!r}"
        )
    return int(match[1]) * _UNITS[match[2].lower()]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="decode a message or signed envelope",
        description="Decode a fednode message or signed envelope and show its fields. An "
        "envelope's signature is verified first. Tensors are summarised, never dumped.",
    )
    parser.add_argument("file", metavar="FILE", help="the file to read, or - for stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--max-size",
        metavar="BYTES",
        type=byte_size,
        default=DEFAULT_MAX_SIZE,
        help="refuse inputs larger than this (default: 64M)",
    )
    return parser


def read_input(file: str, max_size: int) -> tuple[str, bytes]:
    """(label, bytes) of ``file`` (``-``: stdin), reading at most ``max_size`` + 1 bytes."""
    from fednode.errors import WireError

    if file == "-":
        label, data = "<stdin>", sys.stdin.buffer.read(max_size + 1)
    else:
        with open(file, "rb") as f:
            label, data = file, f.read(max_size + 1)
    if len(data) > max_size:
        raise WireError(f"{label} is larger than {max_size} bytes (raise --max-size)")
    return label, data


def inspect_bytes(label: str, data: bytes, max_size: int) -> Inspection:
    """Decode ``data``; if it is an envelope, verify it and decode its payload."""
    import dataclasses
    from typing import Any

    from fednode.cli.describe import Inspection
    from fednode.crypto import digest, open_envelope
    from fednode.errors import BadSignatureError, WireError
    from fednode.wire import BLOB_LIMITS, Envelope, decode

    limits = dataclasses.replace(BLOB_LIMITS, max_frame=max_size)
    try:
        msg: Any = decode(data, None, limits)
        envelope = None
        if isinstance(msg, Envelope):
            msg, envelope = open_envelope(msg, None, limits)
    except WireError as exc:
        raise WireError(f"{label} is not a valid fednode message: {exc}") from exc
    except BadSignatureError as exc:
        raise BadSignatureError(f"{label}: {exc}") from exc
    return Inspection(
        source=label, size=len(data), digest=digest(data), envelope=envelope, message=msg
    )


def run(args: argparse.Namespace) -> int:
    from fednode.cli.console import show, stdout_console
    from fednode.cli.describe import inspection_json
    from fednode.cli.view import render_inspection

    label, data = read_input(args.file, args.max_size)
    inspection = inspect_bytes(label, data, args.max_size)
    console = stdout_console()
    if args.json:
        console.print_json(data=inspection_json(inspection), allow_nan=False)
    else:
        show(console, render_inspection(inspection))
    return 0
