"""Aggregation layer: weighted FedAvg as a streaming running sum. Pure numpy, no I/O.

:class:`StreamingMean` folds each update into a running weighted sum as it arrives and forgets it,
so a combiner holds O(model) memory whatever the number of clients. A combiner's partial is its
weighted mean plus its total weight; adding that partial to a parent with that weight gives the
parent exactly the sum it would have had from the individual updates (in real arithmetic; to
float tolerance in practice), which is what makes a tree of combiners equal flat FedAvg.

Numerics. The result is ``sum(w_i * x_i) / sum(w_i)`` per tensor, in the model's own dtypes.

* float32 tensors (nearly every model's weights) are weighted and summed in float32 for at most
  ``block`` updates, then folded into a float64 total. Summing in float32 runs at memory speed,
  and capping the float32 run at ``block`` updates bounds the error it adds to about
  ``(block + 1) * 2**-24`` of ``sum(w_i * |x_i|) / sum(w_i)`` (5.4e-7 at the default 8: the
  products' and the block's roundings), however many updates arrive; the float64 total adds
  next to nothing. ``block=1`` weights and sums every update directly in float64, at about
  0.6 times the speed (``benchmarks/aggregate.py``).
* other float tensors (float16, bfloat16, float64) are weighted and summed in float64.
* integer tensors (BatchNorm's ``num_batches_tracked``) are averaged in float64 and rounded to
  the nearest integer (ties to even): the weighted mean of the counts, exact while the values
  stay below 2**53.

Weights enter as ratios to the first update's weight (the mean does not change), so their scale
does not matter. A weighted value (``x * w / w_first``) must be below ``2**100`` (~1.3e30) in
magnitude, far beyond any model, so that no float32 block and no float64 sum can overflow; a
larger one is rejected like NaN and inf.

Memory: the float64 totals (two models' worth for a float32 model) plus the float32 block (one
more), plus a scratch of ``chunk`` elements. :meth:`StreamingMean.result` folds the block into
the totals and frees it before it allocates the result, so that peak stays at three models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fednode.errors import AggregationError, ConfigError

Array = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

DEFAULT_BLOCK = 8
DEFAULT_CHUNK = 1 << 17  # elements: 512 KiB of float32 scratch, which stays in L2 with its chunks

_FLOAT32 = np.dtype(np.float32)
_LIMIT = 2.0**100  # largest weighted value accepted (see the module docstring)


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    """What every update must agree on for one tensor, fixed by the first update."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    size: int
    staged: bool  #: float32 summed in float32 blocks (else weighted straight into float64)
    floating: bool  #: can hold NaN or inf (so is checked for them)


def _native(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def _is_float(dtype: np.dtype[Any]) -> bool:
    # bfloat16 (ml_dtypes) is kind "V"; it is the only such dtype the wire carries.
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name == "bfloat16")


def check_weight(weight: float) -> float:
    """``weight`` if it is a finite number above zero, else :class:`AggregationError`."""
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        raise AggregationError(f"weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight <= 0:
        raise AggregationError(f"weight must be finite and above zero, got {weight!r}")
    return int(weight) if isinstance(weight, int | np.integer) else float(weight)


def _flat(params: Mapping[str, Array], spec: _Tensor) -> Array:
    """The update's tensor ``spec.name`` as a flat array (a view when it is C-contiguous)."""
    return np.asarray(params[spec.name]).reshape(-1)


def _acceptable(part: Array) -> bool:
    """Whether weighted values are all finite and below ``_LIMIT`` in magnitude."""
    # Two single-threaded SIMD reductions over a chunk in cache; NaN propagates through both
    # and fails the comparisons. (A BLAS dot product would be one pass, but it starts threads
    # that compete with the node's own work.)
    return -_LIMIT < float(np.minimum.reduce(part)) and float(np.maximum.reduce(part)) < _LIMIT


def _reason(values: Array) -> str:
    """Why a chunk of an update's values, whose weighted values were not acceptable, is not."""
    if not np.isfinite(values).all():
        return "NaN or infinite value"
    return "value too large to average (above 2**100 times the first update's weight)"


class StreamingMean:
    """A weighted mean of model updates, folded in one at a time.

    ``add`` each update with its weight (its number of examples); ``result`` is the weighted
    mean. Every update must have the tensor names, shapes and dtypes of the first; an update with
    a NaN, an infinite or a far too large value, or a weight that is not above zero, is rejected
    with an :class:`AggregationError` that names the tensor. A rejected update leaves the sum as
    it was: values are checked a chunk at a time before they are added, and the chunks already
    added are subtracted back out (exact, or within one rounding of the float32 block). An update
    whose ``key`` (its signer) was already counted is ignored, so a duplicate counts once.

    Not thread-safe: one owner adds, then takes the result.

    A combiner's partial goes into its parent as ``add(partial.result(), partial.total_weight,
    key=combiner)``.

    Args:
        block: float32 tensors are summed in float32 for at most this many updates (1 to
            2**20) before they are folded into float64 (see the module docstring); 1 sums
            directly in float64.
        chunk: elements processed at a time: the scratch memory, sized to stay in cache.
    """

    def __init__(self, *, block: int = DEFAULT_BLOCK, chunk: int = DEFAULT_CHUNK) -> None:
        # A block of up to 2**20 values below 2**100 cannot overflow float32 (max ~2**128).
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1 << 20:
            raise ConfigError(f"block must be an integer from 1 to 2**20, got {block!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
        self._block = block
        self._chunk = chunk
        self._tensors: tuple[_Tensor, ...] = ()
        self._sums: dict[str, F64] = {}  # flat float64 running sums of w * x
        self._stage: dict[str, F32] | None = None  # flat float32 sums of the current block
        self._staged = 0  # updates in the current block
        self._total: float = 0
        self._unit: float = 1  # the first counted weight: weights enter as ratios to it
        self._count = 0
        self._keys: set[bytes] = set()
        # Scratch for one chunk, sized at the first update (no bigger than its largest tensor).
        self._scratch64: F64 = np.empty(0, np.float64)
        self._scratch32: F32 = np.empty(0, np.float32)

    @property
    def count(self) -> int:
        """Updates counted so far (duplicates and rejected updates excluded)."""
        return self._count

    @property
    def total_weight(self) -> float:
        """The sum of the counted updates' weights (an ``int`` while every weight is one)."""
        return self._total

    def keys(self) -> frozenset[bytes]:
        """The keys (signers) of the counted updates."""
        return frozenset(self._keys)

    def add(self, params: Mapping[str, Array], weight: float, key: bytes | None = None) -> bool:
        """Fold ``params`` into the sum with ``weight``.

        Returns:
            True if the update was counted, False if ``key`` had been counted before.

        Raises:
            AggregationError: the weight is not above zero, a tensor is missing, extra, or of
                another shape or dtype than in the first update, or holds NaN, inf or a value
                too large (see the module docstring). The sum is left as it was and ``key`` is
                not recorded.
        """
        if key is not None and key in self._keys:
            return False
        w = check_weight(weight)
        first = not self._tensors
        tensors = self._describe(params) if first else self._tensors
        if not first:
            self._check_matches(params)
        if first:
            self._sums = {t.name: np.zeros(t.size, np.float64) for t in tensors}
            size = min(self._chunk, max(t.size for t in tensors))
            self._scratch64 = np.empty(size, np.float64)
            self._scratch32 = np.empty(size if any(t.staged for t in tensors) else 0, np.float32)
        if self._stage is None and any(t.staged for t in tensors):
            self._stage = {t.name: np.empty(t.size, np.float32) for t in tensors if t.staged}
            self._staged = 0
        try:
            self._accumulate(tensors, params, 1.0 if first else w / self._unit)
        except AggregationError:
            if first:
                self._sums, self._stage = {}, None
            raise
        if first:
            self._tensors, self._unit = tensors, w
        self._staged = 1 if self._staged in (0, self._block) else self._staged + 1
        self._total += w
        self._count += 1
        if key is not None:
            self._keys.add(key)
        return True

    def result(self) -> dict[str, Array]:
        """The weighted mean so far: a new model, in the first update's tensor order and dtypes.

        Raises:
            AggregationError: nothing has been added.
        """
        if not self._count:
            raise AggregationError("no updates to aggregate")
        self._fold_stage()
        out: dict[str, Array] = {}
        scratch, divisor = self._scratch64, self._total / self._unit
        for t in self._tensors:
            mean = np.empty(t.shape, t.dtype)
            flat, total = mean.reshape(-1), self._sums[t.name]
            for lo, hi in self._chunks(t.size):
                part = scratch[: hi - lo]
                np.divide(total[lo:hi], divisor, out=part)
                if not t.floating:
                    np.rint(part, out=part)
                np.copyto(flat[lo:hi], part, casting="unsafe")
            out[t.name] = mean
        return out

    # -- internals ------------------------------------------------------------------------------

    def _chunks(self, size: int) -> Iterator[tuple[int, int]]:
        step = self._chunk
        for lo in range(0, size, step):
            yield lo, min(lo + step, size)

    def _describe(self, params: Mapping[str, Array]) -> tuple[_Tensor, ...]:
        if not params:
            raise AggregationError("an update needs at least one tensor")
        tensors = []
        for name, value in params.items():
            array = np.asarray(value)
            dtype = _native(array.dtype)
            floating = _is_float(dtype)
            if not floating and dtype.kind not in "iu":
                raise AggregationError(f"{name}: cannot average dtype {dtype}")
            staged = dtype == _FLOAT32 and self._block > 1
            tensors.append(_Tensor(name, array.shape, dtype, array.size, staged, floating))
        return tuple(tensors)

    def _check_matches(self, params: Mapping[str, Array]) -> None:
        expected = {t.name for t in self._tensors}
        for name in params:
            if name not in expected:
                raise AggregationError(f"{name}: not in the first update")
        for t in self._tensors:
            if t.name not in params:
                raise AggregationError(f"{t.name}: missing from the update")
            array = np.asarray(params[t.name])
            if array.shape != t.shape:
                raise AggregationError(f"{t.name}: shape {array.shape}, expected {t.shape}")
            if _native(array.dtype) != t.dtype:
                raise AggregationError(f"{t.name}: dtype {array.dtype}, expected {t.dtype}")

    def _fold_stage(self) -> None:
        """Add the float32 block into the float64 sums and free it."""
        if self._stage is not None and self._staged:
            for name, stage in self._stage.items():
                total = self._sums[name]
                for lo, hi in self._chunks(stage.size):
                    np.add(total[lo:hi], stage[lo:hi], out=total[lo:hi])
        self._stage, self._staged = None, 0

    def _accumulate(
        self, tensors: tuple[_Tensor, ...], params: Mapping[str, Array], r: float
    ) -> None:
        """Add ``r * params`` to the sums; if a weighted value is not acceptable, take the whole
        update back out and raise."""
        # A fresh block is written straight into the stage; a full one is folded into the
        # float64 sums, chunk by chunk, as the first update of the next block overwrites it.
        mode = "write" if self._staged == 0 else "fold" if self._staged == self._block else "add"
        r32 = np.float32(r)
        step = self._chunk
        done: list[tuple[_Tensor, Array, int]] = []  # (tensor, flat values, elements to undo)
        with np.errstate(all="ignore"):  # overflow shows up as inf, which is what is checked
            for t in tensors:
                flat = _flat(params, t)
                total = self._sums[t.name]
                if not t.staged:
                    bad = _direct_add(total, flat, r, self._scratch64, step, t.floating)
                else:
                    assert self._stage is not None
                    stage = self._stage[t.name]
                    if mode == "add":
                        bad = _staged_add(stage, flat, r32, self._scratch32, step)
                    elif mode == "fold":
                        bad = _staged_fold(total, stage, flat, r32, step)
                    else:
                        bad = _staged_write(stage, flat, r32, step)
                if bad is not None:
                    # A failing chunk was checked before it was added, except when folding:
                    # then it was folded and overwritten, and must be cleared too.
                    undo = min(bad + step, t.size) if t.staged and mode == "fold" else bad
                    done.append((t, flat, undo))
                    self._undo(done, r, r32, mode)
                    raise AggregationError(f"{t.name}: {_reason(flat[bad : bad + step])}")
                done.append((t, flat, t.size))

    def _undo(
        self, done: list[tuple[_Tensor, Array, int]], r: float, r32: np.float32, mode: str
    ) -> None:
        """Take a rejected update's first ``n`` elements of each tensor back out of the sums."""
        for t, flat, n in done:
            if not t.staged:
                total = self._sums[t.name][:n]
                np.subtract(total, np.multiply(flat[:n], r, dtype=np.float64), out=total)
                continue
            assert self._stage is not None
            stage = self._stage[t.name][:n]
            if mode == "add":
                np.subtract(stage, np.multiply(flat[:n], r32), out=stage)
            elif mode == "fold":
                stage.fill(0)  # those chunks were folded into the sums already: exact
            # "write": the block is empty (its contents are not read until written again)


# The hot loops: each weights one flat tensor chunk by chunk (the chunk of scratch stays in
# cache), checks the weighted chunk before it adds it, and returns None or the failing chunk's
# offset.


def _direct_add(
    total: F64, flat: Array, r: float, scratch: F64, step: int, check: bool
) -> int | None:
    """``total += r * flat`` in float64."""
    n = flat.size
    for lo in range(0, n, step):
        hi = lo + step
        part = scratch if hi <= n else scratch[: n - lo]
        np.multiply(flat[lo:hi], r, out=part, dtype=np.float64)
        if check and not _acceptable(part):
            return lo
        chunk = total[lo:hi]
        np.add(chunk, part, out=chunk)
    return None


def _staged_add(stage: F32, flat: Array, r32: np.float32, scratch: F32, step: int) -> int | None:
    """``stage += r32 * flat`` in float32."""
    n = flat.size
    for lo in range(0, n, step):
        hi = lo + step
        part = scratch if hi <= n else scratch[: n - lo]
        np.multiply(flat[lo:hi], r32, out=part)
        if not _acceptable(part):
            return lo
        chunk = stage[lo:hi]
        np.add(chunk, part, out=chunk)
    return None


def _staged_fold(total: F64, stage: F32, flat: Array, r32: np.float32, step: int) -> int | None:
    """``total += stage; stage = r32 * flat``."""
    n = flat.size
    for lo in range(0, n, step):
        hi = lo + step
        chunk, block = total[lo:hi], stage[lo:hi]
        np.add(chunk, block, out=chunk)
        np.multiply(flat[lo:hi], r32, out=block)
        if not _acceptable(block):
            return lo
    return None


def _staged_write(stage: F32, flat: Array, r32: np.float32, step: int) -> int | None:
    """``stage = r32 * flat``."""
    n = flat.size
    for lo in range(0, n, step):
        block = stage[lo : lo + step]
        np.multiply(flat[lo : lo + step], r32, out=block)
        if not _acceptable(block):
            return lo
    return None


def weighted_mean(updates: Iterable[tuple[Mapping[str, Array], float]]) -> dict[str, Array]:
    """FedAvg of ``(params, weight)`` pairs, streamed through a :class:`StreamingMean`."""
    mean = StreamingMean()
    for params, weight in updates:
        mean.add(params, weight)
    return mean.result()
