"""The demo's views, rendered from hand-built snapshots to a fixed-width string console and
compared as text."""

from __future__ import annotations

import io

from rich.console import Console

from fednode.scenario.federation import DemoResult
from fednode.scenario.progress import FederationSnapshot, NodeView, RoundRow
from fednode.ui.federation import render, round_line, rounds_table, startup_line, summary

ROWS = (
    RoundRow(
        round=1,
        accuracy=0.8861,
        loss=0.41234,
        seconds=1.234,
        clients_included=10,
        num_examples=1437,
        fetch_s=0.012,
        train_s=1.1,
        push_s=0.05,
        aggregate_s=0.004,
    ),
    RoundRow(round=2, accuracy=None, loss=None, seconds=0.9, clients_included=9),
)


def text(renderable: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable, soft_wrap=True)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return "\n".join(line.rstrip() for line in out.splitlines())


def federation_in_round_three() -> FederationSnapshot:
    clients = [
        NodeView(
            name=f"client-{i}",
            role="client",
            peer_id=f"12D3KooWc{i}",
            state="included" if i < 7 else "pushed",
            round=2,
        )
        for i in range(9)
    ]
    clients.append(NodeView(name="client-9", role="client", peer_id="12D3KooWc9", state="exited 3"))
    return FederationSnapshot(
        clients=10,
        combiners=2,
        rounds=5,
        phase="running",
        elapsed=12.345,
        processes_up_seconds=1.5,
        startup_seconds=3.21,
        nodes=(
            NodeView(name="bootstrap", role="bootstrap", peer_id="12D3KooWb", state="up"),
            NodeView(name="reducer", role="reducer", peer_id="12D3KooWr", state="running", round=2),
            NodeView(name="combiner-0", role="combiner", peer_id="12D3KooWx", state="pushed"),
            NodeView(name="combiner-1", role="combiner", peer_id="12D3KooWy", state="up"),
            *clients,
        ),
        completed=ROWS,
    )


def test_live_view_shows_nodes_by_role_and_the_rounds_so_far() -> None:
    # Prepare
    snapshot = federation_in_round_three()
    # Execute
    out = text(render(snapshot))
    # Assert
    assert out == (
        "fednode demo  10 clients · 2 combiners · 5 rounds  round 3 of 5  12.3 s\n"
        "\n"
        "role        nodes   round   state\n"
        "──────────────────────────────────────────────────────────────\n"
        "bootstrap       1           up\n"
        "reducer         1       2   running\n"
        "combiner        2           1 pushed · 1 up\n"
        "client         10       2   7 included · 2 pushed · 1 exited 3\n"
        "\n"
        "round   accuracy     loss   seconds   clients   fetch   train    push    aggr\n"
        "─────────────────────────────────────────────────────────────────────────────\n"
        "  1/5     0.8861   0.4123      1.23        10   0.012   1.100   0.050   0.004\n"
        "  2/5          -        -      0.90         9       -       -       -       -"
    )


def test_live_view_while_starting_counts_the_processes_up() -> None:
    # Prepare
    snapshot = FederationSnapshot(
        clients=1,
        combiners=1,
        rounds=1,
        elapsed=0.5,
        nodes=(
            NodeView(name="bootstrap", role="bootstrap", peer_id="12D3KooWb", state="up"),
            NodeView(name="reducer", role="reducer"),
        ),
    )
    # Execute
    out = text(render(snapshot))
    # Assert
    assert out == (
        "fednode demo  1 client · 1 combiner · 1 round  starting (1/2 processes up)  0.5 s\n"
        "\n"
        "role        nodes   round   state\n"
        "────────────────────────────────────\n"
        "bootstrap       1           up\n"
        "reducer         1           starting"
    )


def test_live_view_of_a_failed_run_ends_with_the_error() -> None:
    # Prepare
    snapshot = FederationSnapshot(
        clients=2,
        combiners=1,
        rounds=3,
        phase="failed",
        elapsed=9.5,
        nodes=(NodeView(name="reducer", role="reducer", peer_id="p", state="exited 1"),),
        error="the session failed: round 2 fell short\x1b[2J",
    )
    # Execute
    out = text(render(snapshot))
    # Assert: the error, escaped (it comes from a peer), on the last line
    assert out.splitlines()[0] == "fednode demo  2 clients · 1 combiner · 3 rounds  failed  9.5 s"
    assert out.splitlines()[-1] == "error: the session failed: round 2 fell short\\x1b[2J"


def test_final_rounds_table_numbers_rounds_plainly() -> None:
    # Execute
    out = text(rounds_table(ROWS))
    # Assert
    assert out.splitlines()[2] == (
        "    1     0.8861   0.4123      1.23        10   0.012   1.100   0.050   0.004"
    )


def test_summary_with_reference_and_warning() -> None:
    # Prepare
    result = DemoResult(
        rounds=ROWS,
        final_accuracy=0.9472,
        total_seconds=11.5,
        startup_seconds=3.21,
        first_round_seconds=4.4,
        processes_up_seconds=1.5,
        bytes_sent=12_345_678,
        warnings=("client-3 exited with code 1 when stopped",),
    )
    # Execute
    within = text(summary(result, reference=0.9444, tolerance=0.005))
    outside = text(summary(result, reference=0.9, tolerance=0.005))
    # Assert
    assert within == (
        "final accuracy  0.9472\n"
        "rounds          2 in 2.13 s (1.07 s per round)\n"
        "start-up        3.21 s to the session's start (processes up after 1.50 s)\n"
        "total           11.50 s\n"
        "bytes sent      12.3 MB (12,345,678 bytes)\n"
        "reference       0.9444  (in-process FedAvg, same seeds)\n"
        "difference      +0.0028  within ±0.005\n"
        "warning: client-3 exited with code 1 when stopped"
    )
    assert "difference      +0.0472  OUTSIDE ±0.005" in outside


def test_summary_without_reference() -> None:
    # Prepare
    result = DemoResult(
        rounds=(),
        final_accuracy=None,
        total_seconds=1.0,
        startup_seconds=0.5,
        first_round_seconds=None,
        bytes_sent=999,
    )
    # Execute
    out = text(summary(result))
    # Assert
    assert out == (
        "final accuracy  -\n"
        "rounds          0 in 0.00 s (0.00 s per round)\n"
        "start-up        0.50 s to the session's start\n"
        "total           1.00 s\n"
        "bytes sent      999 bytes"
    )


def test_plain_lines() -> None:
    # Execute, Assert
    assert round_line(ROWS[0], 5) == "round 1/5  accuracy 0.8861  loss 0.4123  1.23 s  10 clients"
    assert round_line(ROWS[1], 5) == "round 2/5  accuracy -  loss -  0.90 s  9 clients"
    assert startup_line(federation_in_round_three()) == (
        "14 processes up after 1.50 s; session started after 3.21 s"
    )
