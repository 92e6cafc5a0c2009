"""Streaming FedAvg against a naive reference: ``np.average`` over the list of updates in float64.

"Relative" below is relative to the tensor's largest input magnitude, the scale an average's
rounding error is measured against (a mean near zero can come from large inputs that cancel).
``FEDNODE_SLOW=1`` runs the memory test at full size (200 updates of a 10M-parameter model).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fednode.aggregation import StreamingMean, weighted_mean
from fednode.aggregation.fedavg import DEFAULT_CHUNK
from fednode.errors import AggregationError, ConfigError
from fednode.wire import BLOB_LIMITS, ModelBlob, decode, encode

Model = dict[str, np.ndarray[Any, Any]]
SLOW = os.environ.get("FEDNODE_SLOW") == "1"
RTOL = 1e-6
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


# -- helpers ------------------------------------------------------------------------------------


def reference(
    updates: Sequence[Model], weights: Sequence[float]
) -> dict[str, np.ndarray[Any, Any]]:
    """The naive weighted mean of each tensor, in float64 (not rounded to the model's dtypes)."""
    return {
        name: np.average(
            np.stack([np.asarray(u[name], dtype=np.float64) for u in updates]),
            axis=0,
            weights=np.asarray(weights, dtype=np.float64),
        )
        for name in updates[0]
    }


def output_eps(dtype: np.dtype[Any]) -> float:
    """The relative rounding of a result stored in ``dtype``."""
    return float(ml_dtypes.finfo(dtype).eps) if dtype.kind in "fV" else 0.0


def assert_mean(
    got: Model, updates: Sequence[Model], want: Model, rtol: float = RTOL, int_atol: float = 0.5
) -> None:
    """``got`` has ``updates[0]``'s names, order, shapes and dtypes, and is ``want`` to ``rtol``
    (integer tensors: rounded to the nearest integer, or within ``int_atol``)."""
    first = updates[0]
    assert list(got) == list(first)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == first[name].dtype and g.shape == first[name].shape, name
        g64 = g.astype(np.float64)
        if g.dtype.kind in "iu":
            assert np.all(np.abs(g64 - w) <= int_atol + 1e-9 * np.abs(w)), name
            continue
        scale = max(
            float(np.max(np.abs(np.asarray(u[name], np.float64)), initial=0)) for u in updates
        )
        err = float(np.max(np.abs(g64 - w), initial=0))
        assert err <= (rtol + output_eps(g.dtype)) * scale, (name, err, scale)


def models(
    rng: np.random.Generator, spec: dict[str, tuple[tuple[int, ...], str]], n: int
) -> list[Model]:
    out = []
    for _ in range(n):
        model: Model = {}
        for name, (shape, dtype) in spec.items():
            if dtype in ("int64", "int32", "uint8"):
                model[name] = rng.integers(0, 100, shape).astype(dtype)
            else:
                scale = 10.0 ** rng.integers(-3, 4)
                model[name] = (rng.standard_normal(shape) * scale).astype(
                    np.dtype(dtype) if dtype != "bfloat16" else BFLOAT16
                )
        out.append(model)
    return out


def read_only(model: Model) -> Model:
    """Copies that cannot be written, like the arrays the wire decodes."""
    out = {}
    for name, array in model.items():
        copy = array.copy()
        copy.flags.writeable = False
        out[name] = copy
    return out


SPEC = {
    "conv.weight": ((4, 3, 3), "float32"),
    "conv.bias": ((4,), "float32"),
    "bn.running_var": ((4,), "float64"),
    "bn.num_batches_tracked": ((), "int64"),
}

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from(["float32", "float32", "float64", "float16", "bfloat16", "int64", "uint8"])
specs = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=6), st.tuples(shapes, dtypes), min_size=1, max_size=4
)


# -- the weighted mean --------------------------------------------------------------------------


@given(
    spec=specs,
    n=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    integral=st.booleans(),
    block=st.sampled_from([1, 2, 3, 8]),
    chunk=st.sampled_from([1, 5, 64, 1 << 17]),
)
def test_matches_naive_reference(
    spec: dict[str, tuple[tuple[int, ...], str]],
    n: int,
    seed: int,
    integral: bool,
    block: int,
    chunk: int,
) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    updates = models(rng, spec, n)
    top = 10 ** int(rng.integers(1, 7))  # weights of any scale: they enter as ratios
    weights = [int(w) if integral else float(w) * 0.37 for w in rng.integers(1, top, n)]
    mean = StreamingMean(block=block, chunk=chunk)
    # Execute
    counted = [mean.add(u, w) for u, w in zip(updates, weights, strict=True)]
    got = mean.result()
    # Assert
    assert all(counted) and mean.count == n
    assert mean.total_weight == pytest.approx(sum(weights), rel=1e-12)
    assert_mean(got, updates, reference(updates, weights))


def test_many_float32_updates_with_cancellation_stay_within_1e6() -> None:
    # Prepare: 300 updates whose mean is near zero, so every rounding shows against it
    rng = np.random.default_rng(7)
    updates = [{"w": (rng.standard_normal(5000) * 100).astype(np.float32)} for _ in range(300)]
    weights = [int(w) for w in rng.integers(1, 5000, 300)]
    mean = StreamingMean()
    # Execute
    for u, w in zip(updates, weights, strict=True):
        mean.add(u, w)
    # Assert
    assert_mean(mean.result(), updates, reference(updates, weights))


def test_float32_blocks_bound_the_error_whatever_the_number_of_updates() -> None:
    # Prepare: 20,000 near-identical updates; one float32 running sum would drift by ~1e-4
    rng = np.random.default_rng(10)
    base = rng.uniform(0.1, 1, 64).astype(np.float32)
    updates = [{"w": base}, {"w": (base * 1.001).astype(np.float32)}]
    weights = [int(w) for w in rng.integers(1, 4, 20_000)]
    mean = StreamingMean()
    # Execute
    for i, w in enumerate(weights):
        mean.add(updates[i % 2], w)
    # Assert
    assert_mean(mean.result(), updates, reference([updates[i % 2] for i in range(20_000)], weights))


def test_weighted_mean_function_equals_the_streaming_class() -> None:
    # Prepare
    updates = models(np.random.default_rng(1), SPEC, 5)
    weights = [3, 1, 4, 1, 5]
    # Execute
    got = weighted_mean(zip(updates, weights, strict=True))
    # Assert
    assert_mean(got, updates, reference(updates, weights))


def test_integer_tensors_take_the_rounded_weighted_mean() -> None:
    # Prepare
    updates = [{"n": np.array(100, np.int64)}, {"n": np.array(200, np.int64)}]
    mean = StreamingMean()
    # Execute
    mean.add(updates[0], 1)
    mean.add(updates[1], 3)
    tie = StreamingMean()
    tie.add({"n": np.array(1, np.int64)}, 1)
    tie.add({"n": np.array(2, np.int64)}, 1)
    # Assert
    assert mean.result()["n"] == 175 and mean.result()["n"].dtype == np.int64
    assert tie.result()["n"] == 2  # 1.5 rounds half to even


def test_result_keeps_order_dtypes_and_can_continue() -> None:
    # Prepare
    spec = {
        "z": ((3,), "bfloat16"),
        "a": ((2, 2), "float16"),
        "m": ((5,), "float32"),
        "k": ((), "int64"),
    }
    updates = models(np.random.default_rng(2), spec, 12)
    mean = StreamingMean(block=3)
    # Execute: take the result part way (it folds and frees the float32 block), then carry on
    for u in updates[:5]:
        mean.add(u, 2)
    early = mean.result()
    again = mean.result()
    for u in updates[5:]:
        mean.add(u, 2)
    # Assert
    assert_mean(early, updates[:5], reference(updates[:5], [2] * 5))
    assert all(np.array_equal(early[k], again[k]) for k in early)
    assert_mean(mean.result(), updates, reference(updates, [2] * 12))


def test_read_only_inputs_are_read_and_never_written() -> None:
    # Prepare: decoded off the wire (read-only views), and read-only copies
    updates = models(np.random.default_rng(3), SPEC, 4)
    decoded = [
        decode(encode(ModelBlob(tensors=u)), ModelBlob, BLOB_LIMITS).tensors for u in updates[:2]
    ]  # type: ignore[arg-type]
    frozen = [read_only(u) for u in updates[2:]]
    inputs = [*decoded, *frozen]
    before = [{k: v.copy() for k, v in u.items()} for u in inputs]
    mean = StreamingMean()
    # Execute
    for u in inputs:
        mean.add(u, 10)
    got = mean.result()
    # Assert
    assert all(not a.flags.writeable for u in inputs for a in u.values())
    assert all(np.array_equal(u[k], b[k]) for u, b in zip(inputs, before, strict=True) for k in u)
    assert_mean(got, updates, reference(updates, [10] * 4))


def test_non_contiguous_inputs() -> None:
    # Prepare
    rng = np.random.default_rng(4)
    big = [rng.standard_normal((6, 8)).astype(np.float32) for _ in range(3)]
    updates = [{"t": b.T} for b in big]  # transposed views
    mean = StreamingMean(chunk=5)
    # Execute
    for u in updates:
        mean.add(u, 1)
    # Assert
    assert_mean(mean.result(), updates, reference(updates, [1, 1, 1]))


# -- hierarchical = flat ------------------------------------------------------------------------


def combine(
    groups: list[list[int]], updates: Sequence[Model], weights: Sequence[int]
) -> tuple[Model, float]:
    """One combiner per group; each partial travels (canonical CBOR, decoded read-only, in the
    model's float32) to a root that adds it with the group's total weight."""
    root = StreamingMean()
    for g, members in enumerate(groups):
        combiner = StreamingMean()
        for i in members:
            combiner.add(updates[i], weights[i], key=bytes([i % 256, i // 256]))
        blob = encode(ModelBlob(tensors=combiner.result()))  # type: ignore[arg-type]
        partial = decode(blob, ModelBlob, BLOB_LIMITS).tensors
        assert root.add(partial, combiner.total_weight, key=b"combiner-%d" % g)
    return root.result(), root.total_weight


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 60))
def test_hierarchical_equals_flat_for_1_3_and_5_combiners(seed: int, n: int) -> None:
    # Prepare: float32 models whose means cancel, random weights, random splits into groups
    rng = np.random.default_rng(seed)
    spec = {"w": ((7, 9), "float32"), "b": ((9,), "float32"), "n": ((), "int64")}
    updates = models(rng, spec, n)
    weights = [int(w) for w in rng.integers(1, 50_000, n)]
    flat = StreamingMean()
    for u, w in zip(updates, weights, strict=True):
        flat.add(u, w)
    want = reference(updates, weights)
    flat_result = flat.result()
    for k in (1, 3, 5):
        order = rng.permutation(n)
        cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
        groups = [list(part) for part in np.split(order, cuts)]
        # Execute
        got, total = combine(groups, updates, weights)
        # Assert
        assert total == sum(weights)
        # integer tensors are rounded once more by each combiner: within 1 of the exact mean
        assert_mean(got, updates, want, int_atol=1.5)
        assert_mean(
            got,
            updates,
            {name: a.astype(np.float64) for name, a in flat_result.items() if a.dtype.kind == "f"},
        )


def test_two_level_tree_equals_flat() -> None:
    # Prepare: 40 updates -> 8 combiners -> 2 mid-level combiners -> root
    rng = np.random.default_rng(11)
    updates = models(rng, {"w": ((1000,), "float32")}, 40)
    weights = [int(w) for w in rng.integers(1, 1000, 40)]
    leaves = []
    for g in range(8):
        leaf = StreamingMean()
        for i in range(g * 5, g * 5 + 5):
            leaf.add(updates[i], weights[i])
        leaves.append((leaf.result(), leaf.total_weight))
    mids = []
    for h in range(2):
        mid = StreamingMean()
        for partial, total in leaves[h * 4 : h * 4 + 4]:
            mid.add(partial, total)
        mids.append((mid.result(), mid.total_weight))
    root = StreamingMean()
    # Execute
    for partial, total in mids:
        root.add(partial, total)
    # Assert
    assert root.total_weight == sum(weights)
    assert_mean(root.result(), updates, reference(updates, weights))


# -- duplicates ---------------------------------------------------------------------------------


def test_a_duplicate_key_counts_once() -> None:
    # Prepare
    first, other, later = models(np.random.default_rng(5), SPEC, 3)
    mean = StreamingMean()
    # Execute
    added = mean.add(first, 10, key=b"alice")
    duplicate = mean.add(other, 99, key=b"alice")
    third = mean.add(later, 5, key=b"bob")
    # Assert
    assert (added, duplicate, third) == (True, False, True)
    assert mean.count == 2 and mean.total_weight == 15
    assert mean.keys() == frozenset({b"alice", b"bob"})
    assert_mean(mean.result(), [first, later], reference([first, later], [10, 5]))


def test_updates_without_a_key_all_count() -> None:
    # Prepare
    u = models(np.random.default_rng(6), SPEC, 1)[0]
    mean = StreamingMean()
    # Execute
    results = [mean.add(u, 1) for _ in range(3)]
    # Assert
    assert results == [True] * 3 and mean.count == 3 and mean.keys() == frozenset()


# -- rejection ----------------------------------------------------------------------------------


def _with(model: Model, name: str, value: Any) -> Model:
    out = dict(model)
    if value is None:
        del out[name]
    else:
        out[name] = value
    return out


BAD_UPDATES = {
    "missing tensor": lambda m: _with(m, "conv.bias", None),
    "extra tensor": lambda m: _with(m, "conv.extra", np.zeros(4, np.float32)),
    "renamed tensor": lambda m: _with(_with(m, "conv.bias", None), "conv.bias2", m["conv.bias"]),
    "other shape": lambda m: _with(m, "conv.bias", np.zeros(5, np.float32)),
    "transposed": lambda m: _with(m, "conv.weight", np.zeros((3, 3, 4), np.float32)),
    "other dtype": lambda m: _with(m, "conv.bias", m["conv.bias"].astype(np.float64)),
    "int for float": lambda m: _with(m, "bn.running_var", np.ones(4, np.int64)),
    "nan": lambda m: _with(m, "conv.weight", np.full((4, 3, 3), np.nan, np.float32)),
}
BAD_NAMES = {
    "missing tensor": "conv.bias",
    "extra tensor": "conv.extra",
    "renamed tensor": "conv.bias2",
    "other shape": "conv.bias",
    "transposed": "conv.weight",
    "other dtype": "conv.bias",
    "int for float": "bn.running_var",
    "nan": "conv.weight",
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_incompatible_update_is_rejected_naming_the_tensor(case: str) -> None:
    # Prepare
    good = models(np.random.default_rng(8), SPEC, 3)
    mean = StreamingMean()
    mean.add(good[0], 2, key=b"a")
    # Execute
    with pytest.raises(AggregationError, match=BAD_NAMES[case].replace(".", r"\.")):
        mean.add(BAD_UPDATES[case](good[1]), 7, key=b"b")
    mean.add(good[2], 3, key=b"c")
    # Assert: the rejected update left no trace, and its key was not used up
    assert mean.count == 2 and mean.total_weight == 5 and mean.keys() == {b"a", b"c"}
    assert_mean(mean.result(), [good[0], good[2]], reference([good[0], good[2]], [2, 3]))


@given(
    n_before=st.integers(0, 12),
    block=st.sampled_from([1, 2, 3, 8]),
    chunk=st.sampled_from([1, 4, 7, 1 << 17]),
    bad_tensor=st.sampled_from(["a", "b", "c"]),
    position=st.floats(0, 1),
    bad=st.sampled_from([np.nan, np.inf, -np.inf, 3e38]),
    seed=st.integers(0, 2**32 - 1),
)
def test_non_finite_update_is_rejected_without_touching_the_sum(
    n_before: int, block: int, chunk: int, bad_tensor: str, position: float, bad: float, seed: int
) -> None:
    # Prepare: a NaN or inf (or a value whose weighted product overflows float32) anywhere in any
    # tensor, after any number of good updates (so in each phase of the float32 block)
    spec = {
        "a": ((5, 5), "float32"),
        "b": ((3,), "float64"),
        "c": ((17,), "float32"),
        "k": ((), "int64"),
    }
    rng = np.random.default_rng(seed)
    good = models(rng, spec, n_before + 3)
    weights = [int(w) for w in rng.integers(1, 100, n_before + 3)]
    broken = {k: v.copy() for k, v in good[-1].items()}
    flat = broken[bad_tensor].reshape(-1)
    flat[min(int(position * flat.size), flat.size - 1)] = bad
    broken = read_only(broken)
    mean = StreamingMean(block=block, chunk=chunk)
    for u, w in zip(good[:n_before], weights[:n_before], strict=True):
        mean.add(u, w)
    # Execute
    reason = "value too large" if bad == 3e38 else "NaN or infinite value"
    with pytest.raises(AggregationError, match=f"^{bad_tensor}: {reason}"):
        mean.add(broken, 100, key=b"bad")
    for u, w in zip(good[n_before:], weights[n_before:], strict=True):
        mean.add(u, w, key=None)
    assert mean.add(good[0], 1, key=b"bad")  # the rejected update's key was not used up
    # Assert
    kept, kept_w = [*good, good[0]], [*weights, 1]
    assert mean.count == len(kept) and mean.total_weight == sum(kept_w)
    assert_mean(mean.result(), kept, reference(kept, kept_w))


@pytest.mark.parametrize("block", [8, 1])
def test_large_finite_values_are_averaged(block: int) -> None:
    # Prepare: float32 dot products of these overflow, so the exact check must accept them
    rng = np.random.default_rng(9)
    updates = [{"x": (rng.standard_normal(300) * 1e25).astype(np.float32)} for _ in range(20)]
    weights = [int(w) for w in rng.integers(1, 100, 20)]
    mean = StreamingMean(block=block, chunk=64)
    # Execute
    for u, w in zip(updates, weights, strict=True):
        mean.add(u, w)
    # Assert
    assert_mean(mean.result(), updates, reference(updates, weights))


def test_a_rejected_first_update_leaves_the_mean_empty() -> None:
    # Prepare
    mean = StreamingMean()
    bad = {"x": np.array([1.0, np.nan], np.float32)}
    # Execute
    with pytest.raises(AggregationError, match=r"^x: "):
        mean.add(bad, 1)
    # Assert
    assert mean.count == 0
    with pytest.raises(AggregationError, match="no updates"):
        mean.result()
    mean.add({"y": np.ones(3, np.float64)}, 2)  # the first good update sets the layout
    assert list(mean.result()) == ["y"]


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan"), float("inf"), True, "3", None])
def test_bad_weights_are_rejected(weight: Any) -> None:
    # Prepare
    mean = StreamingMean()
    mean.add({"x": np.ones(2, np.float32)}, 1)
    # Execute / Assert
    with pytest.raises(AggregationError, match="weight"):
        mean.add({"x": np.ones(2, np.float32)}, weight)
    assert mean.count == 1 and mean.total_weight == 1


@pytest.mark.parametrize(
    "model", [{}, {"s": np.array(["a"])}, {"c": np.ones(2, np.complex64)}, {"b": np.ones(2, bool)}]
)
def test_unaveragable_models_are_rejected(model: Model) -> None:
    with pytest.raises(AggregationError):
        StreamingMean().add(model, 1)


def test_empty_mean_has_no_result() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        StreamingMean().result()


@pytest.mark.parametrize(
    "options", [{"block": 0}, {"block": 2**20 + 1}, {"chunk": 0}, {"block": 1.5}, {"chunk": True}]
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        StreamingMean(**options)


# -- memory and layering ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600 if SLOW else 120)
@pytest.mark.parametrize("block", [8, 1])
def test_memory_stays_within_a_small_multiple_of_one_model(block: int) -> None:
    # Prepare: each update generated on the fly into one reused buffer (the caller's memory, not
    # counted); a float64 running reference at a few sampled positions checks the answer
    updates, params = (200, 10_000_000) if SLOW else (20, 2_000_000)
    buffer = np.empty(params, np.float32)
    model = {"big": buffer[: params // 2].reshape(-1, 100), "rest": buffer[params // 2 :]}
    rng = np.random.default_rng(12)
    probe = rng.choice(params, 1000, replace=False)
    probe_sum, total = np.zeros(1000), 0
    model_bytes = buffer.nbytes
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        mean = StreamingMean(block=block)
        # Execute
        for i in range(updates):
            rng.standard_normal(out=buffer, dtype=np.float32)
            mean.add(model, i + 1)
            probe_sum += buffer[probe] * (i + 1)
            total += i + 1
        result = mean.result()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    # Assert: float64 sums (2 models), the float32 block (1, freed before the result is made) or
    # the result (1), and the chunk scratch (float64 + float32)
    assert peak <= 3 * model_bytes + 12 * DEFAULT_CHUNK + 100_000, peak / model_bytes
    got = np.concatenate([result["big"].reshape(-1), result["rest"]])[probe]
    np.testing.assert_allclose(got, probe_sum / total, rtol=0, atol=1e-6 * 5)


def test_aggregation_imports_no_trio_libp2p_or_torch() -> None:
    # Prepare
    code = (
        "import sys, fednode.aggregation; print(' '.join({m.split('.')[0] for m in sys.modules}))"
    )
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    assert not set(out.stdout.split()) & {"trio", "libp2p", "torch"}
