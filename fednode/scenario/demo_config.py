"""Scenario layer: what ``fednode demo`` runs (:class:`DemoConfig`: the federation, its session,
its kills, the nodes' command lines) and what it measured (:class:`DemoResult`, the ``--json``
document). Plain data: :mod:`fednode.scenario.federation` starts the processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fednode.errors import ConfigError
from fednode.protocol.election import DEFAULT_POLICY
from fednode.scenario.kills import AUTO_PREFIX, KillSpec, check_kills, data_losses
from fednode.scenario.launcher import fork_supported, forkable
from fednode.scenario.processes import FEDNODE_START
from fednode.scenario.progress import Role, RoundRow

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
DEFAULT_TASK = "fednode.task.digits"
Launcher = Literal["fork", "exec"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """A local federation and the session it runs.

    ``lr`` None leaves the learning rate to the reducer (the task's default). ``program`` is the
    node program (``fednode start``; tests put a stand-in there). ``timeout`` bounds the whole
    run from the first process started to the session's end; ``exit_grace`` how long the reducer
    has to exit by itself once it completed the session; ``stop_grace`` how long a node has to
    exit after SIGINT before it is killed. ``launcher``: see :mod:`fednode.scenario.federation`
    (``"fork"`` falls back to ``"exec"`` where the zygote cannot run: off Linux, or a program
    that is not this Python interpreter running a module, a script or ``-c`` code).

    ``auto``: the data nodes are ``auto`` nodes (auto mode: :mod:`fednode.scenario.federation`
    and :mod:`fednode.scenario.kills`); ``clients`` counts them and ``combiners`` is how many of
    them the election should pick. ``standbys``: standby reducer processes (default: one if a
    reducer is killed, none in auto mode, where the auto nodes stand by).
    """

    clients: int = 10
    combiners: int = 2
    rounds: int = 5
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.5
    seed: int = 0
    task: str = DEFAULT_TASK
    federation: str = "demo"
    heartbeat_interval: float = 1.0
    round_deadline: float = 120.0
    eval_every: int = 1
    timeout: float = 900.0
    exit_grace: float = 30.0
    stop_grace: float = 10.0
    program: tuple[str, ...] = FEDNODE_START
    launcher: Launcher = "fork"
    kills: tuple[KillSpec, ...] = ()
    standbys: int | None = None  #: standby reducers (see above)
    auto: bool = False

    @property
    def standby_count(self) -> int:
        if self.standbys is not None:
            return self.standbys
        if self.auto:
            return 0
        return 1 if any(k.role == "reducer" for k in self.kills) else 0

    @property
    def data_role(self) -> Role:
        """The data nodes' role: ``auto`` in auto mode, else ``client``."""
        return "auto" if self.auto else "client"

    @property
    def data_nodes(self) -> list[str]:
        """The data nodes' names, in partition order: ``auto-<i>`` or ``client-<i>``."""
        prefix = AUTO_PREFIX if self.auto else "client-"
        return [f"{prefix}{i}" for i in range(self.clients)]

    @property
    def capacity(self) -> int:
        """Auto mode: the clients each auto node advertises room for, itself included."""
        return math.ceil(self.clients / self.combiners)

    def elected_combiners(self) -> int:
        """Auto mode: how many auto nodes the election picks when all are up. It elects at
        least one per policy target of clients, then more until their room holds every
        node: ``max(ceil(clients / target), ceil(clients / capacity))``
        (``fednode.protocol.election``)."""
        target = DEFAULT_POLICY.target
        return max(math.ceil(self.clients / target), math.ceil(self.clients / self.capacity))

    def __post_init__(self) -> None:
        for name in ("clients", "combiners", "rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("lr must be positive")
        if not self.alpha > 0:
            raise ConfigError("alpha must be positive")
        if self.seed < 0:
            raise ConfigError("seed must be non-negative")
        if not self.timeout > 0 or not self.round_deadline > 0:
            raise ConfigError("timeout and round deadline must be positive")
        if self.launcher not in ("fork", "exec"):
            raise ConfigError(f"launcher must be fork or exec, got {self.launcher!r}")
        if self.standbys is not None and self.standbys < 0:
            raise ConfigError("standbys must be non-negative")
        if self.auto:
            if self.combiners > self.clients:
                raise ConfigError(
                    f"--auto: {self.combiners} combiners need at least as many auto nodes "
                    f"(--clients {self.clients})"
                )
            elected = self.elected_combiners()
            if elected != self.combiners:
                raise ConfigError(
                    f"--auto: {self.clients} auto nodes with room for {self.capacity} each "
                    f"elect {elected} combiners, not {self.combiners} (at least one per "
                    f"{DEFAULT_POLICY.target} clients): try --combiners {elected}"
                )
        check_kills(
            list(self.kills),
            rounds=self.rounds,
            clients=self.clients,
            combiners=self.combiners,
            auto=self.auto,
            standbys=self.standby_count,
        )
        if not self.auto and any(k.role == "reducer" for k in self.kills):
            if self.standby_count < 1:
                raise ConfigError("--kill reducer needs a standby reducer (--standbys 1 or more)")

    @property
    def forks(self) -> bool:
        """Whether the nodes are forked from a zygote (:mod:`fednode.scenario.federation`)."""
        return self.launcher == "fork" and fork_supported() and forkable(self.program)

    def common_args(self, role: Role) -> list[str]:
        return [
            *("--role", role),
            *("--federation", self.federation),
            *("--heartbeat-interval", f"{self.heartbeat_interval:g}"),
            "--events",
        ]

    @property
    def min_clients(self) -> int:
        """The reducer's ``--min-clients``: the data nodes less those the kills take out of
        training (:func:`fednode.scenario.kills.data_losses`)."""
        lost = data_losses(list(self.kills), auto=self.auto, standbys=self.standby_count)
        return self.clients - lost

    def reducer_args(self) -> list[str]:
        """The first reducer's: the session. It starts once every data node is up, and one
        combiner (auto mode: any auto node stands) or all of them."""
        args = [
            *("--rounds", str(self.rounds)),
            *("--min-clients", str(self.min_clients)),
            *("--wait-for", str(self.clients)),
            *("--wait-for-combiners", str(1 if self.auto else self.combiners)),
            *("--round-deadline", f"{self.round_deadline:g}"),
            *("--epochs", str(self.epochs)),
            *("--batch-size", str(self.batch_size)),
            *("--server-optimizer", "fedavg"),
            *("--eval-every", str(self.eval_every)),
            *("--seed", str(self.seed)),
            *("--task", self.task),
            *("--partition", self.partition),
            *("--alpha", repr(self.alpha)),
        ]
        if self.lr is not None:
            args += ["--lr", repr(self.lr)]
        return args

    def client_args(self, index: int) -> list[str]:
        """A data node's: its share of the data; an auto node also listens (clients push to
        it when elected) and advertises its :attr:`capacity`."""
        args = [
            *("--task", self.task),
            *("--partition-index", str(index)),
            *("--partition-count", str(self.clients)),
        ]
        if self.auto:
            args += ["--listen", LOOPBACK, "--capacity", str(self.capacity)]
        return args


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """What a completed run measured.

    Attributes:
        rounds: every round, in order.
        final_accuracy: the reducer's final accuracy.
        total_seconds: from the demo's start to ``session-completed``.
        processes_up_seconds: from the demo's start to every node having printed its identity.
        startup_seconds: from the demo's start to ``session-started``.
        first_round_seconds: from the demo's start to the first ``round-completed``.
        bytes_sent: the sum of every node's ``stopped`` bytes.
        warnings: things that went wrong after the session completed (a node that did not stop
            cleanly), one line each.
    """

    rounds: tuple[RoundRow, ...]
    final_accuracy: float | None
    total_seconds: float
    startup_seconds: float
    first_round_seconds: float | None
    processes_up_seconds: float | None = None
    bytes_sent: int
    warnings: tuple[str, ...] = ()
    model: str | None = None
    events: tuple[dict[str, object], ...] = ()
    heal_seconds: tuple[float | None, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The ``--json`` document."""
        return {
            "rounds": [
                {
                    "round": row.round,
                    "accuracy": row.accuracy,
                    "loss": row.loss,
                    "seconds": row.seconds,
                    "clients_included": row.clients_included,
                    "combiners": list(row.combiners),
                }
                for row in self.rounds
            ],
            "final_accuracy": self.final_accuracy,
            "total_seconds": self.total_seconds,
            "startup_seconds": self.startup_seconds,
            "bytes_sent": self.bytes_sent,
            "model": self.model,
            "events": list(self.events),
            "heal_seconds": list(self.heal_seconds),
        }


__all__ = ["DEFAULT_TASK", "LOOPBACK", "DemoConfig", "DemoResult", "Launcher"]
