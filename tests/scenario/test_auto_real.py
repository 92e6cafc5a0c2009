"""``fednode demo --auto`` with real nodes: a bootstrap node, a reducer and ``--role auto`` nodes,
separate ``fednode start`` processes over libp2p on loopback, no combiner process.

(a) Four auto nodes, two elected combiners, two rounds: every round counts all four, two auto
nodes combine each round, and the final model is the in-process FedAvg reference's (the elected
combiners fold their own update in once). (b) The lowest-numbered auto node combining round 2 is
killed while its clients push: its clients move to another auto node by an amended plan, the
session completes, and the rounds from the kill on count the three auto nodes left. (c) The
reducer is killed while round 2 trains: an auto node takes over at a higher term, trains no
more, and the rounds from the kill on count the three others.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from demo_run import final_model, run_demo

from fednode.task import digits
from fednode.task.api import load_task
from fednode.task.reference import run_reference

pytestmark = [pytest.mark.libp2p, pytest.mark.timeout(180)]

SMALL = ("--auto", "--clients", "4", "--combiners", "2", "--epochs", "1", "--batch-size", "32")
AUTOS = {f"auto-{i}" for i in range(4)}


def demo(tmp_path: Path, *args: str) -> dict[str, Any]:
    summary = run_demo(tmp_path, *SMALL, *args, timeout=120)
    assert "warning" not in summary["stdout"], summary["stdout"]
    return summary


def kill_events(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in summary["events"] if e["kind"] == "kill"]


def test_auto_nodes_elect_two_combiners_and_learn_the_reference_model(tmp_path: Path) -> None:
    # Execute
    summary = demo(tmp_path, "--rounds", "2")
    reference = run_reference(
        load_task("fednode.task.digits"),
        clients=4,
        rounds=2,
        config=dataclasses.replace(digits.DEFAULT_CONFIG, epochs=1, batch_size=32),
        scheme="iid",
        seed=0,
    )
    # Assert: every node counted once a round, two of them combining
    rounds = summary["rounds"]
    assert [r["clients_included"] for r in rounds] == [4, 4]
    assert all(len(r["combiners"]) == 2 and set(r["combiners"]) <= AUTOS for r in rounds), rounds
    # (No kill. A peer called dead too soon on a loaded machine may cost an amended plan, which
    # changes nothing below: the amended plan keeps every update.)
    assert not kill_events(summary), summary["events"]
    final, expected = final_model(summary), reference[-1].model
    assert list(final) == list(expected)
    for name, array in expected.items():
        scale = float(np.max(np.abs(array))) or 1.0
        np.testing.assert_allclose(final[name], array, rtol=1e-6, atol=1e-6 * scale, err_msg=name)


def test_an_auto_combiner_killed_mid_round_heals_with_the_nodes_left(tmp_path: Path) -> None:
    # Execute
    summary = demo(tmp_path, "--rounds", "3", "--kill", "combiner@2:push")
    # Assert: the victim combined round 2; an amended plan moved its clients; 3 nodes after it
    rounds = summary["rounds"]
    (kill,) = kill_events(summary)
    assert kill["node"] in rounds[1]["combiners"], summary["events"]
    assert "re-planned" in [e["kind"] for e in summary["events"]], summary["events"]
    assert [r["clients_included"] for r in rounds] == [4, 3, 3]
    assert kill["node"] not in rounds[2]["combiners"]
    assert len(summary["heal_seconds"]) == 1 and summary["heal_seconds"][0] is not None


def test_a_killed_reducer_is_succeeded_by_an_auto_node(tmp_path: Path) -> None:
    # Execute
    summary = demo(tmp_path, "--rounds", "3", "--kill", "reducer@2:train")
    # Assert: an auto node took over at a higher term, then trained no more. (Were the auto
    # standbys to disagree on their ranks, all would claim at once and the round would stall,
    # split between reducers, until its deadline: past the demo's timeout.)
    elected = [e for e in summary["events"] if e["kind"] == "elected"]
    assert elected[0]["node"] == "reducer", summary["events"]
    successor = elected[-1]["node"]
    assert successor in AUTOS and elected[-1]["term"] > elected[0]["term"], summary["events"]
    rounds = summary["rounds"]
    assert [r["clients_included"] for r in rounds] == [4, 3, 3]
    assert successor not in rounds[2]["combiners"]
    assert summary["heal_seconds"][0] is not None
