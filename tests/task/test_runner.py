"""TaskRunner: the same results in a thread and in a warm worker process, a torch-free parent,
and a clear error when the task is bad or its worker dies."""

from __future__ import annotations

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
