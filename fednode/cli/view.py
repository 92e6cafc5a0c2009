"""CLI layer: the rich view of an :class:`~fednode.cli.describe.Inspection`.

A message prints as aligned ``field  value`` lines (nested records and maps flattened to
``contributions[0].signer``), public keys as their peer ID, tensors and models as a table of
summaries. Long lists are cut short here; the JSON view lists everything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fednode.cli.console import Row, field_lines, heading
from fednode.cli.describe import (
    HEX_PREVIEW_BYTES,
    MAX_HEX_BYTES,
    Inspection,
    TensorSummary,
    fields_of,
    is_public_key,
    is_secret,
    peer_id_or_none,
    tensor_summaries,
)
from fednode.cli.text import printable

MAX_LIST_ITEMS = 20
MAX_TABLE_ROWS = 50
#: ``*_ms`` integers in this range also show as dates (2001 to 5138); durations are smaller.
EPOCH_MS_FROM, EPOCH_MS_UNTIL = 10**12, 10**14


def render_inspection(inspection: Inspection) -> Group:
    parts: list[RenderableType] = [
        heading(inspection.source, f"{inspection.size:,} bytes  blake3 {inspection.digest.hex()}")
    ]
    envelope = inspection.envelope
    if envelope is not None:
        parts.append(heading("signed envelope"))
        parts.append(
            field_lines(
                [
                    ("signer", _public_key(envelope.signer)),
                    ("domain", envelope.domain),
                    ("signature", envelope.signature.hex()),
                ]
            )
        )
        parts.append(Text("signature: valid", style="bold green"))
    msg = inspection.message
    parts.append(heading(f"{msg.TYPE} v{msg.VERSION}", "payload" if envelope is not None else ""))
    rows: list[Row] = []
    tables: list[tuple[str, list[TensorSummary]]] = []
    for name, value in fields_of(msg):
        rows.extend(_rows(msg, name, value, name, tables))
    if rows:
        parts.append(field_lines(rows))
    parts.extend(tensor_table(tensors, title=path) for path, tensors in tables)
    return Group(*parts)


def _rows(
    owner: Any, name: str, value: Any, path: str, tables: list[tuple[str, list[TensorSummary]]]
) -> Iterator[Row]:
    """The lines for field ``name`` of ``owner``, shown as ``path``; tensors go to ``tables``."""
    if is_secret(owner, name):
        yield path, Text("(secret, not shown)", style="dim")
    elif is_public_key(owner, name) and isinstance(value, bytes):
        yield path, _public_key(value)
    else:
        yield from _value_rows(name, value, path, tables)


def _value_rows(
    name: str, value: Any, path: str, tables: list[tuple[str, list[TensorSummary]]]
) -> Iterator[Row]:
    if value is None:
        yield path, Text("none", style="dim")
    elif isinstance(value, bool):
        yield path, "true" if value else "false"
    elif isinstance(value, int):
        yield path, _int(name, value)
    elif isinstance(value, float):
        yield path, repr(value)
    elif isinstance(value, str):
        yield path, value if value else Text('""', style="dim")
    elif isinstance(value, bytes):
        yield path, _bytes(value)
    elif (tensors := tensor_summaries(value)) is not None:
        tables.append((path, tensors))
        yield path, Text(_tensor_totals(tensors) + " (table below)", style="dim")
    elif dataclasses.is_dataclass(value):
        for field, item in fields_of(value):
            yield from _rows(value, field, item, f"{path}.{field}", tables)
    elif isinstance(value, dict):
        yield from _items_rows(
            name, [(f"{path}.{key}", v) for key, v in value.items()], path, "{}", tables
        )
    elif isinstance(value, (tuple, list)):
        if (
            all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value)
            and len(value) <= MAX_LIST_ITEMS
        ):
            yield path, "[" + ", ".join(map(str, value)) + "]"
        else:
            yield from _items_rows(
                name, [(f"{path}[{i}]", v) for i, v in enumerate(value)], path, "[]", tables
            )
    else:
        raise TypeError(f"no view for {type(value).__name__}")


def _items_rows(
    name: str,
    items: list[tuple[str, Any]],
    path: str,
    empty: str,
    tables: list[tuple[str, list[TensorSummary]]],
) -> Iterator[Row]:
    if not items:
        yield path, Text(empty, style="dim")
    for item_path, item in items[:MAX_LIST_ITEMS]:
        yield from _value_rows(name, item, item_path, tables)
    if len(items) > MAX_LIST_ITEMS:
        yield path, Text(f"… {len(items) - MAX_LIST_ITEMS} more (--json lists all)", style="dim")


def _public_key(key: bytes) -> Text:
    peer_id = peer_id_or_none(key)
    text = Text(peer_id) if peer_id is not None else Text("(not an Ed25519 key)", style="red")
    text.append(f"  key {key.hex()}", style="dim")
    return text


def _bytes(value: bytes) -> str | Text:
    if len(value) <= MAX_HEX_BYTES:
        return value.hex() if value else Text("(empty)", style="dim")
    return Text(f"{len(value):,} bytes: {value[:HEX_PREVIEW_BYTES].hex()}…", style="dim")


def _int(name: str, value: int) -> str | Text:
    """An integer; a ``*_ms`` field that reads as a date since 2001 also shows it (UTC)."""
    if not (name.endswith("_ms") and EPOCH_MS_FROM <= value < EPOCH_MS_UNTIL):
        return str(value)
    when = dt.datetime.fromtimestamp(value / 1000, tz=dt.UTC)
    text = Text(str(value))
    text.append(f"  {when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}", style="dim")
    return text


def tensor_table(tensors: list[TensorSummary], title: str = "") -> Table:
    """A table of tensor summaries, at most :data:`MAX_TABLE_ROWS` rows."""
    show_nonfinite = any(t.nonfinite for t in tensors)
    table = Table(title=title or None, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("name", overflow="fold")
    table.add_column("dtype")
    table.add_column("shape")
    for column in ("nbytes", "min", "max", "mean", *(["non-finite"] if show_nonfinite else [])):
        table.add_column(column, justify="right")
    for t in tensors[:MAX_TABLE_ROWS]:
        cells = [t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]", human_bytes(t.nbytes)]
        cells += [_stat(t.min), _stat(t.max), _stat(t.mean)]
        if show_nonfinite:
            cells.append(f"{t.nonfinite:,}")
        table.add_row(*(Text(printable(c)) for c in cells))  # names are untrusted
    if len(tensors) > MAX_TABLE_ROWS:
        table.caption = f"… {len(tensors) - MAX_TABLE_ROWS} more tensors (--json lists all)"
        table.caption_justify = "left"
    return table


def _tensor_totals(tensors: list[TensorSummary]) -> str:
    count = len(tensors)
    values = sum(t.size for t in tensors)
    nbytes = sum(t.nbytes for t in tensors)
    return f"{count} tensor{'s' if count != 1 else ''}, {values:,} values, {human_bytes(nbytes)}"


def _stat(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"
