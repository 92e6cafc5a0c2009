"""Node layer: a training session's settings, from a TOML file and the reducer's flags (flags win).

```toml
[session]
id = "digits-1"              # optional: default, a fresh "s-<time>-<random>"
rounds = 5
min_clients = 2
round_deadline = 60.0        # seconds (or round_deadline_ms)
epochs = 5
batch_size = 32
lr = 0.5
server_optimizer = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi | fedadagrad
eval_every = 1
seed = 0
task = "fednode.task.digits"
partition = "iid"            # iid | dirichlet
alpha = 0.5
proximal_mu = 0.0
```

Every :class:`~fednode.wire.SessionConfig` field may appear. ``server_lr`` defaults to the chosen
optimiser's own default learning rate (1 for FedAvg and FedAvgM, 0.01 for FedAdam and FedYogi,
0.1 for FedAdagrad). The reducer carries the result in every plan, so clients and combiners need
none of this.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from fednode.aggregation import OPTIMIZERS, ServerOptimizer, make_optimizer
from fednode.errors import ConfigError
from fednode.task import DEFAULT_TASK
from fednode.wire import SessionConfig

#: The settings a session runs with unless told otherwise: the built-in digits task's demo
#: settings (``fednode.task.digits.DEFAULT_CONFIG``), FedAvg, evaluated every round.
DEFAULTS: dict[str, Any] = {
    "rounds": 5,
    "min_clients": 2,
    "max_retries": 2,
    "round_deadline_ms": 60_000,
    "epochs": 5,
    "batch_size": 32,
    "lr": 0.5,
    "aggregator": "fedavg",
    "server_optimizer": "fedavg",
    "server_momentum": 0.9,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-3,
    "eval_every": 1,
    "seed": 0,
    "task": DEFAULT_TASK,
    "partition": "iid",
    "alpha": 0.5,
    "proximal_mu": 0.0,
}
_FIELDS = {f.name for f in dataclasses.fields(SessionConfig)}
_HINTS = typing.get_type_hints(SessionConfig)


def new_session_id() -> str:
    """A fresh session ID: ``s-<UTC time>-<4 random hex digits>``."""
    return f"s-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def load_session(path: Path | None, **overrides: Any) -> tuple[str, SessionConfig]:
    """The session ID and settings from ``path``'s ``[session]`` table (if any), with the
    non-None ``overrides`` on top. ``round_deadline`` (seconds) stands for ``round_deadline_ms``;
    ``id`` names the session.

    Raises:
        ConfigError: an unreadable file, an unknown key or a value out of range.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"session file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read session file {path}: {exc}") from None
        table = document.get("session", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [session] must be a table")
        values.update(table)
    values.update({k: v for k, v in overrides.items() if v is not None})
    session = values.pop("id", None)
    if session is not None and (not isinstance(session, str) or not 0 < len(session) <= 128):
        raise ConfigError("the session id must be 1 to 128 characters")
    if "round_deadline" in values:
        seconds = values.pop("round_deadline")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ConfigError(f"round_deadline must be a positive number of seconds: {seconds!r}")
        values["round_deadline_ms"] = max(1, round(seconds * 1000))
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown session setting(s): {', '.join(unknown)}")
    merged = {**DEFAULTS, **values}
    for name, value in merged.items():
        _check_type(name, value)
    if "server_lr" not in merged:
        merged["server_lr"] = OPTIMIZERS[merged["server_optimizer"]]().hyperparameters()["lr"]
    try:
        config = SessionConfig(**merged)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad session setting: {exc}") from None
    return session or new_session_id(), config


def _check_type(name: str, value: Any) -> None:
    hint = _HINTS[name]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    elif hint is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, not {value!r}")


def server_optimizer(config: SessionConfig) -> ServerOptimizer:
    """A fresh server optimiser for ``config`` (its state then lives as long as the session)."""
    name, lr = config.server_optimizer, config.server_lr
    if name == "fedavg":
        return make_optimizer(name, lr=lr)
    if name == "fedavgm":
        return make_optimizer(name, lr=lr, momentum=config.server_momentum)
    if name == "fedadagrad":
        return make_optimizer(name, lr=lr, beta1=config.beta1, tau=config.tau)
    return make_optimizer(name, lr=lr, beta1=config.beta1, beta2=config.beta2, tau=config.tau)


__all__ = ["DEFAULTS", "load_session", "new_session_id", "server_optimizer"]
