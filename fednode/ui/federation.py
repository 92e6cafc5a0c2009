"""UI layer: views of a local federation run (``fednode demo``), each a pure function of a
:class:`~fednode.scenario.progress.FederationSnapshot` or a
:class:`~fednode.scenario.federation.DemoResult`.

:func:`render` is the live view: a status line, the nodes by role with their states (``auto``
nodes, ``fednode demo --auto``, in a row of their own), the nodes serving as combiners in the
round in progress, and the rounds so far. :func:`round_line` is the one plain line per round
printed when stdout is not a terminal. :func:`rounds_table` and :func:`summary` are the report at
the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fednode.cli.console import Row, field_lines
from fednode.cli.text import printable
from fednode.scenario.federation import DemoResult
from fednode.scenario.progress import FederationSnapshot, NodeView, Role, RoundRow

ROLE_ORDER: tuple[Role, ...] = ("bootstrap", "reducer", "combiner", "client", "auto")
_PHASE_STYLE = {
    "starting": "yellow",
    "running": "cyan",
    "stopping": "cyan",
    "completed": "green",
    "failed": "bold red",
}


def render(snapshot: FederationSnapshot) -> Group:
    """The live view of ``snapshot``."""
    parts: list[RenderableType] = [status_line(snapshot), Text(), nodes_table(snapshot.nodes)]
    if snapshot.serving and snapshot.current_round is not None:
        parts.append(
            Text(
                f"combiners in round {snapshot.current_round}: "
                + ", ".join(printable(name) for name in snapshot.serving),
                style="dim",
            )
        )
    if snapshot.completed:
        parts += [Text(), rounds_table(snapshot.completed, rounds=snapshot.rounds)]
        served = combiners_line(snapshot.completed)
        if served:
            parts.append(Text(served, style="dim"))
    if snapshot.error is not None:
        parts.append(Text(f"error: {printable(snapshot.error)}", style="bold red"))
    return Group(*parts)


def status_line(snapshot: FederationSnapshot) -> Text:
    """``fednode demo  10 clients · 2 combiners · 5 rounds  round 3 of 5  12.4 s`` (auto mode:
    ``10 auto nodes · 2 combiners elected · ...``)."""
    line = Text("fednode demo", style="bold")
    data = _count(snapshot.clients, "auto node" if snapshot.auto else "client")
    combiners = _count(snapshot.combiners, "combiner") + (" elected" if snapshot.auto else "")
    line.append(f"  {data} · {combiners} · {_count(snapshot.rounds, 'round')}  ", style="dim")
    line.append(_phase_text(snapshot), style=_PHASE_STYLE[snapshot.phase])
    line.append(f"  {snapshot.elapsed:.1f} s", style="dim")
    return line


def _phase_text(snapshot: FederationSnapshot) -> str:
    if snapshot.phase == "starting":
        up = sum(node.peer_id != "" for node in snapshot.nodes)
        return f"starting ({up}/{len(snapshot.nodes)} processes up)"
    if snapshot.phase == "running":
        return f"round {snapshot.current_round} of {snapshot.rounds}"
    if snapshot.phase == "stopping":
        return "session completed, stopping nodes"
    return snapshot.phase


def nodes_table(nodes: Sequence[NodeView]) -> Table:
    """One row per role: how many nodes, what states they are in, the latest round reported."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("role")
    table.add_column("nodes", justify="right")
    table.add_column("round", justify="right")
    table.add_column("state")
    for role in ROLE_ORDER:
        members = [node for node in nodes if node.role == role]
        if not members:
            continue
        rounds = [node.round for node in members if node.round is not None]
        table.add_row(
            role,
            str(len(members)),
            str(max(rounds)) if rounds else "",
            _states(members),
        )
    return table


def _states(members: Sequence[NodeView]) -> str:
    """``8 included · 2 pushed``, most common first, or just the state when all share it."""
    counts = Counter(printable(node.state) for node in members)
    if len(counts) == 1 and len(members) == 1:
        return next(iter(counts))
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return " · ".join(f"{count} {state}" for state, count in ordered)


def rounds_table(rows: Sequence[RoundRow], *, rounds: int | None = None) -> Table:
    """Per round: accuracy, loss, wall time, clients included, and the reducer's phase split."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("round", justify="right")
    for name in ("accuracy", "loss", "seconds", "clients", "fetch", "train", "push", "aggr"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            str(row.round) if rounds is None else f"{row.round}/{rounds}",
            _metric(row.accuracy),
            _metric(row.loss),
            f"{row.seconds:.2f}",
            str(row.clients_included),
            *(_seconds(s) for s in (row.fetch_s, row.train_s, row.push_s, row.aggregate_s)),
        )
    return table


def combiners_line(rows: Sequence[RoundRow]) -> str:
    """Who served as combiners, runs of rounds with the same ones together:
    ``combiners  rounds 1-2: auto-0, auto-3 · round 3: auto-3, auto-5``; "" if the demo heard of
    none (a line of its own: the rounds table is as wide as an 80-column terminal)."""
    runs: list[tuple[int, int, tuple[str, ...]]] = []
    for row in rows:
        if not row.combiners:
            continue
        if runs and runs[-1][2] == row.combiners and runs[-1][1] == row.round - 1:
            runs[-1] = (runs[-1][0], row.round, row.combiners)
        else:
            runs.append((row.round, row.round, row.combiners))
    if not runs:
        return ""
    parts = [
        (f"round {first}" if first == last else f"rounds {first}-{last}")
        + ": "
        + ", ".join(printable(name) for name in names)
        for first, last, names in runs
    ]
    return "combiners  " + " · ".join(parts)


def round_line(row: RoundRow, rounds: int) -> str:
    """``round 1/5  accuracy 0.8861  loss 0.4123  1.23 s  10 clients`` (the plain output), then
    ``  combiners auto-1 auto-4`` when the demo heard who combined."""
    line = (
        f"round {row.round}/{rounds}  accuracy {_metric(row.accuracy)}  loss {_metric(row.loss)}"
        f"  {row.seconds:.2f} s  {row.clients_included} clients"
    )
    if row.combiners:
        line += "  combiners " + " ".join(printable(name) for name in row.combiners)
    return line


def startup_line(snapshot: FederationSnapshot) -> str:
    """``14 processes up after 1.52 s; session started after 3.21 s`` (the plain output)."""
    line = f"{len(snapshot.nodes)} processes up"
    if snapshot.processes_up_seconds is not None:
        line += f" after {snapshot.processes_up_seconds:.2f} s"
    if snapshot.startup_seconds is not None:
        line += f"; session started after {snapshot.startup_seconds:.2f} s"
    return line


def summary(
    result: DemoResult, *, reference: float | None = None, tolerance: float | None = None
) -> Group:
    """The closing summary: final accuracy, times, bytes; with ``reference`` (the in-process
    FedAvg's final accuracy) also it and the difference, checked against ``tolerance``."""
    rows: list[Row] = [
        ("final accuracy", _metric(result.final_accuracy)),
        ("rounds", f"{len(result.rounds)} in {_span(result)}"),
        ("start-up", _startup(result)),
        ("total", f"{result.total_seconds:.2f} s"),
        ("bytes sent", _bytes(result.bytes_sent)),
    ]
    parts: list[RenderableType] = []
    if reference is not None:
        rows.append(("reference", f"{reference:.4f}  (in-process FedAvg, same seeds)"))
        if result.final_accuracy is not None:
            difference = result.final_accuracy - reference
            verdict = Text(f"{difference:+.4f}")
            if tolerance is not None:
                ok = abs(difference) <= tolerance
                verdict.append(
                    f"  {'within' if ok else 'OUTSIDE'} ±{tolerance:g}",
                    style="green" if ok else "bold red",
                )
            rows.append(("difference", verdict))
    parts.append(field_lines(rows, indent=0))
    parts.extend(Text(f"warning: {printable(w)}", style="yellow") for w in result.warnings)
    return Group(*parts)


def _startup(result: DemoResult) -> str:
    line = f"{result.startup_seconds:.2f} s to the session's start"
    if result.processes_up_seconds is not None:
        line += f" (processes up after {result.processes_up_seconds:.2f} s)"
    return line


def _span(result: DemoResult) -> str:
    total = sum(row.seconds for row in result.rounds)
    mean = total / len(result.rounds) if result.rounds else 0.0
    return f"{total:.2f} s ({mean:.2f} s per round)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _bytes(count: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit} ({count:,} bytes)"
    return f"{count:,} bytes"
