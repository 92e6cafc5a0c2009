"""The self-healing tree with real processes: ``fednode demo --kill`` kills a combiner mid-round,
or the reducer mid-session, and the session still ends with the model a run without failures
learns over the same clients (training is deterministic: fixed seeds per client and round).

Three small federations (4 clients, 2 combiners, 2 rounds) over libp2p on loopback: one without
failures, one whose combiner-0 is killed while updates of round 2 are being pushed (its clients
re-attach to combiner-1 by an amended plan and re-push the updates they kept), and one whose
reducer is killed while round 2 trains (the standby takes over after its lease, resumes round 2
from the signed checkpoint and the clients re-push their kept updates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from demo_run import final_model, run_demo

pytestmark = [pytest.mark.libp2p, pytest.mark.timeout(420)]

SMALL = ("--clients", "4", "--combiners", "2", "--rounds", "2", "--epochs", "2")


def demo(tmp_path: Path, *args: str) -> dict[str, Any]:
    return run_demo(tmp_path, *SMALL, *args, timeout=300)


def assert_same_model(a: dict[str, Any], b: dict[str, Any]) -> None:
    ma, mb = final_model(a), final_model(b)
    assert list(ma) == list(mb)
    for name in ma:
        np.testing.assert_allclose(mb[name], ma[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return demo(tmp_path_factory.mktemp("baseline"))


def test_a_combiner_killed_mid_round_heals_to_the_same_model(
    tmp_path: Path, baseline: dict[str, Any]
) -> None:
    # Execute
    healed = demo(tmp_path, "--kill", "combiner@2:push")
    # Assert: the kill fired, the plan was amended, every round counted all 4 clients
    kinds = [e["kind"] for e in healed["events"]]
    assert "kill" in kinds and "re-planned" in kinds, healed["events"]
    assert [r["clients_included"] for r in healed["rounds"]] == [4, 4]
    assert len(healed["heal_seconds"]) == 1 and healed["heal_seconds"][0] is not None
    assert_same_model(baseline, healed)


def test_a_reducer_killed_mid_session_heals_to_the_same_model(
    tmp_path: Path, baseline: dict[str, Any]
) -> None:
    # Execute
    healed = demo(tmp_path, "--kill", "reducer@2:train")
    # Assert: a standby was elected at a higher term and finished the session
    elected = [e for e in healed["events"] if e["kind"] == "elected"]
    assert [e["node"] for e in elected][-1] == "reducer-1", healed["events"]
    assert elected[-1]["term"] > elected[0]["term"]
    assert [r["clients_included"] for r in healed["rounds"]] == [4, 4]
    assert healed["heal_seconds"][0] is not None
    assert_same_model(baseline, healed)
