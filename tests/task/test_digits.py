"""The built-in digits task: data split, partitions, numpy-only initial model, deterministic
training, FedProx, and the in-process FedAvg reference reaching the learning target."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from fednode.errors import AggregationError, ConfigError
from fednode.task import digits
from fednode.task.api import EvalConfig, Partition, TrainConfig
from fednode.task.partition import split, stratified_split
from fednode.task.reference import fedavg, run_reference
from fednode.wire.messages import ModelBlob
from fednode.wire.schema import Model, decode, encode

CONFIG = TrainConfig(epochs=2, batch_size=32, lr=0.5, partition=Partition(index=3, count=10))


def _same_bytes(a: Model, b: Model) -> bool:
    return list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def _tv_from_global(labels: np.ndarray[Any, Any], shares: list[np.ndarray[Any, Any]]) -> float:
    """Mean total-variation distance between each share's label mix and the whole set's."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    distances = [
        0.5 * np.abs(np.array([np.mean(labels[s] == c) for c in classes]) - overall).sum()
        for s in shares
    ]
    return float(np.mean(distances))


# --- data and partitions -----------------------------------------------------------------------


def test_data_is_a_stratified_80_20_split_scaled_to_unit_range() -> None:
    # Execute
    data = digits.load_data()
    # Assert
    assert (len(data.y_train), len(data.y_test)) == (1437, 360)
    assert data.x_train.dtype == np.float32 and data.x_train.shape[1] == 64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    train_share = np.bincount(data.y_train) / len(data.y_train)
    test_share = np.bincount(data.y_test) / len(data.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert digits.load_data() is data  # cached per process


def test_data_is_what_scikit_learn_gives_without_importing_it() -> None:
    # Prepare: the arrays load_digits and train_test_split give
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    expected = train_test_split(
        (x / 16.0).astype(np.float32),
        y.astype(np.int64),
        test_size=digits.TEST_FRACTION,
        stratify=y,
        random_state=digits.SPLIT_SEED,
    )
    code = (
        "import sys; from fednode.task import digits; digits.load_data();"
        " print('sklearn' in sys.modules)"
    )
    # Execute
    data = digits.load_data()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert: the same bytes, in the same order (the clients' shares are positions in it)
    ours_all = (data.x_train, data.x_test, data.y_train, data.y_test)
    for ours, theirs in zip(ours_all, expected, strict=True):
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
    assert out.stdout.split() == ["False"]


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5, 0.7])
def test_stratified_split_draws_what_scikit_learn_draws(seed: int, fraction: float) -> None:
    # Prepare: ties in the labels' fractional shares make it draw from the random stream
    from sklearn.model_selection import train_test_split

    counts = [50, 50, 50, 40, 40, 70]  # equal counts, equal fractional shares: ties
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(6) * 3, counts))
    # Execute
    train, test = stratified_split(labels, fraction, seed)
    expected_train, expected_test = train_test_split(
        np.arange(300), test_size=fraction, stratify=labels, random_state=seed
    )
    # Assert
    assert np.array_equal(train, expected_train) and np.array_equal(test, expected_test)


def test_stratified_split_rejects_what_cannot_be_split() -> None:
    with pytest.raises(ConfigError, match="fraction"):
        stratified_split(np.arange(10) % 2, 1.0, 0)
    with pytest.raises(ConfigError, match="cannot split"):
        stratified_split(np.array([0, 0, 1, 1, 2]), 0.5, 0)  # label 2 has one example
    with pytest.raises(ConfigError, match="cannot split"):
        stratified_split(np.arange(20) % 5, 0.1, 0)  # a test part of 2 for 5 labels


def _check_shares(shares: list[np.ndarray[Any, Any]], n: int) -> None:
    assert all(len(s) >= 1 for s in shares)
    joined = np.concatenate(shares)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint, covering
    assert all(np.array_equal(s, np.sort(s)) for s in shares)


@pytest.mark.parametrize("count", [1, 7, 10, 100])
def test_iid_shares_are_equal_disjoint_and_cover_the_train_split(count: int) -> None:
    # Prepare
    labels = digits.load_data().y_train
    partition = Partition(count=count, scheme="iid", seed=5)
    # Execute
    shares = split(labels, partition)
    # Assert
    _check_shares(shares, len(labels))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    assert _tv_from_global(labels, shares) < (0.2 if count <= 10 else 1.0)


@pytest.mark.parametrize(("count", "alpha"), [(10, 0.1), (10, 1.0), (50, 0.01), (300, 0.05)])
def test_dirichlet_shares_are_disjoint_cover_and_none_is_empty(count: int, alpha: float) -> None:
    # Prepare
    labels = digits.load_data().y_train
    partition = Partition(count=count, scheme="dirichlet", alpha=alpha, seed=9)
    # Execute
    shares = split(labels, partition)
    # Assert
    _check_shares(shares, len(labels))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    # Prepare
    labels = digits.load_data().y_train

    def skew(scheme: str, alpha: float) -> float:
        shares = split(labels, Partition(count=10, scheme=scheme, alpha=alpha, seed=2))  # type: ignore[arg-type]
        return _tv_from_global(labels, shares)

    # Execute
    iid, mild, strong = skew("iid", 1.0), skew("dirichlet", 1.0), skew("dirichlet", 0.1)
    # Assert
    assert iid < 0.15
    assert iid < mild < strong
    assert strong > 0.5


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_deterministic_and_follow_the_seed(scheme: str) -> None:
    # Prepare
    labels = digits.load_data().y_train

    def make(seed: int) -> Partition:
        return Partition(count=10, scheme=scheme, alpha=0.5, seed=seed)  # type: ignore[arg-type]

    # Execute
    first, again, other = split(labels, make(1)), split(labels, make(1)), split(labels, make(2))
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert np.array_equal(digits.client_indices(dataclasses.replace(make(1), index=4)), first[4])


def test_more_clients_than_examples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot split"):
        split(np.zeros(5, np.int64), Partition(count=6, scheme="dirichlet"))


# --- initial model -----------------------------------------------------------------------------


def test_initial_params_are_deterministic_and_shaped_like_the_torch_model() -> None:
    # Prepare
    import torch

    # Execute
    params = digits.initial_params(7)
    # Assert
    assert _same_bytes(params, digits.initial_params(7))
    assert not _same_bytes(params, digits.initial_params(8))
    state = digits._model().state_dict()
    assert list(params) == list(state) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for name, tensor in state.items():
        assert params[name].shape == tuple(tensor.shape) and tensor.dtype == torch.float32
        assert params[name].dtype == np.float32
    for name, fan_in in [("fc1.weight", 64), ("fc1.bias", 64), ("fc2.weight", 32)]:
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(params[name]).max() <= bound and np.abs(params[name]).max() > 0.9 * bound


def test_building_the_initial_model_imports_neither_torch_nor_sklearn() -> None:
    # Prepare: what a reducer runs to create round 0
    code = (
        "import sys, fednode.task.api as api;"
        " params = api.load_task('fednode.task.digits').initial_params(3);"
        " import fednode.task.digits as d; d.initial_params(4);"
        " print(len(params), sorted({m.split('.')[0] for m in sys.modules}))"
    )
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    count, loaded = out.stdout.split(" ", 1)
    assert count == "4"
    assert "'torch'" not in loaded and "'sklearn'" not in loaded and "'trio'" not in loaded
    assert "'numpy'" in loaded  # the check would notice a module it should


# --- training and evaluation -------------------------------------------------------------------


def test_train_is_deterministic_and_reports_its_share() -> None:
    # Prepare
    params = digits.initial_params(0)
    # Execute
    trained, n, metrics = digits.train(params, CONFIG)
    again, _, metrics_again = digits.train(params, CONFIG)
    next_round, _, _ = digits.train(params, dataclasses.replace(CONFIG, round=2))
    # Assert
    assert _same_bytes(trained, again) and metrics == metrics_again
    assert not _same_bytes(trained, next_round)  # shuffles follow the round
    assert not _same_bytes(trained, params)
    assert n == len(digits.client_indices(CONFIG.partition)) in (143, 144)
    assert set(metrics) == {"loss", "accuracy"}
    assert 0 < metrics["loss"] < 2.5 and 0 <= metrics["accuracy"] <= 1


def test_train_accepts_read_only_params_and_leaves_them_alone() -> None:
    # Prepare
    writable = digits.initial_params(1)
    decoded = decode(encode(ModelBlob(tensors=writable)), ModelBlob).tensors
    assert not any(a.flags.writeable for a in decoded.values())
    snapshot = {k: a.copy() for k, a in decoded.items()}
    # Execute
    from_decoded, _, _ = digits.train(decoded, CONFIG)
    from_writable, _, _ = digits.train(writable, CONFIG)
    # Assert
    assert _same_bytes(from_decoded, from_writable)
    assert _same_bytes(Model(snapshot), decoded)
    assert all(a.flags.writeable for a in from_decoded.values())


def _drift(a: Model, b: Model) -> float:
    return float(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a))


def test_fedprox_with_mu_zero_is_plain_sgd_and_positive_mu_pulls_towards_the_global() -> None:
    # Prepare
    params = digits.initial_params(2)
    plain_config = dataclasses.replace(CONFIG, epochs=5)
    # Execute
    plain, _, _ = digits.train(params, plain_config)
    zero, _, _ = digits.train(params, dataclasses.replace(plain_config, proximal_mu=0.0))
    prox, _, prox_metrics = digits.train(params, dataclasses.replace(plain_config, proximal_mu=1.0))
    # Assert
    assert _same_bytes(plain, zero)
    assert not _same_bytes(plain, prox)
    assert _drift(prox, params) < 0.8 * _drift(plain, params)
    assert prox_metrics["loss"] > 0


def test_extra_options_are_checked_and_used() -> None:
    # Prepare
    params = digits.initial_params(3)
    # Execute
    plain, _, _ = digits.train(params, CONFIG)
    momentum, _, _ = digits.train(params, dataclasses.replace(CONFIG, extra={"momentum": 0.9}))
    # Assert
    assert not _same_bytes(plain, momentum)
    with pytest.raises(ConfigError, match="no option 'momentun'"):
        digits.train(params, dataclasses.replace(CONFIG, extra={"momentun": 0.9}))
    with pytest.raises(ConfigError, match="momentum"):
        digits.train(params, dataclasses.replace(CONFIG, extra={"momentum": "high"}))


def test_evaluate_uses_the_held_out_split() -> None:
    # Prepare
    params = digits.initial_params(4)
    trained, _, _ = digits.train(params, dataclasses.replace(CONFIG, epochs=5))
    # Execute
    before = digits.evaluate(params, EvalConfig())
    after = digits.evaluate(trained, EvalConfig(batch_size=7))
    # Assert
    assert before["num_examples"] == after["num_examples"] == 360
    assert before["accuracy"] < 0.3 < after["accuracy"]
    assert after["loss"] < before["loss"]
    assert digits.evaluate(trained, EvalConfig(batch_size=1000)) == pytest.approx(after)


# --- FedAvg reference --------------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean_in_each_dtype() -> None:
    # Prepare
    a = Model({"w": np.array([1.0, 2.0], np.float32), "n": np.array([1, 2], np.int64)})
    b = Model({"w": np.array([4.0, 8.0], np.float32), "n": np.array([4, 3], np.int64)})
    # Execute
    mean = fedavg([(a, 1), (b, 2)])
    # Assert
    np.testing.assert_array_equal(mean["w"], np.array([3.0, 6.0], np.float32))
    np.testing.assert_array_equal(mean["n"], np.array([3, 3]))  # 8/3 rounds to 3
    assert mean["w"].dtype == np.float32 and mean["n"].dtype == np.int64
    with pytest.raises(AggregationError):
        fedavg([(a, 1), (Model({"w": a["w"], "n": a["n"].astype(np.int32)}), 1)])
    with pytest.raises(AggregationError):
        fedavg([(a, 0)])
    with pytest.raises(AggregationError):
        fedavg([])


def test_reference_with_10_iid_clients_reaches_the_learning_target() -> None:
    # Prepare: the demo's setup (5 rounds, 5 local epochs of SGD, batch 32)
    started = time.perf_counter()
    # Execute
    history = run_reference(
        digits, clients=10, rounds=5, config=digits.DEFAULT_CONFIG, scheme="iid", seed=0
    )
    elapsed = time.perf_counter() - started
    # Assert
    accuracy = [round(r.accuracy, 4) for r in history]
    print(f"reference accuracy per round {accuracy}, {elapsed:.2f} s")
    assert [r.round for r in history] == list(range(6))
    assert history[0].accuracy < 0.2 and history[1].accuracy > 0.6
    assert history[-1].accuracy >= 0.93
    assert all(r.num_examples == 1437 for r in history[1:])
    assert history[-1].loss < history[1].loss < history[0].loss
    assert elapsed < 30


def test_reference_is_reproducible_and_matches_a_hand_run_round() -> None:
    # Prepare
    config = dataclasses.replace(digits.DEFAULT_CONFIG, epochs=1)
    # Execute
    history = run_reference(
        digits, clients=3, rounds=1, config=config, scheme="dirichlet", alpha=0.3, seed=4
    )
    again = run_reference(
        digits, clients=3, rounds=1, config=config, scheme="dirichlet", alpha=0.3, seed=4
    )
    updates = []
    for index in range(3):
        partition = Partition(index=index, count=3, scheme="dirichlet", alpha=0.3, seed=4)
        client = dataclasses.replace(config, round=1, seed=4, partition=partition)
        params, n, _ = digits.train(digits.initial_params(4), client)
        updates.append((params, n))
    # Assert
    assert _same_bytes(history[-1].model, again[-1].model)
    assert _same_bytes(history[-1].model, fedavg(updates))
    assert history[1].num_examples == sum(n for _, n in updates)
