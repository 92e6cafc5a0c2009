"""The task contract: configs, load_task's errors, and the checks on what a user's task returns."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fednode.errors import ConfigError
from fednode.task.api import (
    DEFAULT_TASK,
    EvalConfig,
    ModuleTask,
    Partition,
    Task,
    TrainConfig,
    TrainResult,
    load_task,
)
from fednode.wire.schema import Model

# A pure-numpy task: "training" adds the round number to every weight.
NUMPY_TASK = """
import numpy as np

def initial_params(seed):
    return {"w": np.full(3, float(seed), np.float32), "b": np.zeros(1, np.float64)}

def train(params, config):
    trained = {name: array + config.round for name, array in params.items()}
    return trained, 10 + config.partition.index, {"loss": 0.5, "steps": np.int64(3)}

def evaluate(params, config):
    return {"accuracy": float(params["w"].mean()), "num_examples": 4}
"""


def _write(tmp_path: Path, source: str, name: str = "mytask.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -1}, "seed"),
        ({"round": -1}, "round"),
        ({"proximal_mu": -0.1}, "proximal_mu"),
        ({"extra": {"momentum": [0.9]}}, "extra option 'momentum'"),
    ],
)
def test_train_config_rejects_bad_values(changes: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"epochs": 1, "batch_size": 8, "lr": 0.1, **changes}
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"count": 0}, "count"),
        ({"index": 3, "count": 3}, "index"),
        ({"index": -1}, "index"),
        ({"scheme": "shards"}, "scheme"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"seed": -2}, "seed"),
    ],
)
def test_partition_rejects_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Partition(**changes)


def test_configs_are_frozen_copies_that_pickle() -> None:
    # Prepare
    extra: dict[str, str | int | float | bool] = {"momentum": 0.9}
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, extra=extra, partition=Partition(count=2))
    # Execute
    extra["momentum"] = 0.0
    copied = pickle.loads(pickle.dumps(config))
    # Assert
    assert config.extra == {"momentum": 0.9}
    assert copied == config and copied.partition == Partition(count=2)
    assert pickle.loads(pickle.dumps(EvalConfig(round=3))) == EvalConfig(round=3)
    with pytest.raises(AttributeError):
        config.lr = 1.0  # type: ignore[misc]


# --- load_task ---------------------------------------------------------------------------------


def test_the_default_task_loads() -> None:
    # Execute
    task: Task = load_task(DEFAULT_TASK)  # mypy checks that a ModuleTask is a Task
    # Assert
    assert isinstance(task, ModuleTask) and task.spec == "fednode.task.digits"
    assert list(task.initial_params(0)) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_a_file_path_task_works(tmp_path: Path) -> None:
    # Prepare
    task = load_task(_write(tmp_path, NUMPY_TASK))
    params = task.initial_params(2)
    config = TrainConfig(
        round=3, epochs=1, batch_size=1, lr=1.0, partition=Partition(count=5, index=4)
    )
    # Execute
    trained, n, metrics = task.train(params, config)
    evaluated = task.evaluate(trained, EvalConfig(round=3))
    # Assert
    assert isinstance(task.train(params, config), TrainResult)
    np.testing.assert_array_equal(trained["w"], np.full(3, 5.0, np.float32))
    assert n == 14
    assert metrics == {"loss": 0.5, "steps": 3} and type(metrics["steps"]) is int
    assert evaluated == {"accuracy": 5.0, "num_examples": 4}
    assert load_task(_write(tmp_path, NUMPY_TASK)).module is task.module  # loaded once


def test_two_task_files_with_one_name_do_not_collide(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _write(tmp_path / "a", NUMPY_TASK, "task.py")
    second = _write(tmp_path / "b", NUMPY_TASK.replace("float(seed)", "-1.0"), "task.py")
    # Execute / Assert
    assert load_task(first).initial_params(7)["w"][0] == 7.0
    assert load_task(second).initial_params(7)["w"][0] == -1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package.task", r"^task no_such_package.task: no module named 'no_such_package'$"),
        ("fednode.task.no_such_task", "no module named 'fednode.task.no_such_task'"),
        ("fednode.errors", r"^task fednode.errors has no train\(\) function$"),
        ("   ", "empty task name"),
        ("/no/such/dir/task.py", "task file /no/such/dir/task.py does not exist"),
    ],
)
def test_load_task_errors_are_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load_task(spec)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def train(p, c): pass\n", r"has no evaluate\(\) function"),
        ("train = 3\ndef evaluate(p, c): pass\n", r"has no train\(\) function"),
        (NUMPY_TASK + "initial_params = 5\n", "initial_params is not a function"),
        ("import not_installed_dependency\n", "failed to import: .*not_installed_dependency"),
        ("def train(:\n", "failed to import: SyntaxError"),
        ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
    ],
)
def test_a_broken_task_file_is_a_config_error(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_task(_write(tmp_path, source, f"broken_{abs(hash(source))}.py"))


# --- what a task returns -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return params", r"must return \(params, num_examples, metrics\)"),
        ("return [1, 2], 3, {}", "non-empty name -> numpy array map"),
        ("return {'w': [1.0], 'b': params['b']}, 3, {}", "returned w as list, not a numpy array"),
        ("return {'w': params['w']}, 3, {}", "expected the names it was given"),
        ("return {'w': params['w'][:1], 'b': params['b']}, 3, {}", r"w as float32\[1\]"),
        ("return {'w': params['w'].astype('f8'), 'b': params['b']}, 3, {}", "w as float64"),
        ("return {'w': params['w'] > 0, 'b': params['b']}, 3, {}", "cannot be encoded"),
        ("return dict(params), 0, {}", "positive int num_examples"),
        ("return dict(params), 2.0, {}", "positive int num_examples"),
        ("return dict(params), 3, {'loss': 'low'}", "metric 'loss' = 'low'"),
        ("return dict(params), 3, {'ok': True}", "metric 'ok' = True"),
        ("return dict(params), 3, [1]", "name -> number map of metrics"),
    ],
)
def test_train_results_are_checked(tmp_path: Path, body: str, message: str) -> None:
    # Prepare
    source = NUMPY_TASK + f"\ndef train(params, config):\n    {body}\n"
    task = load_task(_write(tmp_path, source, f"bad_{abs(hash(body))}.py"))
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        task.train(task.initial_params(0), TrainConfig(epochs=1, batch_size=1, lr=1.0))


def test_a_task_without_initial_params_says_so(tmp_path: Path) -> None:
    # Prepare
    task = load_task(_write(tmp_path, "def train(p, c): pass\ndef evaluate(p, c): pass\n"))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"defines no initial_params\(seed\)"):
        task.initial_params(0)


def test_a_task_own_exception_passes_through(tmp_path: Path) -> None:
    # Prepare
    source = (
        NUMPY_TASK + "\ndef evaluate(params, config):\n    raise ZeroDivisionError('task bug')\n"
    )
    task = load_task(_write(tmp_path, source, "raising.py"))
    # Execute / Assert
    with pytest.raises(ZeroDivisionError, match="task bug"):
        task.evaluate(Model({}), EvalConfig())


def test_importing_the_task_layer_loads_no_framework() -> None:
    # Prepare: every module of the layer, as a combiner or reducer process might import them
    modules = "api, digits, partition, reference, runner, torch_params"
    code = (
        f"import sys; from fednode.task import {modules};"
        " print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    loaded = set(out.stdout.split())
    assert "fednode" in loaded
    assert not loaded & {"torch", "sklearn", "scipy", "trio", "libp2p"}
