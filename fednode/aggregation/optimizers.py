"""Aggregation layer: server optimisers, applied by the reducer to each round's aggregated model.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2. With ``g`` the global
model the round started from and ``a`` the aggregated (FedAvg) model, per float tensor::

    delta = a - g                                        the pseudo-gradient
    FedAvg      new = g + lr * delta                     lr = 1 (default): new = a, exactly
    FedAvgM     m = momentum * m + delta                 new = g + lr * m
    FedAdagrad  m = beta1 * m + (1 - beta1) * delta
                v = v + delta**2                         new = g + lr * m / (sqrt(v) + tau)
    FedAdam     m, new as FedAdagrad;  v = beta2 * v + (1 - beta2) * delta**2
    FedYogi     m, new as FedAdagrad;  v = v - (1 - beta2) * delta**2 * sign(v - delta**2)

``m`` starts at 0 and ``v`` at ``tau**2`` (the paper asks ``v >= tau**2``); as in the paper there is
no bias correction. Defaults: FedAvgM ``lr=1, momentum=0.9``; FedAdam and FedYogi ``lr=0.01,
beta1=0.9, beta2=0.99, tau=1e-3``; FedAdagrad ``lr=0.1, beta1=0, tau=1e-3`` (Algorithm 2 gives it
momentum too; ``beta1=0`` is plain Adagrad). Tune ``lr`` and ``tau`` per task.

Arithmetic is float64; ``new`` is cast back to each tensor's dtype, and the state (``m``, ``v``)
is kept in float32 (float64 for float64 tensors). Integer tensors (BatchNorm's
``num_batches_tracked``) are not optimised: they take the aggregated value.

An optimiser lives as long as the session. :meth:`ServerOptimizer.state` is a model-like map
(``"t"``: steps taken, ``"m/<tensor>"``, ``"v/<tensor>"``) that a successor reducer passes to
:meth:`ServerOptimizer.load_state` (or ``make_optimizer(..., state=...)``) to continue exactly.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fednode.errors import AggregationError, ConfigError

Array = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]
Params = Mapping[str, Array]


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name == "bfloat16")


def _state_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _hyper(
    name: str, value: object, lo: float, hi: float, *, lo_open: bool, hi_open: bool
) -> float:
    """``value`` as a float if it lies in the interval, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    x = float(value)
    above = x > lo if lo_open else x >= lo
    below = x < hi if hi_open else x <= hi
    if not (math.isfinite(x) and above and below):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {value!r}")
    return x


def _positive(name: str, value: object) -> float:
    return _hyper(name, value, 0.0, math.inf, lo_open=True, hi_open=True)


def _fraction(name: str, value: object) -> float:
    return _hyper(name, value, 0.0, 1.0, lo_open=False, hi_open=True)


class ServerOptimizer(abc.ABC):
    """Turns the global model and the round's aggregate into the next global model.

    ``step`` does not modify its inputs (they may be read-only) and returns new arrays; it
    updates the optimiser's own state only once the whole step has succeeded.
    """

    NAME: ClassVar[str]
    SLOTS: ClassVar[tuple[str, ...]] = ()  #: per-tensor state arrays, by name

    def __init__(self) -> None:
        self._t = 0
        self._slots: dict[str, dict[str, Array]] = {slot: {} for slot in self.SLOTS}

    @property
    def steps(self) -> int:
        """Steps taken (resumed from the state loaded, if any)."""
        return self._t

    @abc.abstractmethod
    def hyperparameters(self) -> dict[str, float]:
        """The keyword arguments that rebuild this optimiser with :func:`make_optimizer`."""

    @abc.abstractmethod
    def _update(self, delta: F64, slots: dict[str, F64 | None]) -> tuple[F64, dict[str, F64]]:
        """(step to add to the global tensor, new slot values) for one float tensor."""

    def step(self, global_params: Params, aggregated: Params) -> dict[str, Array]:
        """The next global model, in ``global_params``' tensor order.

        Raises:
            AggregationError: the two models (or the state) disagree on a tensor's name, shape or
                dtype, or the aggregate holds NaN or inf. The state is left unchanged.
        """
        _check_same(global_params, aggregated)
        new: dict[str, Array] = {}
        slots: dict[str, dict[str, Array]] = {slot: {} for slot in self.SLOTS}
        for name, g_in in global_params.items():
            g, a = np.asarray(g_in), np.asarray(aggregated[name])
            if not _is_float(g.dtype):
                new[name] = a.copy()
                continue
            delta = a.astype(np.float64) - g.astype(np.float64)
            if not np.isfinite(delta).all():
                raise AggregationError(f"{name}: NaN or infinite value")
            previous = {slot: self._previous(slot, name, g.shape) for slot in self.SLOTS}
            change, updated = self._update(delta, previous)
            new[name] = self._apply(g, a, change)
            kept = _state_dtype(g.dtype)
            for slot, value in updated.items():
                slots[slot][name] = value.astype(kept)
        if self._t and any(set(self._slots[s]) != set(slots[s]) for s in self.SLOTS):
            raise AggregationError(f"model tensors differ from the state's: {sorted(new)}")
        self._slots = slots
        self._t += 1
        return new

    def _apply(self, g: Array, a: Array, change: F64) -> Array:
        return np.add(g.astype(np.float64), change).astype(g.dtype)

    def _previous(self, slot: str, name: str, shape: tuple[int, ...]) -> F64 | None:
        value = self._slots[slot].get(name)
        if value is None:
            if self._t:
                raise AggregationError(f"{name}: not in the optimiser state")
            return None
        if value.shape != shape:
            raise AggregationError(f"{name}: shape {shape}, the optimiser state has {value.shape}")
        return value.astype(np.float64)

    def state(self) -> dict[str, Array]:
        """The state a successor needs to continue exactly: ``t`` and the per-tensor slots."""
        out: dict[str, Array] = {"t": np.array(self._t, dtype=np.int64)}
        for slot in self.SLOTS:
            for name, value in self._slots[slot].items():
                out[f"{slot}/{name}"] = value.copy()
        return out

    def load_state(self, state: Params) -> None:
        """Continue from ``state`` (from :meth:`state`, perhaps decoded off the wire).

        Raises:
            AggregationError: the state is not one this optimiser wrote.
        """
        if "t" not in state:
            raise AggregationError("optimiser state: no step count 't'")
        t = np.asarray(state["t"])
        if t.shape != () or t.dtype.kind not in "iu" or int(t) < 0:
            raise AggregationError("optimiser state: 't' must be a non-negative integer scalar")
        slots: dict[str, dict[str, Array]] = {slot: {} for slot in self.SLOTS}
        for key, value in state.items():
            if key == "t":
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in slots or not name:
                raise AggregationError(f"optimiser state: unexpected entry {key!r}")
            array = np.asarray(value)
            if not _is_float(array.dtype) or not np.isfinite(array).all():
                raise AggregationError(f"optimiser state: {key} must hold finite floats")
            slots[slot][name] = np.array(array, dtype=_state_dtype(array.dtype))
        names = [set(tensors) for tensors in slots.values()]
        if any(n != names[0] for n in names) or (names and names[0] and int(t) == 0):
            raise AggregationError("optimiser state: slots and step count do not match")
        self._t, self._slots = int(t), slots


def _check_same(global_params: Params, aggregated: Params) -> None:
    for name in aggregated:
        if name not in global_params:
            raise AggregationError(f"{name}: not in the global model")
    for name, g_in in global_params.items():
        if name not in aggregated:
            raise AggregationError(f"{name}: missing from the aggregate")
        g, a = np.asarray(g_in), np.asarray(aggregated[name])
        if g.shape != a.shape:
            raise AggregationError(f"{name}: shape {a.shape}, the global model has {g.shape}")
        if g.dtype != a.dtype:
            raise AggregationError(f"{name}: dtype {a.dtype}, the global model has {g.dtype}")


class FedAvg(ServerOptimizer):
    """``new = g + lr * (a - g)``; at ``lr=1`` (the default) the aggregate itself."""

    NAME = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = _positive("lr", lr)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def _update(self, delta: F64, slots: dict[str, F64 | None]) -> tuple[F64, dict[str, F64]]:
        return self.lr * delta, {}

    def _apply(self, g: Array, a: Array, change: F64) -> Array:
        return a.copy() if self.lr == 1.0 else super()._apply(g, a, change)


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = momentum * m + delta``, ``new = g + lr * m``."""

    NAME = "fedavgm"
    SLOTS = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = _positive("lr", lr)
        self.momentum = _fraction("momentum", momentum)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def _update(self, delta: F64, slots: dict[str, F64 | None]) -> tuple[F64, dict[str, F64]]:
        m = slots["m"]
        m = delta if m is None else self.momentum * m + delta
        return self.lr * m, {"m": m}


class _Adaptive(ServerOptimizer):
    """Algorithm 2's shared part: first moment ``m``, second moment ``v``, the scaled step."""

    SLOTS = ("m", "v")

    def __init__(self, lr: float, beta1: float, tau: float) -> None:
        super().__init__()
        self.lr = _positive("lr", lr)
        self.beta1 = _fraction("beta1", beta1)
        self.tau = _positive("tau", tau)

    @abc.abstractmethod
    def _second_moment(self, v: F64, delta2: F64) -> F64:
        """The new ``v`` from the previous ``v`` and ``delta**2``."""

    def _update(self, delta: F64, slots: dict[str, F64 | None]) -> tuple[F64, dict[str, F64]]:
        m, v = slots["m"], slots["v"]
        if m is None:
            m = np.zeros_like(delta)
        if v is None:
            v = np.full_like(delta, self.tau**2)
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self._second_moment(v, delta * delta)
        return self.lr * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}


class FedAdagrad(_Adaptive):
    """``v = v + delta**2``."""

    NAME = "fedadagrad"

    def __init__(self, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1, tau)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "tau": self.tau}

    def _second_moment(self, v: F64, delta2: F64) -> F64:
        return v + delta2


class FedAdam(_Adaptive):
    """``v = beta2 * v + (1 - beta2) * delta**2``."""

    NAME = "fedadam"

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, tau)
        self.beta2 = _fraction("beta2", beta2)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _second_moment(self, v: F64, delta2: F64) -> F64:
        return self.beta2 * v + (1.0 - self.beta2) * delta2


class FedYogi(FedAdam):
    """``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``."""

    NAME = "fedyogi"

    def _second_moment(self, v: F64, delta2: F64) -> F64:
        return v - (1.0 - self.beta2) * delta2 * np.sign(v - delta2)


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.NAME: cls for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi)
}


def make_optimizer(name: str, *, state: Params | None = None, **hyper: Any) -> ServerOptimizer:
    """The server optimiser ``name`` (``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi``,
    ``fedadagrad``) with hyper-parameters ``hyper``, resumed from ``state`` if given.

    Raises:
        ConfigError: an unknown name, an unknown hyper-parameter or a value out of range.
        AggregationError: ``state`` is not one this optimiser wrote.
    """
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown server optimiser {name!r} (known: {', '.join(OPTIMIZERS)})")
    try:
        optimizer = cls(**hyper)
    except TypeError as exc:
        raise ConfigError(f"{name}: bad hyper-parameters {sorted(hyper)}: {exc}") from exc
    if state is not None:
        optimizer.load_state(state)
    return optimizer
