"""CLI layer: the stdout console and the aligned ``key  value`` lines the commands print.

Markup and highlighting are off: values come from files and peers, and a ``[`` in a federation
name must print as itself. rich drops colour by itself when stdout is not a terminal. Field
lines never wrap or crop, so a 64-character hex digest stays on one line for ``grep``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.text import Text

from fednode.cli.text import printable

Row = tuple[str, str | Text]


def stdout_console() -> Console:
    return Console(file=sys.stdout, markup=False, highlight=False, emoji=False)


def show(console: Console, *renderables: RenderableType) -> None:
    """Print without wrapping or cropping long field lines (tables still fit the width)."""
    console.print(*renderables, soft_wrap=True)


def field_lines(rows: Sequence[Row], indent: int = 2) -> Group:
    """Rows as aligned ``key  value`` lines; string values are escaped, Text values trusted."""
    width = max((len(key) for key, _ in rows), default=0)
    lines = []
    for key, value in rows:
        line = Text(" " * indent)
        line.append(printable(key).ljust(width), style="bold")
        line.append("  ")
        line.append_text(value if isinstance(value, Text) else Text(printable(value)))
        lines.append(line)
    return Group(*lines)


def heading(text: str, detail: str = "") -> Text:
    """A section title, with an optional dim detail after it."""
    line = Text(printable(text), style="bold cyan")
    if detail:
        line.append("  " + printable(detail), style="dim")
    return line
