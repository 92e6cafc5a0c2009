"""TaskRunner: the same results in a thread and in a warm worker process, a torch-free parent,
and a clear error when the task is bad or its worker dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fednode.errors import ConfigError
from fednode.task import digits
from fednode.task.api import EvalConfig, Partition, TrainConfig
from fednode.task.runner import TaskRunner
from fednode.wire.messages import ModelBlob
from fednode.wire.schema import decode, encode

CONFIG = TrainConfig(
    round=2, epochs=1, batch_size=32, lr=0.5, partition=Partition(index=1, count=4)
)

DYING_TASK = """
import os
import numpy as np

def initial_params(seed):
    return {"w": np.zeros(2, np.float32)}

def train(params, config):
    if config.extra.get("die"):
        os._exit(3)
    return dict(params), 1, {}

def evaluate(params, config):
    return {"pid": os.getpid()}
"""


@pytest.fixture(scope="module")
def process_runner() -> Iterator[TaskRunner]:
    with TaskRunner("fednode.task.digits", mode="process") as runner:
        yield runner


def test_thread_and_process_train_identical_bytes(process_runner: TaskRunner) -> None:
    # Prepare: read-only params, as the node holds them
    params = decode(encode(ModelBlob(tensors=digits.initial_params(5))), ModelBlob).tensors
    # Execute
    direct = digits.train(params, CONFIG)
    with TaskRunner("fednode.task.digits", mode="thread") as thread_runner:
        in_thread = thread_runner.train(params, CONFIG)
    in_process = process_runner.train(params, CONFIG)
    evaluated = process_runner.evaluate(in_process.params, EvalConfig())
    # Assert
    for result in (in_thread, in_process):
        assert list(result.params) == list(direct.params)
        assert all(result.params[k].tobytes() == direct.params[k].tobytes() for k in params)
        assert result.num_examples == direct.num_examples and result.metrics == direct.metrics
    assert evaluated == digits.evaluate(direct.params, EvalConfig())


def test_a_process_runner_keeps_torch_out_of_the_parent() -> None:
    # Prepare
    code = textwrap.dedent(
        """
        import sys
        from fednode.task.api import TrainConfig
        from fednode.task.runner import TaskRunner
        if __name__ == "__main__":
            with TaskRunner("fednode.task.digits", mode="process") as runner:
                params = runner.initial_params(0)
                result = runner.train(params, TrainConfig(epochs=1, batch_size=32, lr=0.5))
            print(result.num_examples, "torch" in sys.modules, "sklearn" in sys.modules)
        """
    )
    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    # Assert
    assert out.stdout.split() == ["1437", "False", "False"]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_bad_spec_fails_at_start(mode: str) -> None:
    runner = TaskRunner("fednode.task.no_such_task", mode=mode)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"no module named 'fednode\.task\.no_such_task'"):
        runner.start()
    runner.close()


def test_a_dead_worker_is_a_config_error_and_the_next_call_gets_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a relative file path, then a change of directory the worker must not care about
    (tmp_path / "dying.py").write_text(DYING_TASK)
    monkeypatch.chdir(tmp_path)
    runner = TaskRunner("dying.py", mode="process")
    runner.start()
    monkeypatch.chdir("/")
    params = runner.initial_params(0)
    first_pid = runner.evaluate(params, EvalConfig())["pid"]
    dying = TrainConfig(epochs=1, batch_size=1, lr=1.0, extra={"die": True})
    # Execute
    with pytest.raises(ConfigError, match="worker process died during train"):
        runner.train(params, dying)
    second_pid = runner.evaluate(params, EvalConfig())["pid"]
    runner.close()
    # Assert
    assert first_pid != second_pid
    with pytest.raises(RuntimeError, match="closed"):
        runner.evaluate(params, EvalConfig())


def test_an_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mode"):
        TaskRunner("fednode.task.digits", mode="fiber")  # type: ignore[arg-type]


# --- forked workers ----------------------------------------------------------------------------

# numpy's BLAS would start a thread at import, and the runner would not fork (the zygote's setting).
SINGLE_THREADED_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

MARKED_TASK = """
import os
import numpy as np

IMPORTED_IN = os.getpid()
PREPARED_IN = []

def prepare():
    PREPARED_IN.append(os.getpid())

def initial_params(seed):
    return {"w": np.zeros(2, np.float32)}

def train(params, config):
    if config.extra.get("die"):
        os._exit(3)
    return dict(params), 1, {}

def evaluate(params, config):
    return {"imported_in": IMPORTED_IN, "prepared_in": PREPARED_IN[-1] if PREPARED_IN else 0,
            "prepared": len(PREPARED_IN), "pid": os.getpid()}
"""

# argv: the task file, then "preload", "thread" (preload, with a thread running) or "plain".
FORK_PROBE = """
import json, os, sys, threading
from fednode.task.api import EvalConfig, TrainConfig
from fednode.task.runner import TaskRunner, preload

def probe(runner):
    metrics = runner.evaluate(runner.initial_params(0), EvalConfig())
    return {"method": runner.start_method,
            "imported_here": metrics["imported_in"] == os.getpid(),
            "prepared_here": metrics["prepared_in"] == os.getpid(),
            "prepared": metrics["prepared"],
            "own_pid": metrics["pid"] != os.getpid()}

if __name__ == "__main__":
    task, how = sys.argv[1:]
    if how != "plain":
        preload(task)
    if how == "thread":
        stop = threading.Event()
        threading.Thread(target=stop.wait).start()
    runner = TaskRunner(task, mode="process")
    runner.start()
    first = probe(runner)
    if how == "thread":
        stop.set()
    try:
        runner.train(runner.initial_params(0), TrainConfig(epochs=1, batch_size=1, lr=1.0,
                                                           extra={"die": True}))
    except Exception:
        pass
    after_death = probe(runner)
    runner.close()
    print(json.dumps([first, after_death]))
"""


def _probe(tmp_path: Path, how: str) -> list[dict[str, object]]:
    (tmp_path / "marked.py").write_text(MARKED_TASK)
    out = subprocess.run(
        [sys.executable, "-c", FORK_PROBE, str(tmp_path / "marked.py"), how],
        capture_output=True,
        text=True,
        env=SINGLE_THREADED_ENV,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: list[dict[str, object]] = json.loads(out.stdout)
    return result


def test_a_preloaded_task_forks_its_first_worker_with_the_task_in_memory(tmp_path: Path) -> None:
    # Execute
    first, after_death = _probe(tmp_path, "preload")
    # Assert: imported and prepared once, here, and inherited by the forked worker
    assert first == {
        "method": "fork",
        "imported_here": True,
        "prepared_here": True,
        "prepared": 1,
        "own_pid": True,
    }
    # A replacement is spawned: it imports the task itself (and is not told to prepare it)
    assert after_death == {
        "method": "spawn",
        "imported_here": False,
        "prepared_here": False,
        "prepared": 0,
        "own_pid": True,
    }


@pytest.mark.parametrize("how", ["plain", "thread"])
def test_the_worker_is_spawned_unless_preloaded_in_a_single_threaded_process(
    tmp_path: Path, how: str
) -> None:
    # Execute: not preloaded (`fednode start` by hand), or preloaded but with a thread running
    first, _ = _probe(tmp_path, how)
    # Assert
    assert first == {
        "method": "spawn",
        "imported_here": False,
        "prepared_here": False,
        "prepared": 1,
        "own_pid": True,
    }


def test_a_forked_worker_trains_the_same_bytes() -> None:
    # Prepare: the built-in task, preloaded as the demo's zygote does
    code = textwrap.dedent(
        """
        import dataclasses
        from fednode.task import digits
        from fednode.task.api import Partition, TrainConfig
        from fednode.task.runner import TaskRunner, preload
        if __name__ == "__main__":
            preload("fednode.task.digits")
            config = TrainConfig(round=2, epochs=1, batch_size=32, lr=0.5,
                                 partition=Partition(index=1, count=4))
            with TaskRunner("fednode.task.digits", mode="process") as runner:
                params = digits.initial_params(5)
                forked = runner.train(params, config)
                method = runner.start_method
            direct = digits.train(params, config)
            same = all(forked.params[k].tobytes() == direct.params[k].tobytes() for k in params)
            print(method, same, forked.metrics == direct.metrics)
        """
    )
    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=SINGLE_THREADED_ENV,
        timeout=60,
    )
    # Assert
    assert out.stdout.split() == ["fork", "True", "True"]
