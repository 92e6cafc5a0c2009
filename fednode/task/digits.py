"""Task layer: the built-in task, a 64-32-10 MLP on scikit-learn's bundled digits (no download).

Data: scikit-learn's digits (1797 8x8 images), read with numpy from the CSV that scikit-learn
ships (:func:`digits_csv`: found without importing scikit-learn, which costs a second per
process), features scaled to [0, 1] by /16, split 80/20 with stratification and the fixed seed
:data:`SPLIT_SEED` (1437 train, 360 test) by :func:`fednode.task.partition.stratified_split`,
which gives the arrays ``load_digits`` and ``train_test_split`` give. The train split is shared
across clients by :mod:`fednode.task.partition`; evaluation uses the whole test split.

Determinism: the initial parameters come from numpy (:func:`initial_params`), and the model is
built on torch's ``meta`` device and filled from the params it is given, so torch's random state
is never read. Minibatch order is a numpy permutation seeded by (seed, round, partition index).
torch runs single-threaded with deterministic algorithms. The same inputs therefore give the
same parameters, bit for bit, in a thread or a process.

Training: plain SGD (``extra`` may set ``momentum`` and ``weight_decay``) on cross-entropy, with
the FedProx term ``mu/2 * ||w - w_global||^2`` over the weights and biases when
``proximal_mu > 0``. The reported ``loss`` and ``accuracy`` are the running cross-entropy
(without the proximal term) and accuracy over the last epoch's minibatches.

Nothing here imports scikit-learn, and importing this module does not import torch:
:func:`initial_params` is numpy only, so a reducer can build the initial global model without it.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fednode.errors import ConfigError
from fednode.task.api import EvalConfig, Extra, Metrics, Partition, TrainConfig, TrainResult
from fednode.task.partition import share, stratified_split
from fednode.wire.schema import Model

if TYPE_CHECKING:
    import torch

#: Layer widths: 64 pixels in, one hidden layer, 10 classes out.
LAYERS = (64, 32, 10)
#: Seed of the train/test split: fixed, so every client and evaluator sees the same split.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
#: ``TrainConfig.extra`` options this task understands (value: default).
OPTIONS: dict[str, float] = {"momentum": 0.0, "weight_decay": 0.0}

#: The demo's training settings: 5 local epochs of plain SGD, batch 32. lr 0.5 was picked by a
#: sweep (10 IID clients, 5 rounds, 20 seeds): final accuracy 0.933-0.950, mean 0.941.
DEFAULT_CONFIG = TrainConfig(epochs=5, batch_size=32, lr=0.5)

_INIT_STREAM = 3  # a numpy random stream of its own (see fednode.task.partition)
_SHUFFLE_STREAM = 4


@dataclass(frozen=True, slots=True)
class DigitsData:
    """The split data set: features float32 in [0, 1], labels int64."""

    x_train: np.ndarray[Any, np.dtype[np.float32]]
    y_train: np.ndarray[Any, np.dtype[np.int64]]
    x_test: np.ndarray[Any, np.dtype[np.float32]]
    y_test: np.ndarray[Any, np.dtype[np.int64]]


@functools.cache
def load_data() -> DigitsData:
    """The digits data, split once per process."""
    table = np.loadtxt(digits_csv(), delimiter=",")  # 64 pixels (0..16), then the label
    x = (table[:, :-1] / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    train, test = stratified_split(y, TEST_FRACTION, SPLIT_SEED)
    arrays = (x[train], y[train], x[test], y[test])
    for array in arrays:
        array.setflags(write=False)  # shared by every call in this process
    return DigitsData(*arrays)


def digits_csv() -> Path:
    """Where scikit-learn's digits data lies: ``datasets/data/digits.csv.gz`` in its package
    folder, found without importing it.

    Raises:
        ConfigError: scikit-learn is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    raise ConfigError(
        "the built-in task needs scikit-learn's digits data: pip install 'fednode[client]'"
    )


def client_indices(partition: Partition) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Indices into the train split of ``partition``'s share (cached: every round asks)."""
    return _client_indices(partition)


@functools.lru_cache(maxsize=64)
def _client_indices(partition: Partition) -> np.ndarray[Any, np.dtype[np.int64]]:
    indices = share(load_data().y_train, partition)
    indices.setflags(write=False)
    return indices


def initial_params(seed: int) -> Model:
    """The initial model for ``seed``, built with numpy only (no torch import).

    Each layer's weight and bias are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the
    distribution of torch's default ``nn.Linear`` initialisation, as float32, in the order of the
    torch model's ``state_dict``.
    """
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    rng = np.random.default_rng([seed, _INIT_STREAM])
    params: dict[str, np.ndarray[Any, Any]] = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(LAYERS), start=1):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"fc{layer}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(
            np.float32
        )
        params[f"fc{layer}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return Model(params)


def prepare() -> None:
    """Load the data and torch now rather than in the first round."""
    load_data()
    _setup_torch()


def train(params: Model, config: TrainConfig) -> TrainResult:
    """Train the MLP from ``params`` on this client's share (see the module docstring)."""
    import torch

    from fednode.task.torch_params import load_params, state_dict_to_params

    _setup_torch()
    options = _options(config.extra)
    data = load_data()
    indices = client_indices(config.partition)
    x = torch.from_numpy(data.x_train[indices])
    y = torch.from_numpy(data.y_train[indices])
    model = _model()
    load_params(model, params)
    weights = list(model.parameters())
    anchor = [w.detach().clone() for w in weights] if config.proximal_mu > 0 else []
    optimizer = torch.optim.SGD(
        weights, lr=config.lr, momentum=options["momentum"], weight_decay=options["weight_decay"]
    )
    rng = np.random.default_rng(
        [config.seed, config.round, config.partition.index, _SHUFFLE_STREAM]
    )
    n = len(indices)
    loss_sum, correct = 0.0, 0
    for _ in range(config.epochs):
        order = torch.from_numpy(rng.permutation(n))
        loss_sum, correct = 0.0, 0
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            inputs, targets = x[batch], y[batch]
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            objective = loss
            if anchor:
                drift = torch.stack(
                    [(w - a).pow(2).sum() for w, a in zip(weights, anchor, strict=True)]
                )
                objective = loss + config.proximal_mu / 2 * drift.sum()
            objective.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(dim=1) == targets).sum().item())
    metrics: Metrics = {"loss": loss_sum / n, "accuracy": correct / n}
    return TrainResult(state_dict_to_params(model), n, metrics)


def evaluate(params: Model, config: EvalConfig) -> Metrics:
    """Loss and accuracy of ``params`` on the held-out test split."""
    import torch

    from fednode.task.torch_params import load_params

    _setup_torch()
    data = load_data()
    model = _model()
    load_params(model, params)
    x = torch.from_numpy(data.x_test.copy())  # the cached arrays are read-only; torch wants to own
    y = torch.from_numpy(data.y_test.copy())
    loss_sum, correct = 0.0, 0
    n = len(y)
    with torch.inference_mode():
        for start in range(0, n, config.batch_size):
            inputs, targets = (
                x[start : start + config.batch_size],
                y[start : start + config.batch_size],
            )
            logits = model(inputs)
            loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == targets).sum().item())
    return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": n}


@functools.cache
def _setup_torch() -> None:
    """Set torch up once per process: one thread (the MLP gains nothing from more, and a client
    shares its cores with the node), deterministic kernels."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def _model() -> torch.nn.Module:
    """The MLP with uninitialised parameters (built on ``meta``: torch's RNG is not touched)."""
    from torch import nn

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(LAYERS), start=1):
        if layer > 1:
            layers[f"relu{layer - 1}"] = nn.ReLU()
        layers[f"fc{layer}"] = nn.Linear(fan_in, fan_out, device="meta")
    return nn.Sequential(layers).to_empty(device="cpu")


def _options(extra: Extra) -> dict[str, float]:
    unknown = sorted(set(extra) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"task fednode.task.digits has no option {unknown[0]!r} (options: {sorted(OPTIONS)})"
        )
    options = dict(OPTIONS)
    for key, value in extra.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"option {key} must be a non-negative number, got {value!r}")
        options[key] = float(value)
    return options
