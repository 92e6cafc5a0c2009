"""The demo's views of an auto-mode federation (``fednode demo --auto``): auto nodes in a row of
their own, who combines in the round in progress and in each round, rendered from hand-built
snapshots to a fixed-width string console."""

from __future__ import annotations

import io

from rich.console import Console

from fednode.scenario.progress import FederationSnapshot, NodeView, RoundRow
from fednode.ui.federation import combiners_line, render, round_line


def text(renderable: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable, soft_wrap=True)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return "\n".join(line.rstrip() for line in out.splitlines())


def row(number: int, *combiners: str) -> RoundRow:
    return RoundRow(
        round=number, accuracy=0.9, loss=0.3, seconds=1.0, clients_included=4, combiners=combiners
    )


def test_live_view_of_auto_nodes_in_round_two() -> None:
    # Prepare
    autos = [
        NodeView(name=f"auto-{i}", role="auto", peer_id=f"p{i}", state=state, round=2)
        for i, state in enumerate(["combining", "pushed", "combining", "killed (SIGKILL)"])
    ]
    snapshot = FederationSnapshot(
        clients=4,
        combiners=2,
        rounds=3,
        auto=True,
        phase="running",
        elapsed=9.0,
        nodes=(
            NodeView(name="bootstrap", role="bootstrap", peer_id="b", state="up"),
            NodeView(name="reducer", role="reducer", peer_id="r", state="running", round=1),
            *autos,
        ),
        completed=(row(1, "auto-0", "auto-3"),),
        serving=("auto-0", "auto-2", "auto-3"),
    )
    # Execute
    out = text(render(snapshot))
    # Assert
    assert out == (
        "fednode demo  4 auto nodes · 2 combiners elected · 3 rounds  round 2 of 3  9.0 s\n"
        "\n"
        "role        nodes   round   state\n"
        "───────────────────────────────────────────────────────────────────────\n"
        "bootstrap       1           up\n"
        "reducer         1       1   running\n"
        "auto            4       2   2 combining · 1 killed (SIGKILL) · 1 pushed\n"
        "combiners in round 2: auto-0, auto-2, auto-3\n"
        "\n"
        "round   accuracy     loss   seconds   clients   fetch   train   push   aggr\n"
        "───────────────────────────────────────────────────────────────────────────\n"
        "  1/3     0.9000   0.3000      1.00         4       -       -      -      -\n"
        "combiners  round 1: auto-0, auto-3"
    )


def test_combiners_line_groups_runs_of_rounds_with_the_same_combiners() -> None:
    # Prepare
    rows = [
        row(1, "auto-0", "auto-3"),
        row(2, "auto-0", "auto-3"),
        row(3, "auto-0", "auto-1", "auto-3"),
        row(4, "auto-0", "auto-1"),
        row(5, "auto-0", "auto-1"),
        row(6),  # nobody heard of
        row(7, "auto-0", "auto-1"),
    ]
    # Execute, Assert
    assert combiners_line(rows) == (
        "combiners  rounds 1-2: auto-0, auto-3 · round 3: auto-0, auto-1, auto-3 · "
        "rounds 4-5: auto-0, auto-1 · round 7: auto-0, auto-1"
    )
    assert combiners_line([row(1), row(2)]) == ""


def test_plain_line_names_the_round_s_combiners_when_known() -> None:
    # Execute, Assert
    assert round_line(row(2, "auto-1", "auto\x1b[2J"), 3) == (
        "round 2/3  accuracy 0.9000  loss 0.3000  1.00 s  4 clients  combiners auto-1 auto\\x1b[2J"
    )
    assert round_line(row(2), 3).endswith("4 clients")
