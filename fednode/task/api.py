"""Task layer: the contract between fednode and a user's training code.

A task is a Python module (``--task package.module`` or ``--task path/to/file.py``) with::

    train(params, config: TrainConfig) -> (params, num_examples, metrics)
    evaluate(params, config: EvalConfig) -> metrics
    initial_params(seed: int) -> params          # needed where the initial model is built

``params`` is a :data:`~fednode.wire.schema.Model`: an ordered ``name -> numpy.ndarray`` map. The
arrays a task receives may be read-only (decoded arrays are); a task copies what it changes.
:mod:`fednode.task.torch_params` converts a torch module's ``state_dict`` both ways.

:func:`load_task` wraps the module in a :class:`ModuleTask`, which checks what the user's code
returns, so a task bug surfaces here as one :class:`~fednode.errors.ConfigError` line rather than
as an update the combiners reject. Nothing here imports torch, trio or libp2p: a reducer may call
``load_task(spec).initial_params(seed)`` without loading a training framework, provided the task
builds its initial parameters with numpy (the built-in :mod:`fednode.task.digits` does).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from fednode.errors import ConfigError, WireError
from fednode.wire.arrays import dtype_name
from fednode.wire.schema import Model

#: The task a client trains when none is given.
DEFAULT_TASK = "fednode.task.digits"

#: Named numbers a task reports (``"loss"``, ``"accuracy"``, ``"num_examples"``...).
Metrics = dict[str, float]
#: A user option's value in :attr:`TrainConfig.extra`.
Extra = Mapping[str, str | int | float | bool]
Scheme = Literal["iid", "dirichlet"]
SCHEMES: tuple[Scheme, ...] = ("iid", "dirichlet")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(what)


def _check_extra(extra: Extra) -> dict[str, str | int | float | bool]:
    copy = dict(extra)
    for key, value in copy.items():
        _require(isinstance(key, str), f"extra option names must be strings, got {key!r}")
        _require(
            isinstance(value, str | int | float | bool),
            f"extra option {key!r} must be a string, number or bool, got {type(value).__name__}",
        )
    return copy


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    """Which share of the training data a client holds.

    The ``count`` clients of a federation split the data with the same ``scheme``, ``alpha`` and
    ``seed``; client ``index`` takes share ``index``. ``alpha`` is the Dirichlet concentration
    (small: few labels per client) and is ignored for ``"iid"``.
    """

    index: int = 0
    count: int = 1
    scheme: Scheme = "iid"
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.count >= 1, f"partition count must be at least 1, got {self.count}")
        _require(
            0 <= self.index < self.count,
            f"partition index must be in [0, {self.count}), got {self.index}",
        )
        _require(
            self.scheme in SCHEMES, f"partition scheme must be iid or dirichlet: {self.scheme!r}"
        )
        _require(
            math.isfinite(self.alpha) and self.alpha > 0,
            f"Dirichlet alpha must be positive, got {self.alpha}",
        )
        _require(self.seed >= 0, f"partition seed must be non-negative, got {self.seed}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """What one client's training in one round is told.

    Attributes:
        round: the round being trained (the initial global model is round 0, so training rounds
            start at 1).
        epochs: local passes over the client's share.
        batch_size: minibatch size.
        lr: learning rate.
        seed: the session seed; a task derives its shuffles from (seed, round, partition.index).
        proximal_mu: FedProx coefficient: adds ``mu/2 * ||w - w_global||^2`` to the loss (0: off).
        partition: the client's data share.
        extra: task-specific options (the built-in task reads ``momentum`` and ``weight_decay``).
    """

    round: int = 1
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    proximal_mu: float = 0.0
    partition: Partition = field(default_factory=Partition)
    extra: Extra = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.round >= 0, f"round must be non-negative, got {self.round}")
        _require(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(self.seed >= 0, f"seed must be non-negative, got {self.seed}")
        _require(
            math.isfinite(self.proximal_mu) and self.proximal_mu >= 0,
            f"proximal_mu must be non-negative, got {self.proximal_mu}",
        )
        # A private copy: the caller's dict cannot change a frozen config behind its back.
        object.__setattr__(self, "extra", _check_extra(self.extra))


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """What an evaluation is told: the round of the model evaluated and a batch size."""

    round: int = 0
    batch_size: int = 512
    extra: Extra = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.round >= 0, f"round must be non-negative, got {self.round}")
        _require(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        object.__setattr__(self, "extra", _check_extra(self.extra))


class TrainResult(NamedTuple):
    """What ``train`` returns (a plain 3-tuple from a user's task is fine)."""

    params: Model
    num_examples: int
    metrics: Metrics


class Task(Protocol):
    """A federated-learning task (see the module docstring)."""

    def train(self, params: Model, config: TrainConfig) -> TrainResult: ...

    def evaluate(self, params: Model, config: EvalConfig) -> Metrics: ...

    def initial_params(self, seed: int) -> Model: ...


@dataclass(frozen=True, slots=True)
class ModuleTask:
    """A task module, its results checked against the contract.

    ``prepare`` runs the module's optional ``prepare()`` hook, which loads data and frameworks
    ahead of the first round so the first ``train`` is not slowed by imports.
    """

    spec: str
    module: ModuleType

    def train(self, params: Model, config: TrainConfig) -> TrainResult:
        result = self.module.train(params, config)
        if not isinstance(result, tuple) or len(result) != 3:
            raise ConfigError(
                f"task {self.spec}: train must return (params, num_examples, metrics),"
                f" got {type(result).__name__}"
            )
        trained, num_examples, metrics = result
        trained = _check_params(self.spec, "train", trained)
        _check_same_layout(self.spec, params, trained)
        if isinstance(num_examples, np.integer):
            num_examples = int(num_examples)
        if type(num_examples) is not int or num_examples <= 0:
            raise ConfigError(
                f"task {self.spec}: train must return a positive int num_examples,"
                f" got {num_examples!r}"
            )
        return TrainResult(trained, num_examples, _check_metrics(self.spec, "train", metrics))

    def evaluate(self, params: Model, config: EvalConfig) -> Metrics:
        return _check_metrics(self.spec, "evaluate", self.module.evaluate(params, config))

    def initial_params(self, seed: int) -> Model:
        build = getattr(self.module, "initial_params", None)
        if build is None:
            raise ConfigError(f"task {self.spec} defines no initial_params(seed)")
        return _check_params(self.spec, "initial_params", build(seed))

    def prepare(self) -> None:
        hook: Callable[[], object] | None = getattr(self.module, "prepare", None)
        if hook is not None:
            hook()


def load_task(spec: str) -> ModuleTask:
    """The task named by ``spec``: a dotted module name or a path to a ``.py`` file.

    Raises:
        ConfigError: the module cannot be found or imported, or lacks a callable ``train`` or
            ``evaluate`` (or has a non-callable ``initial_params`` or ``prepare``).
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("task: empty task name")
    if is_path_spec(spec):
        module = _import_file(spec)
    else:
        module = _import_module(spec)
    for name in ("train", "evaluate"):
        if not callable(getattr(module, name, None)):
            raise ConfigError(f"task {spec} has no {name}() function")
    for name in ("initial_params", "prepare"):
        if getattr(module, name, None) is not None and not callable(getattr(module, name)):
            raise ConfigError(f"task {spec}: {name} is not a function")
    return ModuleTask(spec, module)


def is_path_spec(spec: str) -> bool:
    """Whether a task spec names a file (``x.py``, ``dir/x``) rather than a module."""
    spec = spec.strip()
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_module(spec: str) -> ModuleType:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (spec == exc.name or spec.startswith(exc.name + ".")):
            raise ConfigError(f"task {spec}: no module named {exc.name!r}") from exc
        raise ConfigError(f"task {spec} failed to import: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"task {spec} failed to import: {type(exc).__name__}: {exc}") from exc


def _import_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"task file {spec} does not exist")
    # One module per file, whatever its stem: two task.py files in different folders coexist.
    digest = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
    name = f"fednode_task_{path.stem if path.stem.isidentifier() else 'file'}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"task file {spec} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickle look classes up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"task {spec} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _check_params(spec: str, where: str, params: Any) -> Model:
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(
            f"task {spec}: {where} must return a non-empty name -> numpy array map,"
            f" got {type(params).__name__}"
        )
    for name, array in params.items():
        if not isinstance(name, str):
            raise ConfigError(f"task {spec}: {where} returned a tensor name {name!r}, not a str")
        if not isinstance(array, np.ndarray):
            raise ConfigError(
                f"task {spec}: {where} returned {name} as {type(array).__name__}, not a numpy"
                " array (fednode.task.torch_params.state_dict_to_params converts a state_dict)"
            )
        try:
            dtype_name(array.dtype)
        except WireError as exc:
            raise ConfigError(f"task {spec}: {where} returned {name}: {exc}") from exc
    return Model(dict(params))


def _check_same_layout(spec: str, sent: Mapping[str, Any], trained: Mapping[str, Any]) -> None:
    if list(sent) != list(trained):
        raise ConfigError(
            f"task {spec}: train returned tensors {list(trained)[:4]}..., expected the names"
            f" it was given, in order: {list(sent)[:4]}..."
        )
    for name, array in trained.items():
        given = sent[name]
        if array.shape != given.shape or array.dtype != given.dtype:
            raise ConfigError(
                f"task {spec}: train returned {name} as {array.dtype}{list(array.shape)},"
                f" it was given {given.dtype}{list(given.shape)}"
            )


def _check_metrics(spec: str, where: str, metrics: Any) -> Metrics:
    if not isinstance(metrics, Mapping):
        raise ConfigError(
            f"task {spec}: {where} must return a name -> number map of metrics,"
            f" got {type(metrics).__name__}"
        )
    checked: Metrics = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            raise ConfigError(f"task {spec}: {where} returned metric {key!r} = {value!r}")
        checked[key] = value
    return checked
