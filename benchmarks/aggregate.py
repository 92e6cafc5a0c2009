"""Benchmark: streaming FedAvg throughput against numpy's in-place add over the same bytes.

Builds ``--distinct`` seeded float32 models of about ``--params`` parameters (ResNet-like: big
weight tensors, each followed by small bias / norm vectors, and an int64 0-d counter per norm),
then, in one process and interleaved round by round (best of ``--repeat``):

* ``numpy_add``: ``np.add(acc, x, out=acc)`` per tensor into a float32 model already touched:
  the speed of the memory. Its bytes/s is the bytes of updates consumed per second.
* ``streaming``: :class:`~fednode.aggregation.StreamingMean` with its default float32 blocks
  (``--block``, 8) folded into float64 sums, the same updates with weights 1..7.
* ``streaming_float64``: the same with ``block=1``: every update weighted and summed in float64.

Each timing covers ``--updates`` adds after one untimed add (which allocates and first touches
the sums; the baseline's accumulator is touched before timing too). ``result_s`` is the time of
one ``result()``. ``rel_err_vs_float64`` is the largest difference between the two streaming
results over all tensors, relative to each tensor's largest weighted-mean magnitude: what the
float32 blocks cost in accuracy. ``peak_models`` is the most memory a :class:`StreamingMean`
held at once while adding ``--updates`` updates and taking the result, from ``tracemalloc``, in
units of one model's bytes (the caller's updates not counted).

Prints one JSON object. ``python benchmarks/aggregate.py [--params 25e6] [--updates 50]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
import tracemalloc
from typing import Any

import numpy as np

from fednode.aggregation import StreamingMean
from fednode.aggregation.fedavg import DEFAULT_BLOCK, DEFAULT_CHUNK

Model = dict[str, np.ndarray[Any, Any]]
LAYERS = 50  # weight tensors; each has 4 norm vectors and a counter


def layout(params: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of a model of about ``params`` float parameters."""
    width = max(8, int(math.sqrt(params / LAYERS)))
    shapes: list[tuple[str, tuple[int, ...], str]] = []
    for i in range(LAYERS):
        rows = max(1, round(width * (0.5 + i / LAYERS)))  # sizes vary, as a network's do
        shapes.append((f"layer{i}.weight", (rows, width), "float32"))
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes.append((f"layer{i}.norm.{part}", (rows,), "float32"))
        shapes.append((f"layer{i}.norm.num_batches_tracked", (), "int64"))
    return shapes


def build_model(shapes: list[tuple[str, tuple[int, ...], str]], seed: int) -> Model:
    rng = np.random.default_rng(seed)
    model: Model = {}
    for name, shape, dtype in shapes:
        if dtype == "int64":
            model[name] = np.array(rng.integers(0, 1 << 20), dtype=np.int64)
        else:
            model[name] = rng.standard_normal(shape, dtype=np.float32)
    return model


def time_numpy_add(updates: list[Model], n: int) -> float:
    acc = {name: np.ones_like(x) for name, x in updates[0].items()}  # touched before timing
    start = time.perf_counter()
    for i in range(n):
        for name, x in updates[i % len(updates)].items():
            a = acc[name]
            np.add(a, x, out=a)
    return time.perf_counter() - start


def time_streaming(
    updates: list[Model], n: int, block: int, chunk: int
) -> tuple[float, Model, float]:
    mean = StreamingMean(block=block, chunk=chunk)
    mean.add(updates[-1], 3)  # allocates and first touches the sums: not timed
    start = time.perf_counter()
    for i in range(n):
        mean.add(updates[i % len(updates)], 1 + i % 7)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    result = mean.result()
    return elapsed, result, time.perf_counter() - start


def peak_models(updates: list[Model], n: int, block: int, chunk: int, model_bytes: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        mean = StreamingMean(block=block, chunk=chunk)
        for i in range(n):
            mean.add(updates[i % len(updates)], 1 + i % 7)
        result = mean.result()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result, mean
    return peak / model_bytes


def rel_err(got: Model, want: Model) -> float:
    worst = 0.0
    for name, w in want.items():
        w64, g64 = w.astype(np.float64), got[name].astype(np.float64)
        scale = float(np.max(np.abs(w64))) or 1.0
        worst = max(worst, float(np.max(np.abs(g64 - w64))) / scale)
    return worst


def run(params: int, n: int, repeat: int, distinct: int, block: int, chunk: int) -> dict[str, Any]:
    shapes = layout(params)
    updates = [build_model(shapes, seed) for seed in range(distinct)]
    model_bytes = sum(x.nbytes for x in updates[0].values())
    size = n * model_bytes
    best = {"numpy_add": math.inf, "streaming": math.inf, "streaming_float64": math.inf}
    result_s = {"streaming": math.inf, "streaming_float64": math.inf}
    results: dict[str, Model] = {}
    for _ in range(repeat):  # interleaved, so a burst of load cannot spoil one side only
        gc.collect()
        best["numpy_add"] = min(best["numpy_add"], time_numpy_add(updates, n))
        for name, b in (("streaming", block), ("streaming_float64", 1)):
            gc.collect()
            elapsed, results[name], res_s = time_streaming(updates, n, b, chunk)
            best[name] = min(best[name], elapsed)
            result_s[name] = min(result_s[name], res_s)
    rate = {name: size / t for name, t in best.items()}
    return {
        "benchmark": "aggregate",
        "params": sum(x.size for x in updates[0].values()),
        "tensors": len(shapes),
        "model_bytes": model_bytes,
        "updates": n,
        "repeat": repeat,
        "block": block,
        "chunk": chunk,
        "bytes_per_s": {k: round(v) for k, v in rate.items()},
        "ratio": round(rate["streaming"] / rate["numpy_add"], 3),
        "ratio_float64": round(rate["streaming_float64"] / rate["numpy_add"], 3),
        "result_s": {k: round(v, 4) for k, v in result_s.items()},
        "rel_err_vs_float64": float(
            f"{rel_err(results['streaming'], results['streaming_float64']):.3g}"
        ),
        "peak_models": {
            "streaming": round(peak_models(updates, n, block, chunk, model_bytes), 3),
            "streaming_float64": round(peak_models(updates, n, 1, chunk, model_bytes), 3),
        },
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6, help="parameters per model")
    parser.add_argument("--updates", type=int, default=50, help="updates aggregated per timing")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best is reported")
    parser.add_argument("--distinct", type=int, default=4, help="distinct update models cycled")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    args = parser.parse_args()
    out = run(int(args.params), args.updates, args.repeat, args.distinct, args.block, args.chunk)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
