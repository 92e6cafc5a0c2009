"""Task layer: splitting a labelled training set across the clients of a federation.

Pure numpy and deterministic: every client computes the whole split from the shared
:class:`~fednode.task.api.Partition` settings and keeps its own share, so no one has to hand
out indices. Shares are disjoint, cover the data set, are never empty, and come back sorted.

``iid``
    A permutation seeded by ``seed``, cut into ``count`` consecutive shares whose sizes differ
    by at most one.

``dirichlet`` (label skew)
    For each label in increasing order: shuffle that label's examples, draw client proportions
    ``p ~ Dirichlet(alpha, ..., alpha)`` and cut the shuffled examples at
    ``round(cumsum(p) * n_label)``. Small ``alpha`` gives each client few labels; large
    ``alpha`` tends to IID. A client left empty then takes one example from the largest share
    (lowest index on ties; the example last in that share's label order), until none is empty:
    this terminates and stays deterministic, unlike redrawing until every share is large enough.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fednode.errors import ConfigError
from fednode.task.api import Partition

IntArray = np.ndarray[Any, np.dtype[np.int64]]

# Separate random streams for the two schemes, so one seed never draws the same numbers twice.
_IID_STREAM = 1
_DIRICHLET_STREAM = 2


def split(labels: np.ndarray[Any, Any], partition: Partition) -> list[IntArray]:
    """Every client's share of ``labels``' indices under ``partition``'s scheme."""
    n = len(labels)
    if n < partition.count:
        raise ConfigError(f"cannot split {n} examples across {partition.count} clients")
    if partition.scheme == "iid":
        return iid_split(n, partition.count, partition.seed)
    return dirichlet_split(labels, partition.count, partition.alpha, partition.seed)


def share(labels: np.ndarray[Any, Any], partition: Partition) -> IntArray:
    """The indices of client ``partition.index``'s share of ``labels``."""
    return split(labels, partition)[partition.index]


def iid_split(n: int, count: int, seed: int) -> list[IntArray]:
    """``n`` indices shuffled and cut into ``count`` shares of equal size (within one)."""
    order = np.random.default_rng([seed, _IID_STREAM]).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, count)]


def dirichlet_split(
    labels: np.ndarray[Any, Any], count: int, alpha: float, seed: int
) -> list[IntArray]:
    """Label-skewed shares (see the module docstring)."""
    rng = np.random.default_rng([seed, _DIRICHLET_STREAM])
    parts: list[list[IntArray]] = [[] for _ in range(count)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label)).astype(np.int64)
        proportions = rng.dirichlet(np.full(count, alpha))
        cuts = np.rint(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    shares = [np.concatenate(pieces) for pieces in parts]
    while True:
        sizes = [len(s) for s in shares]
        empty = [client for client, size in enumerate(sizes) if size == 0]
        if not empty:
            break
        donor = int(np.argmax(sizes))
        shares[empty[0]] = shares[donor][-1:]
        shares[donor] = shares[donor][:-1]
    return [np.sort(s) for s in shares]
