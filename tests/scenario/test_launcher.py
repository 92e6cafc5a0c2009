"""The zygote launcher: each node it forks is a real OS process (its own pid and process group,
its own pipes and environment, its exit status reported, killable on its own), the modules and
task it preloads are inherited, and nothing it forked outlives it."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fednode.scenario.launcher import ForkedProcess, Zygote, fork_supported, forkable

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not fork_supported(), reason="the zygote needs Linux"),
]

WAIT = 30.0
PY = sys.executable

# A task that notes which processes imported and prepared it.
TASK = """
import os
import numpy as np

IMPORTED_IN = os.getpid()
PREPARED_IN = []

def prepare():
    PREPARED_IN.append(os.getpid())

def initial_params(seed):
    return {"w": np.zeros(1, np.float32)}

def train(params, config):
    return dict(params), 1, {}

def evaluate(params, config):
    return {"imported_in": IMPORTED_IN, "prepared_in": PREPARED_IN[-1],
            "prepared": len(PREPARED_IN), "pid": os.getpid()}
"""


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    launcher = Zygote()
    try:
        yield launcher
    finally:
        launcher.close()


def fork(zygote: Zygote, code: str, **kwargs: object) -> ForkedProcess:
    env = kwargs.pop("env", dict(os.environ))
    return zygote.fork([PY, "-c", textwrap.dedent(code)], env=env, timeout=WAIT, **kwargs)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pid: int) -> bool:
    deadline = time.monotonic() + WAIT  # SIGKILL is delivered at once; dying takes a moment
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not alive(pid)


def test_a_forked_node_is_a_process_of_its_own(zygote: Zygote) -> None:
    # Execute
    child = fork(
        zygote,
        """
        import json, os, sys
        print(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(),
                          "argv": sys.argv, "env": os.environ.get("MARK"),
                          "threads": os.environ.get("OMP_NUM_THREADS")}))
        print("to stderr", file=sys.stderr)
        sys.exit(5)
        """,
        env={"MARK": "x", "PATH": os.environ.get("PATH", "")},
    )
    assert child.stdout is not None and child.stderr is not None
    said = json.loads(child.stdout.readline())
    # Assert
    assert child.wait(WAIT) == 5
    assert said == {
        "pid": child.pid,
        "pgid": child.pid,  # leads its own process group
        "ppid": zygote.proc.pid,
        "argv": ["-c"],
        "env": "x",  # exactly the environment it was given
        "threads": None,
    }
    assert child.stdout.read() == ""
    assert child.stderr.read() == "to stderr\n"


def test_exit_statuses_are_reported_as_subprocess_reports_them(zygote: Zygote) -> None:
    # Execute
    clean = fork(zygote, "pass")
    crashed = fork(zygote, "raise ValueError('boom')")
    sleeper = fork(zygote, "import time; time.sleep(600)")
    interrupted = fork(zygote, "import time; time.sleep(600)")
    sleeper.kill()
    interrupted.send_signal(signal.SIGINT)
    # Assert
    assert clean.wait(WAIT) == 0
    assert crashed.wait(WAIT) == 1
    assert crashed.stderr is not None and "ValueError: boom" in crashed.stderr.read()
    assert sleeper.wait(WAIT) == -signal.SIGKILL
    assert interrupted.wait(WAIT) == -signal.SIGINT  # as python exits on an unhandled Ctrl-C
    assert clean.poll() == 0
    sleeper.kill()  # signalling an exited node is a no-op


def test_a_node_leaves_as_python_does_without_its_teardown(zygote: Zygote) -> None:
    # Execute: its atexit handlers and threads finish, its output is flushed
    child = fork(
        zygote,
        """
        import atexit, sys, threading, time
        atexit.register(lambda: print("atexit ran"))
        threading.Thread(target=lambda: (time.sleep(0.1), print("thread done"))).start()
        sys.stdout.write("unflushed ")
        sys.exit("bad news")
        """,
    )
    # Assert
    assert child.wait(WAIT) == 1
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.read() == "unflushed thread done\natexit ran\n"
    assert child.stderr.read() == "bad news\n"


def test_output_is_buffered_as_the_environment_says(zygote: Zygote) -> None:
    # Prepare: a node that says something, then runs on
    code = """
        import sys, time
        print("out")
        print("err", file=sys.stderr)
        time.sleep(600)
        """
    quiet_env = dict(os.environ)
    quiet_env.pop("PYTHONUNBUFFERED", None)
    # Execute
    unbuffered = fork(zygote, code, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    buffered = fork(zygote, code, env=quiet_env)
    # Assert: unbuffered, stdout arrives while it runs; buffered, only stderr (line-buffered)
    assert unbuffered.stdout is not None and unbuffered.stderr is not None
    assert unbuffered.stdout.readline() == "out\n"
    assert unbuffered.stderr.readline() == "err\n"
    assert buffered.stderr is not None and buffered.stderr.readline() == "err\n"
    for child in (unbuffered, buffered):
        child.kill()
        child.wait(WAIT)
    assert buffered.stdout is not None and buffered.stdout.read() == ""  # lost with the kill


def test_a_script_runs_as_main_with_its_arguments(zygote: Zygote, tmp_path: Path) -> None:
    # Prepare
    script = tmp_path / "node.py"
    script.write_text("import sys\nif __name__ == '__main__':\n    print(sys.argv[1:])\n")
    # Execute
    child = zygote.fork([PY, str(script), "a", "b"], env=dict(os.environ), timeout=WAIT)
    # Assert
    assert child.wait(WAIT) == 0
    assert child.stdout is not None and child.stdout.read() == "['a', 'b']\n"


def test_nodes_inherit_the_modules_and_the_task_the_zygote_preloaded(
    zygote: Zygote, tmp_path: Path
) -> None:
    # Prepare
    task = tmp_path / "task.py"
    task.write_text(TASK)
    code = f"""
        import os, sys
        from fednode.task.api import EvalConfig
        from fednode.task.runner import TaskRunner, preloaded
        print("colorsys" in sys.modules, preloaded({str(task)!r}))
        with TaskRunner({str(task)!r}) as runner:
            metrics = runner.evaluate(runner.initial_params(0), EvalConfig())
        zygote = {zygote.proc.pid}
        once = (metrics["prepared_in"], metrics["prepared"]) == (zygote, 1)
        print(runner.start_method, metrics["pid"] != os.getpid(),
              metrics["imported_in"] == zygote, once)
        """
    # Execute: the second child asks for nothing, and finds what the first one had loaded
    first = fork(zygote, code, preload=["colorsys"], task=str(task))
    second = fork(zygote, code)
    # Assert: the worker was forked with the task imported and prepared in the zygote, once
    for child in (first, second):
        assert child.wait(WAIT) == 0, child.stderr.read() if child.stderr else ""
        assert child.stdout is not None
        assert child.stdout.read().split() == ["True", "True", "fork", "True", "True", "True"]


def test_closing_the_zygote_kills_what_it_forked(tmp_path: Path) -> None:
    # Prepare
    zygote = Zygote()
    child = fork(zygote, "import time; time.sleep(600)")
    # Execute
    zygote.close()
    # Assert
    assert child.wait(WAIT) == -signal.SIGKILL
    assert gone(child.pid)
    assert zygote.proc.returncode == 0


def test_nodes_die_with_a_zygote_killed_by_sigkill() -> None:
    # Prepare
    zygote = Zygote()
    try:
        child = fork(zygote, "import time; time.sleep(600)")
        # Execute
        zygote.proc.kill()
        # Assert
        assert child.wait(WAIT) == -signal.SIGKILL
        assert gone(child.pid)
    finally:
        zygote.close()


def test_which_commands_the_zygote_can_run() -> None:
    assert forkable([PY, "-m", "fednode", "start"])
    assert forkable([PY, "-c", "pass"])
    assert forkable([PY, "script.py", "--flag"])
    assert not forkable([PY, "-u", "script.py"])  # interpreter options need a fresh interpreter
    assert not forkable([PY, "-m"])
    assert not forkable(["/bin/echo", "hi"])
    assert not forkable(["ip", "netns", "exec", "ns1", PY, "-m", "fednode"])
