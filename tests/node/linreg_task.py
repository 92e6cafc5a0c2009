"""A numpy task for the round tests: linear regression on a fixed synthetic data set.

Deterministic (minibatch order seeded by seed, round and partition index) and fast, so the
federation's model can be held to :func:`fednode.task.reference.run_reference` to float
tolerance. ``accuracy`` is the share of examples whose prediction has the target's sign.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from fednode.task.api import EvalConfig, Metrics, TrainConfig, TrainResult
from fednode.task.partition import share
from fednode.wire.schema import Model

FEATURES = 8
EXAMPLES = 400


@functools.cache
def data() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(EXAMPLES, FEATURES))
    w = rng.normal(size=FEATURES)
    y = x @ w + 0.5 + 0.1 * rng.normal(size=EXAMPLES)
    labels = (y > 0).astype(np.int64)  # what a Dirichlet split skews
    return x, y, labels


def initial_params(seed: int) -> Model:
    rng = np.random.default_rng([seed, 9])
    return Model(
        {
            "w": rng.normal(scale=0.1, size=FEATURES).astype(np.float32),
            "b": np.zeros(1, np.float32),
        }
    )


def train(params: Model, config: TrainConfig) -> TrainResult:
    x_all, y_all, labels = data()
    index = share(labels, config.partition)
    x, y = x_all[index], y_all[index]
    w = params["w"].astype(np.float64)
    b = float(params["b"][0])
    anchor = w.copy()
    rng = np.random.default_rng([config.seed, config.round, config.partition.index, 5])
    n = len(index)
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            error = x[batch] @ w + b - y[batch]
            grad_w = x[batch].T @ error / len(batch) + config.proximal_mu * (w - anchor)
            w -= config.lr * grad_w
            b -= config.lr * float(error.mean())
    loss = float(np.mean((x @ w + b - y) ** 2))
    trained = Model({"w": w.astype(np.float32), "b": np.array([b], np.float32)})
    return TrainResult(trained, n, {"loss": loss})


def evaluate(params: Model, config: EvalConfig) -> Metrics:
    x, y, _ = data()
    prediction = x @ params["w"].astype(np.float64) + float(params["b"][0])
    return {
        "loss": float(np.mean((prediction - y) ** 2)),
        "accuracy": float(np.mean(np.sign(prediction) == np.sign(y))),
    }
