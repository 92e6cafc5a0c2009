"""Task layer: an in-process FedAvg reference, the yardstick for the federation's learning.

:func:`run_reference` does in one process, in order, what the federation does across peers:

1. the global model of round 0 is ``task.initial_params(seed)``;
2. in round ``r = 1 .. rounds`` every client ``i`` of ``clients`` trains from the global model of
   round ``r - 1`` with ``config`` where ``round = r``, ``seed = seed`` and
   ``partition = Partition(index=i, count=clients, scheme=scheme, alpha=alpha, seed=seed)``;
3. the global model of round ``r`` is the FedAvg of the trained params weighted by the
   ``num_examples`` each client reports (:func:`fedavg`), and is evaluated.

One session seed thus drives the initial model, the partition and every client's shuffles.
Plain numpy on purpose: it shares no code with :mod:`fednode.aggregation`, which it checks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednode.errors import AggregationError
from fednode.task.api import EvalConfig, Metrics, Partition, Scheme, Task, TrainConfig
from fednode.wire.schema import Model


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundMetrics:
    """The outcome of one round (round 0: the initial model, evaluated, nothing trained).

    Attributes:
        round: the round number.
        num_examples: examples trained on across clients (the FedAvg total weight).
        train: client train metrics averaged with the same weights (keys every client reported).
        eval: ``task.evaluate`` of the round's global model.
        model: the round's global model.
        seconds: wall-clock time the round took here.
    """

    round: int
    num_examples: int
    train: Metrics
    eval: Metrics
    model: Model
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.eval["accuracy"]

    @property
    def loss(self) -> float:
        return self.eval["loss"]


def run_reference(
    task: Task,
    *,
    clients: int,
    rounds: int,
    config: TrainConfig,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    eval_config: EvalConfig | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
) -> list[RoundMetrics]:
    """Run FedAvg in process (see the module docstring); one entry per round, round 0 first.

    ``config`` supplies epochs, batch size, learning rate, FedProx ``proximal_mu`` and extras;
    its round, seed and partition are replaced per round and client. ``on_round`` sees each
    round's metrics as they come (the demo prints them).
    """
    eval_config = eval_config or EvalConfig()
    started = time.perf_counter()
    model = task.initial_params(seed)
    history = [
        RoundMetrics(
            round=0,
            num_examples=0,
            train={},
            eval=task.evaluate(model, dataclasses.replace(eval_config, round=0)),
            model=model,
            seconds=time.perf_counter() - started,
        )
    ]
    if on_round is not None:
        on_round(history[0])
    for round_ in range(1, rounds + 1):
        started = time.perf_counter()
        updates: list[tuple[Model, int]] = []
        client_metrics: list[tuple[Metrics, int]] = []
        for index in range(clients):
            partition = Partition(index=index, count=clients, scheme=scheme, alpha=alpha, seed=seed)
            client_config = dataclasses.replace(
                config, round=round_, seed=seed, partition=partition
            )
            params, num_examples, metrics = task.train(model, client_config)
            updates.append((params, num_examples))
            client_metrics.append((metrics, num_examples))
        model = fedavg(updates)
        entry = RoundMetrics(
            round=round_,
            num_examples=sum(n for _, n in updates),
            train=_weighted_metrics(client_metrics),
            eval=task.evaluate(model, dataclasses.replace(eval_config, round=round_)),
            model=model,
            seconds=time.perf_counter() - started,
        )
        history.append(entry)
        if on_round is not None:
            on_round(entry)
    return history


def fedavg(updates: Sequence[tuple[Model, int]]) -> Model:
    """The weighted mean of ``updates`` (params, weight), tensor by tensor.

    Sums ``weight * params`` in float64 in the given order, divides by the total weight and
    casts back to each tensor's dtype (integer tensors are rounded to the nearest integer first).

    Raises:
        AggregationError: no updates, a non-positive weight, or tensors whose names, shapes or
            dtypes differ from the first update's.
    """
    if not updates:
        raise AggregationError("nothing to average")
    first, _ = updates[0]
    for params, weight in updates:
        if weight <= 0:
            raise AggregationError(f"weight must be positive, got {weight}")
        if list(params) != list(first):
            raise AggregationError("updates hold different tensor names")
        for name, array in params.items():
            if array.shape != first[name].shape or array.dtype != first[name].dtype:
                raise AggregationError(f"tensor {name}: shapes or dtypes differ between updates")
    total = sum(weight for _, weight in updates)
    averaged: dict[str, np.ndarray[Any, Any]] = {}
    for name, like in first.items():
        acc = np.zeros(like.shape, dtype=np.float64)
        for params, weight in updates:
            acc += weight * params[name].astype(np.float64)
        acc /= total
        if np.issubdtype(like.dtype, np.integer):
            acc = np.rint(acc)
        averaged[name] = acc.astype(like.dtype)
    return Model(averaged)


def _weighted_metrics(reports: Sequence[tuple[Metrics, int]]) -> Metrics:
    keys = set.intersection(*(set(metrics) for metrics, _ in reports)) if reports else set()
    total = sum(weight for _, weight in reports)
    return {
        key: sum(float(metrics[key]) * weight for metrics, weight in reports) / total
        for key in sorted(keys)
    }
