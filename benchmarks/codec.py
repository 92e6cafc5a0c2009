"""Benchmark: the model codec, content digests and signatures against a plain memory copy.

Builds a ResNet-50-shaped model (conv weights; batch-norm weight, bias, running mean and variance
and a 0-d int64 ``num_batches_tracked`` per norm; the fc layer) of float32 tensors from a seeded
RNG, its width scaled (channels rounded to multiples of 8) to about ``--size-mb`` megabytes; at
100 MB that is 25.0M parameters, a ResNet-50 within rounding. Then it times, best of ``--repeat``,
in one process:

* ``encode`` / ``decode`` of the :class:`~fednode.wire.ModelBlob` (the decode checked equal);
* the decode's parts: the structural scan (``check_frame``), ``cbor2.loads`` and the model check;
* ``digest`` (BLAKE3, what fednode uses), BLAKE2b-256 and SHA-256 for comparison;
* ``seal`` / ``verify_envelope`` of the blob's signed :class:`~fednode.wire.ModelUpdate` (small,
  ops/s), and a raw Ed25519 signature made and checked over the whole blob, for reference;
* ``memcpy``: a copy of the blob into fresh memory (``bytearray(blob)``, which like ``encode``
  pays for allocating and first touching its output) and into memory already touched
  (``np.copyto``). Ratios are to the first.

It also reports the most memory encode and decode allocate at once, in blob sizes (1.0: the tensor
bytes are copied once, into the result).

Prints one JSON object. ``python benchmarks/codec.py [--size-mb 100] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import blake3
import cbor2
import numpy as np

from fednode.crypto import NodeKey, digest, seal, verify, verify_envelope
from fednode.wire import (
    BLOB_LIMITS,
    Digest,
    FederationId,
    ModelBlob,
    ModelUpdate,
    Nonce,
    SessionId,
    check_frame,
    decode,
    decode_model,
    encode,
)

MB = 1_000_000
RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks)
NUM_CLASSES = 1000


def _layers(width: float) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, kind, shape) of a ResNet-50's state dict with channel counts scaled by ``width``."""

    def ch(c: int) -> int:
        return max(8, round(c * width / 8) * 8)

    def conv(
        name: str, c_out: int, c_in: int, k: int
    ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        yield f"{name}.weight", "conv", (c_out, c_in, k, k)

    def norm(name: str, c: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        for part in ("weight", "bias", "running_mean", "running_var"):
            yield f"{name}.{part}", part, (c,)
        yield f"{name}.num_batches_tracked", "count", ()

    stem = ch(64)
    yield from conv("conv1", stem, 3, 7)
    yield from norm("bn1", stem)
    c_in = stem
    for stage, (base, blocks) in enumerate(RESNET50_STAGES, start=1):
        mid, out = ch(base), ch(base * 4)
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            yield from conv(f"{prefix}.conv1", mid, c_in, 1)
            yield from norm(f"{prefix}.bn1", mid)
            yield from conv(f"{prefix}.conv2", mid, mid, 3)
            yield from norm(f"{prefix}.bn2", mid)
            yield from conv(f"{prefix}.conv3", out, mid, 1)
            yield from norm(f"{prefix}.bn3", out)
            if block == 0:
                yield from conv(f"{prefix}.downsample.0", out, c_in, 1)
                yield from norm(f"{prefix}.downsample.1", out)
            c_in = out
    yield "fc.weight", "fc", (NUM_CLASSES, c_in)
    yield "fc.bias", "bias", (NUM_CLASSES,)


def _nbytes(width: float) -> int:
    return sum(4 * math.prod(shape) for _, kind, shape in _layers(width) if kind != "count")


def build_model(size_mb: float, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """A seeded ResNet-50-like model of about ``size_mb`` megabytes."""
    lo, hi = 0.01, 64.0
    for _ in range(60):  # parameters grow with width squared: bisect for the size asked
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _nbytes(mid) < size_mb * MB else (lo, mid)
    width = hi
    rng = np.random.default_rng(seed)
    model: dict[str, np.ndarray[Any, Any]] = {}
    for name, kind, shape in _layers(width):
        if kind in ("conv", "fc"):
            fan_in = math.prod(shape[1:])
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2 / fan_in))
        elif kind == "weight":
            array = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif kind == "running_var":
            array = rng.uniform(0.1, 2.0, shape).astype(np.float32)
        elif kind == "count":
            array = np.array(rng.integers(0, 1 << 20), dtype=np.int64)
        else:  # bias, running_mean
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        model[name] = array
    return model


def best_times(repeat: int, ops: dict[str, tuple[int, Callable[[], Any]]]) -> dict[str, float]:
    """The fastest time of each op's call, in seconds, from ``repeat`` rounds.

    ``ops`` maps a name to (calls per sample, fn). Each round times every op once, so the samples
    of one op are spread over the whole run and a burst of load from other processes cannot spoil
    all of them. Garbage is collected before each sample.
    """
    best = dict.fromkeys(ops, math.inf)
    for _ in range(repeat):
        for name, (calls, fn) in ops.items():
            gc.collect()
            start = time.perf_counter()
            results = [fn() for _ in range(calls)]
            elapsed = time.perf_counter() - start
            del results
            best[name] = min(best[name], elapsed / calls)
    return best


def calls_for(fn: Callable[[], Any], budget: float = 0.05) -> int:
    """How many calls of a fast ``fn`` take about ``budget`` seconds."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        fn()
        n += 1
    return n


def peak_allocation(fn: Callable[[], Any]) -> int:
    """The most memory ``fn`` held allocated at once, in bytes (what it returns included)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak


def check_decoded(original: dict[str, np.ndarray[Any, Any]], decoded: dict[str, Any]) -> None:
    """Raise AssertionError unless ``decoded`` is ``original``, tensor for tensor, bit for bit."""
    assert list(decoded) == list(original), "tensor names or order differ"
    for name, want in original.items():
        got = decoded[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), f"{name}: data differs"
        # One copy only: the array wraps the byte string cbor2 produced.
        assert isinstance(got.base, (bytes, np.ndarray)) and not got.flags.writeable, name


def run(size_mb: float, repeat: int) -> dict[str, Any]:
    model = build_model(size_mb)
    msg = ModelBlob(tensors=model)  # type: ignore[arg-type]
    blob = encode(msg)
    size = len(blob)
    check_decoded(model, decode(blob, ModelBlob, BLOB_LIMITS).tensors)

    key = NodeKey(bytes(range(32)))
    signature = key.sign(blob)
    update = ModelUpdate(
        federation=FederationId("bench"),
        session=SessionId("s1"),
        round=1,
        parent=Digest(bytes(32)),
        update=digest(blob),
        size=size,
        num_examples=50_000,
        metrics={"accuracy": 0.75, "loss": 0.9},
        signer=key.public_key,
        created_ms=1_700_000_000_000,
        nonce=Nonce(bytes(16)),
    )
    envelope = seal(key, update)
    verify_envelope(envelope, "fednode/model-update/v1")
    target = np.empty(size, dtype=np.uint8)
    source = np.frombuffer(blob, dtype=np.uint8)
    tensors = cbor2.loads(blob)["tensors"]

    big: dict[str, Callable[[], Any]] = {
        "memcpy": lambda: bytearray(blob),
        "memcpy_warm": lambda: np.copyto(target, source),
        "encode": lambda: encode(msg),
        "decode": lambda: decode(blob, ModelBlob, BLOB_LIMITS),
        "decode.scan": lambda: check_frame(blob, BLOB_LIMITS),
        "decode.cbor2": lambda: cbor2.loads(blob),
        "decode.model": lambda: decode_model(tensors),
        "digest": lambda: digest(blob),
        "blake3_2threads": lambda: blake3.blake3(blob, max_threads=2).digest(),
        "blake2b_256": lambda: hashlib.blake2b(blob, digest_size=32).digest(),
        "sha256": lambda: hashlib.sha256(blob).digest(),
        "ed25519_sign_blob": lambda: key.sign(blob),
        "ed25519_verify_blob": lambda: verify(key.public_key, blob, signature),
    }
    small: dict[str, Callable[[], Any]] = {
        "seal_update": lambda: seal(key, update),
        "verify_update": lambda: verify_envelope(envelope),
    }
    ops = {name: (1, fn) for name, fn in big.items()}
    ops.update({name: (calls_for(fn), fn) for name, fn in small.items()})
    seconds = best_times(repeat, ops)

    # Allocated at peak, in blob sizes: 1.0 means the tensor bytes were copied once, into the result
    peaks = {
        "encode": peak_allocation(lambda: encode(msg)) / size,
        "decode": peak_allocation(lambda: decode(blob, ModelBlob, BLOB_LIMITS)) / size,
    }

    copy = size / seconds["memcpy"]
    results: dict[str, Any] = {
        name: {
            "mb_s": round(size / s / MB, 1),
            "ratio_to_memcpy": round(size / s / copy, 3),
            "ms": round(s * 1000, 2),
        }
        for name, s in seconds.items()
        if name in big
    }
    for name in small:
        results[name] = {"ops_s": round(1 / seconds[name]), "us": round(seconds[name] * 1e6, 1)}
    return {
        "benchmark": "fednode codec",
        "bytes": size,
        "tensors": len(model),
        "params": sum(a.size for a in model.values()),
        "envelope_bytes": len(encode(envelope)),
        "repeat": repeat,
        "decode_check": "ok",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "results": results,
        "peak_alloc_in_blobs": {name: round(peak, 3) for name, peak in peaks.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100, help="model size (default 100)")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many (default 5)")
    args = parser.parse_args(argv)
    json.dump(run(args.size_mb, args.repeat), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
