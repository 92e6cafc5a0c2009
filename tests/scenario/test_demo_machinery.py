"""``fednode demo``'s machinery against stand-in nodes (``fake_node.py``: the ``--events`` contract,
no network): the result and its ``--json``, the exit code, and that no process it started
survives it, whether the run completes, fails, a node crashes, or the demo is interrupted; with
the nodes forked from the zygote and with each a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fednode.errors import ConfigError
from fednode.scenario.federation import DemoConfig, Federation, Launcher
from fednode.scenario.kills import parse_kill
from fednode.scenario.launcher import fork_supported

pytestmark = pytest.mark.timeout(60)

FAKE_NODE = Path(__file__).with_name("fake_node.py")
PROGRAM = (sys.executable, str(FAKE_NODE))
BYTES_SENT = 1000  # fake_node.BYTES_SENT, per node
WAIT = 30.0


DEMO = (sys.executable, "-m", "fednode", "demo", "--node-program", " ".join(PROGRAM), "--no-live")


@pytest.fixture(params=["fork", "exec"])
def launcher(request: pytest.FixtureRequest) -> Launcher:
    how: Launcher = request.param
    if how == "fork" and not fork_supported():
        pytest.skip("the zygote needs Linux")
    return how


def demo(
    data_dir: Path, launcher: Launcher, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, "--launcher", launcher, "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=WAIT,
    )


def started_pids(data_dir: Path) -> dict[str, int]:
    """Every process the stand-ins wrote down: nodes (``pid``) and their workers."""
    return {
        f"{path.parent.name}/{path.name}": int(path.read_text())
        for pattern in ("*/pid", "*/worker.pid")
        for path in data_dir.glob(pattern)
    }


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def survivors(data_dir: Path) -> list[str]:
    return [name for name, pid in started_pids(data_dir).items() if alive(pid)]


def test_a_completed_run_reports_writes_json_and_leaves_no_process(
    tmp_path: Path, launcher: Launcher
) -> None:
    # Prepare
    out = tmp_path / "result.json"
    # Execute
    result = demo(
        tmp_path / "data",
        launcher,
        *("--clients", "3", "--combiners", "2", "--rounds", "4", "--json", str(out)),
        env={"FAKE_WORKER": "1"},
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"7 processes up after [\d.]+ s; session started after [\d.]+ s", lines[0])
    assert lines[1:5] == [
        f"round {r}/4  accuracy {0.5 + 0.1 * r:.4f}  loss {1 / r:.4f}  0.02 s  3 clients"
        for r in range(1, 5)
    ]
    assert "final accuracy  0.9000" in result.stdout
    document = json.loads(out.read_text())
    assert set(document) == {
        "rounds",
        "final_accuracy",
        "total_seconds",
        "startup_seconds",
        "bytes_sent",
        "model",
        "events",
        "heal_seconds",
    }
    assert (document["events"], document["heal_seconds"]) == ([], [])  # nothing was killed
    assert document["rounds"] == [
        {
            "round": r,
            "accuracy": round(0.5 + 0.1 * r, 4),
            "loss": round(1 / r, 4),
            "seconds": 0.02,
            "clients_included": 3,
            "combiners": [],  # the stand-ins say nothing of who combines
        }
        for r in range(1, 5)
    ]
    assert document["final_accuracy"] == 0.9
    assert 0 < document["startup_seconds"] < document["total_seconds"] < WAIT
    assert document["bytes_sent"] == 7 * BYTES_SENT  # bootstrap, reducer, 2 combiners, 3 clients
    pids = started_pids(tmp_path / "data")
    assert len(pids) == 14  # 7 nodes, 7 workers
    parents = {path.read_text() for path in (tmp_path / "data").glob("*/parent")}
    assert len(parents) == 1  # every node: forked from the zygote, or started by the demo
    assert ("fednode.scenario.zygote" in parents.pop()) == (launcher == "fork")
    assert survivors(tmp_path / "data") == []
    assert sorted(p.name for p in (tmp_path / "data").glob("*.log")) == sorted(
        ["bootstrap.log", "reducer.log", "combiner-0.log", "combiner-1.log"]
        + [f"client-{i}.log" for i in range(3)]
    )


def test_session_failed_exits_nonzero_with_one_line_and_cleans_up(
    tmp_path: Path, launcher: Launcher
) -> None:
    # Prepare
    out = tmp_path / "result.json"
    # Execute
    result = demo(
        tmp_path / "data",
        launcher,
        *("--clients", "2", "--rounds", "3", "--json", str(out)),
        env={"FAKE_FAIL_ROUND": "2", "FAKE_WORKER": "1"},
    )
    # Assert
    assert result.returncode == 1
    assert result.stderr == (
        "fednode: error: the session failed: round 2 fell short: 0 of 2 clients\n"
    )
    assert "round 1/3  accuracy 0.6000" in result.stdout  # the round it did finish
    assert not out.exists()
    assert len(started_pids(tmp_path / "data")) == 12  # 6 nodes, 6 workers
    assert survivors(tmp_path / "data") == []


def test_a_crashed_client_fails_the_run_and_the_rest_are_stopped(
    tmp_path: Path, launcher: Launcher
) -> None:
    # Execute: the reducer never completes, so the crash is what ends the run
    result = demo(
        tmp_path / "data",
        launcher,
        *("--clients", "3", "--rounds", "2"),
        env={"FAKE_HANG": "1", "FAKE_CRASH_CLIENT": "1", "FAKE_WORKER": "1"},
    )
    # Assert
    assert result.returncode == 1
    assert result.stderr.startswith("fednode: error: client-1 exited unexpectedly (code 3)")
    assert result.stderr.count("\n") == 1
    assert len(started_pids(tmp_path / "data")) == 14
    assert survivors(tmp_path / "data") == []


def test_a_node_that_cannot_start_fails_the_run(tmp_path: Path, launcher: Launcher) -> None:
    # Execute: the node program dies before its identity block
    result = subprocess.run(
        [
            *(sys.executable, "-m", "fednode", "demo", "--no-live", "--launcher", launcher),
            *("--node-program", f"{sys.executable} -c 'import sys; sys.exit(4)'"),
            *("--data-dir", str(tmp_path / "data")),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    # Assert
    assert result.returncode == 1
    assert result.stderr.startswith("fednode: error: bootstrap exited with code 4")


def test_timeout_fails_the_run_and_cleans_up(tmp_path: Path, launcher: Launcher) -> None:
    # Execute
    result = demo(
        tmp_path / "data", launcher, *("--clients", "2", "--timeout", "1"), env={"FAKE_HANG": "1"}
    )
    # Assert
    assert result.returncode == 1
    assert result.stderr == "fednode: error: the session did not complete within 1 s\n"
    assert len(started_pids(tmp_path / "data")) == 6  # bootstrap, reducer, 2 + 2
    assert survivors(tmp_path / "data") == []


@pytest.mark.parametrize(("sig", "code", "said"), [
    (signal.SIGINT, 130, "fednode: interrupted\n"),
    (signal.SIGTERM, 143, "fednode: terminated\n"),
])  # fmt: skip
def test_interrupting_the_demo_stops_every_process_it_started(
    tmp_path: Path, launcher: Launcher, sig: signal.Signals, code: int, said: str
) -> None:
    # Prepare: a session that never ends, every node with a worker of its own
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [*DEMO, "--launcher", launcher, "--data-dir", str(data_dir), "--clients", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FAKE_HANG": "1", "FAKE_WORKER": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the line that says the session started
        assert "session started" in first
        # Execute
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait()
    # Assert
    assert proc.returncode == code
    assert stderr == said
    assert len(started_pids(data_dir)) == 16  # 8 nodes, 8 workers
    assert survivors(data_dir) == []


def test_a_node_that_ignores_sigint_is_killed_and_reported(
    tmp_path: Path, launcher: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    config = DemoConfig(
        clients=2,
        combiners=1,
        rounds=1,
        program=PROGRAM,
        stop_grace=0.5,
        timeout=WAIT,
        launcher=launcher,
    )
    monkeypatch.setenv("FAKE_STUBBORN", "combiner")
    # Execute
    with Federation(config, tmp_path) as federation:
        result = federation.run()
        pids = federation.pids()
    # Assert
    assert result.warnings == ("combiner-0 did not stop within 0.5 s",)
    assert result.bytes_sent == 4 * BYTES_SENT  # all but the combiner said "stopped"
    assert [pid for pid in pids if alive(pid)] == []


def test_nodes_die_with_a_demo_killed_by_sigkill(tmp_path: Path, launcher: Launcher) -> None:
    # Prepare: no cleanup code of the demo can run after a SIGKILL; the kernel has to do it
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [*DEMO, "--launcher", launcher, "--data-dir", str(data_dir), "--clients", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "FAKE_HANG": "1"},
    )
    try:
        assert proc.stdout is not None
        assert "session started" in proc.stdout.readline()
        # Execute
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    # Assert: every node is gone (SIGKILL is delivered at once; dying takes a moment)
    deadline = time.monotonic() + WAIT
    while survivors(data_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(started_pids(data_dir)) == 7
    assert survivors(data_dir) == []


def test_a_reducer_that_lingers_after_the_session_is_stopped_and_reported(
    tmp_path: Path, launcher: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    config = DemoConfig(
        clients=1, combiners=1, rounds=1, program=PROGRAM, exit_grace=0.2, launcher=launcher
    )
    monkeypatch.setenv("FAKE_LINGER", "1")
    # Execute
    with Federation(config, tmp_path) as federation:
        result = federation.run()
    # Assert: stopped with SIGINT, cleanly, after the grace
    assert result.warnings == ("the reducer did not exit within 0.2 s of completing the session",)
    assert result.final_accuracy == 0.6
    assert result.bytes_sent == 4 * BYTES_SENT


# --- auto mode: the configuration, the command lines, a run of stand-ins ---


def test_auto_mode_command_lines() -> None:
    # Prepare
    config = DemoConfig(
        auto=True,
        clients=10,
        combiners=2,
        kills=tuple(parse_kill(k) for k in ("combiner@2", "client@3", "reducer@4:train")),
    )
    # Execute
    reducer = config.reducer_args()
    data = config.client_args(7)
    # Assert: every kill costs an auto node; the auto nodes stand by, so no standby process
    assert config.standby_count == 0
    assert (config.data_role, config.data_nodes[-1], config.capacity) == ("auto", "auto-9", 5)
    assert flag(reducer, "--min-clients") == "7"
    assert flag(reducer, "--wait-for") == "10"
    assert flag(reducer, "--wait-for-combiners") == "1"
    assert flag(data, "--capacity") == "5"
    assert flag(data, "--listen") == "/ip4/127.0.0.1/tcp/0"
    assert (flag(data, "--partition-index"), flag(data, "--partition-count")) == ("7", "10")
    assert "auto" in config.common_args(config.data_role)


def test_explicit_roles_command_lines_are_unchanged_by_auto_mode() -> None:
    # Prepare
    config = DemoConfig(clients=10, combiners=2, kills=(parse_kill("client@2"),))
    explicit_standby = DemoConfig(
        auto=True, clients=4, combiners=2, standbys=1, kills=(parse_kill("reducer@2"),)
    )
    # Execute, Assert
    assert flag(config.reducer_args(), "--min-clients") == "9"
    assert flag(config.reducer_args(), "--wait-for-combiners") == "2"
    assert "--capacity" not in config.client_args(0) and "--listen" not in config.client_args(0)
    assert config.data_nodes[0] == "client-0"
    assert DemoConfig(kills=(parse_kill("reducer@2"),)).standby_count == 1
    assert flag(explicit_standby.reducer_args(), "--min-clients") == "4"  # the standby leads


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"clients": 10, "combiners": 6}, "elect 5 combiners, not 6.*try --combiners 5"),
        ({"clients": 2, "combiners": 3}, "3 combiners need at least as many auto nodes"),
        ({"clients": 100, "combiners": 2}, "elect 4 combiners, not 2"),  # one per 32 clients
        ({"clients": 2, "combiners": 1, "kills": ("client@1", "reducer@2")}, "2 of the 2"),
    ],
)
def test_auto_mode_refuses_what_the_election_or_the_kills_cannot_give(
    settings: dict[str, object], says: str
) -> None:
    # Prepare
    kills = tuple(parse_kill(str(k)) for k in settings.pop("kills", ()))  # type: ignore[attr-defined]
    # Execute, Assert
    with pytest.raises(ConfigError, match=says):
        DemoConfig(auto=True, kills=kills, **settings)  # type: ignore[arg-type]


def test_auto_mode_accepts_killing_as_many_combiners_as_it_elects() -> None:
    # Execute
    config = DemoConfig(
        auto=True,
        clients=4,
        combiners=2,
        kills=(parse_kill("combiner@1"), parse_kill("combiner@2")),
    )
    # Assert
    assert config.min_clients == 2
    with pytest.raises(ConfigError, match="one combiner must survive"):
        DemoConfig(clients=4, combiners=2, kills=config.kills)
    with pytest.raises(ConfigError, match="needs a standby reducer"):
        DemoConfig(clients=4, standbys=0, kills=(parse_kill("reducer@1"),))
    DemoConfig(auto=True, clients=4, standbys=0, kills=(parse_kill("reducer@1"),))


def test_the_demo_help_documents_auto_mode() -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "fednode", "demo", "--help"], capture_output=True, text=True
    )
    # Assert
    assert result.returncode == 0
    assert "--auto" in result.stdout and "--role auto" in result.stdout


def test_an_auto_run_starts_auto_nodes_and_no_combiner(tmp_path: Path, launcher: Launcher) -> None:
    # Prepare
    config = DemoConfig(
        auto=True,
        clients=3,
        combiners=1,
        rounds=2,
        program=PROGRAM,
        timeout=WAIT,
        launcher=launcher,
    )
    # Execute
    with Federation(config, tmp_path) as federation:
        result = federation.run()
        roles = {name: node.identity["role"] for name, node in federation.nodes.items()}
        listed = [(n.name, n.role) for n in federation.snapshot().nodes]
    # Assert: the nodes said their role (the stand-in prints its --role)
    assert roles == {
        "bootstrap": "bootstrap",
        "reducer": "reducer",
        **{f"auto-{i}": "auto" for i in range(3)},
    }
    assert listed == [("bootstrap", "bootstrap"), ("reducer", "reducer")] + [
        (f"auto-{i}", "auto") for i in range(3)
    ]
    assert [r.clients_included for r in result.rounds] == [3, 3]
    assert result.warnings == ()
    assert result.bytes_sent == 5 * BYTES_SENT


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in ``args``."""
    return args[args.index(name) + 1]
