"""Task layer: what a client trains, behind a numpy-only interface.

Sits between ``aggregation`` and ``net``. A task is a module with ``train``, ``evaluate`` and
``initial_params`` over ordered ``name -> numpy array`` maps (:mod:`fednode.task.api`). Nothing
here imports trio or libp2p, and importing this package or :mod:`fednode.task.api` never imports
torch: only the functions that train do, so combiners, reducers and bootstrap nodes stay torch-free.
"""

from __future__ import annotations

from fednode.task.api import (
    DEFAULT_TASK,
    EvalConfig,
    Metrics,
    ModuleTask,
    Partition,
    Task,
    TrainConfig,
    TrainResult,
    load_task,
)

__all__ = [
    "DEFAULT_TASK",
    "EvalConfig",
    "Metrics",
    "ModuleTask",
    "Partition",
    "Task",
    "TrainConfig",
    "TrainResult",
    "load_task",
]
