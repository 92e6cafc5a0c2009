"""Server optimisers against a naive per-element reference of Reddi et al. 2021, Algorithm 2.

The reference loops over elements in Python floats, keeping the state rounded to float32 as the
optimisers do, and follows the formulas in ``fednode/aggregation/optimizers.py``'s docstring.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fednode.aggregation import (
    OPTIMIZERS,
    FedAdam,
    FedAvg,
    FedAvgM,
    ServerOptimizer,
    make_optimizer,
)
from fednode.errors import AggregationError, ConfigError
from fednode.wire import BLOB_LIMITS, ModelBlob, decode, encode

Model = dict[str, np.ndarray[Any, Any]]

DEFAULTS = {
    "fedavg": {"lr": 1.0},
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadagrad": {"lr": 0.1, "beta1": 0.0, "tau": 1e-3},
    "fedadam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}


# -- the naive reference ------------------------------------------------------------------------


def f32(x: float) -> float:
    return float(np.float32(x))


def reference_run(
    name: str, hyper: dict[str, float], start: list[float], aggregates: list[list[float]]
) -> list[list[float]]:
    """Each round's new global model for one float32 tensor given as a list of elements."""
    lr = hyper["lr"]
    g = list(start)
    m: list[float | None] = [None] * len(g)
    v: list[float | None] = [None] * len(g)
    out = []
    for a in aggregates:
        new = []
        for i, (gi, ai) in enumerate(zip(g, a, strict=True)):
            d = ai - gi
            if name == "fedavg":
                x = ai if lr == 1.0 else gi + lr * d
            elif name == "fedavgm":
                mi = d if m[i] is None else hyper["momentum"] * m[i] + d
                m[i] = f32(mi)
                x = gi + lr * mi
            else:
                b1, tau = hyper["beta1"], hyper["tau"]
                mi = b1 * (m[i] or 0.0) + (1 - b1) * d
                vi = tau * tau if v[i] is None else v[i]
                if name == "fedadagrad":
                    vi = vi + d * d
                elif name == "fedadam":
                    vi = hyper["beta2"] * vi + (1 - hyper["beta2"]) * d * d
                else:  # fedyogi
                    sign = (vi > d * d) - (vi < d * d)
                    vi = vi - (1 - hyper["beta2"]) * d * d * sign
                m[i], v[i] = f32(mi), f32(vi)
                x = gi + lr * mi / (math.sqrt(vi) + tau)
            new.append(f32(x))
        out.append(new)
        g = new
    return out


def rounds(seed: int, n: int, size: int) -> tuple[np.ndarray[Any, Any], list[np.ndarray[Any, Any]]]:
    """A float32 start tensor and ``n`` aggregates near it (as clients' means would be)."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(size).astype(np.float32)
    aggregates = [
        (start + rng.standard_normal(size) * 0.1 * rng.uniform(0.1, 3)).astype(np.float32)
        for _ in range(n)
    ]
    return start, aggregates


def run(opt: ServerOptimizer, start: Model, aggregates: list[Model]) -> list[Model]:
    g, out = start, []
    for a in aggregates:
        g = opt.step(g, a)
        out.append(g)
    return out


def model(w: np.ndarray[Any, Any], count: int = 0) -> Model:
    return {"w": w, "num_batches_tracked": np.array(count, np.int64)}


# -- formulas -----------------------------------------------------------------------------------


hypers = {
    "fedavg": st.fixed_dictionaries({"lr": st.sampled_from([1.0, 0.5, 1.7])}),
    "fedavgm": st.fixed_dictionaries({"lr": st.floats(0.1, 2), "momentum": st.floats(0, 0.99)}),
    "fedadagrad": st.fixed_dictionaries(
        {"lr": st.floats(1e-3, 1), "beta1": st.floats(0, 0.99), "tau": st.floats(1e-6, 1e-1)}
    ),
    "fedadam": st.fixed_dictionaries(
        {
            "lr": st.floats(1e-3, 1),
            "beta1": st.floats(0, 0.99),
            "beta2": st.floats(0, 0.999),
            "tau": st.floats(1e-6, 1e-1),
        }
    ),
}
hypers["fedyogi"] = hypers["fedadam"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_matches_the_naive_reference(name: str, data: st.DataObject, seed: int) -> None:
    # Prepare
    hyper = data.draw(hypers[name])
    start, aggregates = rounds(seed, 6, 17)
    opt = make_optimizer(name, **hyper)
    # Execute
    got = run(opt, model(start), [model(a, 10 * i) for i, a in enumerate(aggregates)])
    want = reference_run(name, hyper, start.tolist(), [a.tolist() for a in aggregates])
    # Assert
    assert opt.steps == 6
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["w"].dtype == np.float32
        np.testing.assert_allclose(g["w"], np.array(w, np.float32), rtol=1e-6, atol=1e-7)
        assert g["num_batches_tracked"] == 10 * i  # integers take the aggregated value


def test_defaults_are_the_documented_ones() -> None:
    for name, hyper in DEFAULTS.items():
        assert make_optimizer(name).hyperparameters() == hyper


def test_fedavg_returns_the_aggregate_exactly() -> None:
    # Prepare
    start, (aggregate,) = rounds(1, 1, 100)
    g, a = model(start), model(aggregate, 7)
    # Execute
    new = FedAvg().step(g, a)
    # Assert
    assert all(np.array_equal(new[k], a[k]) and new[k] is not a[k] for k in a)


def test_fedavgm_without_momentum_at_lr_1_is_fedavg() -> None:
    # Prepare
    start, aggregates = rounds(2, 3, 100)
    # Execute
    got = run(FedAvgM(lr=1.0, momentum=0.0), model(start), [model(a) for a in aggregates])
    # Assert
    for g, a in zip(got, aggregates, strict=True):
        np.testing.assert_allclose(g["w"], a, rtol=1e-6, atol=1e-7)


def test_float64_and_float16_tensors_keep_their_dtypes() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    g = {"a": rng.standard_normal(5), "b": rng.standard_normal(5).astype(np.float16)}
    a = {k: (v + 0.1).astype(v.dtype) for k, v in g.items()}
    opt = FedAdam()
    # Execute
    new = opt.step(g, a)
    # Assert
    assert new["a"].dtype == np.float64 and new["b"].dtype == np.float16
    assert opt.state()["m/a"].dtype == np.float64 and opt.state()["m/b"].dtype == np.float32


# -- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_successor_resumes_exactly_from_the_state(name: str) -> None:
    # Prepare: k steps, the state through the wire (read-only arrays), a new optimiser
    start, aggregates = rounds(4, 8, 50)
    models = [model(a, i) for i, a in enumerate(aggregates)]
    whole = make_optimizer(name)
    uninterrupted = run(whole, model(start), models)
    first = make_optimizer(name)
    midway = run(first, model(start), models[:3])
    blob = encode(ModelBlob(tensors=first.state()))  # type: ignore[arg-type]
    state = decode(blob, ModelBlob, BLOB_LIMITS).tensors
    # Execute
    successor = make_optimizer(name, state=state, **first.hyperparameters())
    resumed = run(successor, midway[-1], models[3:])
    # Assert: bit for bit
    assert successor.steps == 8
    for got, want in zip(resumed, uninterrupted[3:], strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    final, want_state = successor.state(), whole.state()
    assert list(final) == list(want_state)
    assert all(np.array_equal(final[k], want_state[k]) for k in want_state)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_round_trips(name: str) -> None:
    # Prepare
    start, aggregates = rounds(5, 2, 10)
    opt = make_optimizer(name)
    run(opt, model(start), [model(a) for a in aggregates])
    # Execute
    copy = make_optimizer(name)
    copy.load_state(opt.state())
    # Assert
    state, again = opt.state(), copy.state()
    assert list(again) == list(state) and state["t"] == 2
    assert all(np.array_equal(state[k], again[k]) for k in state)
    expected = {"t"} | {f"{s}/w" for s in type(opt).SLOTS}
    assert set(state) == expected


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"t": np.array(-1, np.int64)},
        {"t": np.array(1.5)},
        {"t": np.array(1, np.int64), "q/w": np.zeros(3, np.float32), "v/w": np.ones(3, np.float32)},
        {"t": np.array(1, np.int64), "m/w": np.zeros(3, np.float32)},  # v missing
        {"t": np.array(1, np.int64), "m/w": np.zeros(3, np.int64), "v/w": np.ones(3, np.int64)},
        {
            "t": np.array(1, np.int64),
            "m/w": np.zeros(3, np.float32),
            "v/w": np.full(3, np.nan, np.float32),
        },
        {"t": np.array(0, np.int64), "m/w": np.zeros(3, np.float32), "v/w": np.ones(3, np.float32)},
    ],
)
def test_foreign_state_is_rejected(state: Model) -> None:
    opt = FedAdam()
    with pytest.raises(AggregationError, match="optimiser state"):
        opt.load_state(state)
    assert opt.steps == 0 and set(opt.state()) == {"t"}


def test_state_for_another_model_is_rejected() -> None:
    # Prepare
    start, aggregates = rounds(6, 1, 10)
    opt = FedAdam()
    opt.step(model(start), model(aggregates[0]))
    successor = FedAdam()
    successor.load_state(opt.state())
    # Execute / Assert
    with pytest.raises(AggregationError, match=r"^w: shape"):
        successor.step({"w": np.zeros(11, np.float32)}, {"w": np.ones(11, np.float32)})
    with pytest.raises(AggregationError, match=r"^v: not in the optimiser state"):
        successor.step({"v": np.zeros(10, np.float32)}, {"v": np.ones(10, np.float32)})


# -- inputs -------------------------------------------------------------------------------------


def _frozen(m: Model) -> Model:
    out = {}
    for k, v in m.items():
        c = v.copy()
        c.flags.writeable = False
        out[k] = c
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_inputs_are_read_only_and_never_changed(name: str) -> None:
    # Prepare
    start, aggregates = rounds(7, 3, 20)
    g, a = _frozen(model(start)), _frozen(model(aggregates[0], 3))
    before = {k: v.copy() for k, v in g.items()}, {k: v.copy() for k, v in a.items()}
    opt = make_optimizer(name)
    # Execute
    new = opt.step(g, a)
    # Assert
    assert all(np.array_equal(g[k], before[0][k]) and np.array_equal(a[k], before[1][k]) for k in g)
    assert all(new[k] is not g[k] and new[k] is not a[k] for k in new)
    assert all(new[k].flags.writeable for k in new)


MISMATCHES = {
    "missing": (
        {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)},
        {"w": np.zeros(3, np.float32)},
        "b",
    ),
    "extra": (
        {"w": np.zeros(3, np.float32)},
        {"w": np.zeros(3, np.float32), "x": np.zeros(1, np.float32)},
        "x",
    ),
    "shape": ({"w": np.zeros(3, np.float32)}, {"w": np.zeros(4, np.float32)}, "w"),
    "dtype": ({"w": np.zeros(3, np.float32)}, {"w": np.zeros(3, np.float64)}, "w"),
    "nan": ({"w": np.zeros(3, np.float32)}, {"w": np.array([0, np.nan, 0], np.float32)}, "w"),
    "inf": ({"w": np.zeros(3, np.float32)}, {"w": np.array([0, 0, -np.inf], np.float32)}, "w"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_bad_aggregates_are_rejected_and_the_state_kept(name: str, case: str) -> None:
    # Prepare: one good step, so there is state to keep
    g, a, tensor = MISMATCHES[case]
    opt = make_optimizer(name)
    opt.step(
        {k: np.ones_like(v) for k, v in g.items()}, {k: np.full_like(v, 2) for k, v in g.items()}
    )
    before = opt.state()
    # Execute
    with pytest.raises(AggregationError, match=f"^{tensor}: "):
        opt.step(g, a)
    # Assert
    after = opt.state()
    assert list(after) == list(before) and all(np.array_equal(after[k], before[k]) for k in before)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hyper"),
    [
        ("sgd", {}),
        ("FedAdam", {}),
        ("fedavg", {"lr": 0}),
        ("fedavg", {"lr": -1.0}),
        ("fedavg", {"lr": float("nan")}),
        ("fedavg", {"lr": float("inf")}),
        ("fedavg", {"lr": True}),
        ("fedavg", {"lr": "1"}),
        ("fedavg", {"momentum": 0.9}),
        ("fedavgm", {"momentum": 1.0}),
        ("fedavgm", {"momentum": -0.1}),
        ("fedadam", {"beta1": 1.0}),
        ("fedadam", {"beta2": 1.5}),
        ("fedadam", {"tau": 0.0}),
        ("fedyogi", {"eta": 0.1}),
        ("fedadagrad", {"beta2": 0.9}),
        ("fedadagrad", {"tau": -1e-3}),
    ],
)
def test_bad_names_and_hyperparameters_are_config_errors(name: str, hyper: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_optimizer(name, **hyper)


def test_the_factory_knows_the_five_optimisers() -> None:
    assert sorted(OPTIMIZERS) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi"]
    for name, cls in OPTIMIZERS.items():
        assert type(make_optimizer(name)) is cls
