"""Aggregation layer: pure numpy functions over models (ordered ``name -> np.ndarray`` maps).

Combiners fold updates into a :class:`StreamingMean` (weighted FedAvg in O(model) memory; a
partial re-enters its parent as ``add(mean, total_weight)``). The reducer turns the aggregate
into the next global model with a :class:`ServerOptimizer` from :func:`make_optimizer`. No trio,
no libp2p, no torch, no I/O.
"""

from __future__ import annotations

from fednode.aggregation.fedavg import StreamingMean, check_weight, weighted_mean
from fednode.aggregation.optimizers import (
    OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_optimizer,
)

__all__ = [
    "OPTIMIZERS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "StreamingMean",
    "check_weight",
    "make_optimizer",
    "weighted_mean",
]
