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

:func:`stratified_split` cuts a labelled set into train and test parts (the built-in task's
80/20 split). It draws from numpy's legacy ``RandomState`` in the same order as scikit-learn's
``train_test_split(..., stratify=labels, random_state=seed)``, so it returns the same indices in
the same order (a test checks this against scikit-learn) without importing scikit-learn.
"""

from __future__ import annotations

import math
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


def stratified_split(
    labels: np.ndarray[Any, Any], test_fraction: float, seed: int
) -> tuple[IntArray, IntArray]:
    """Train and test indices of ``labels``, each label kept in about the same proportion.

    The test part holds ``ceil(test_fraction * n)`` examples. Per label, the train part takes
    the floor of its proportional share of the train size, and the examples still missing go to
    the labels with the largest fractional parts (ties broken at random); the test part is then
    allotted the same way from what each label has left. Each label's examples are shuffled and
    dealt out in that order, and each part is shuffled once more at the end.

    Raises:
        ConfigError: a fraction outside (0, 1), a part with fewer examples than there are
            labels, or a label with fewer than two examples.
    """
    n = len(labels)
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min(initial=n) < 2 or min(n_train, n_test) < len(classes):
        raise ConfigError(
            f"cannot split {n} examples of {len(classes)} labels {n_train}/{n_test} by label"
        )
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _allot(counts, n_train, rng)
    test_counts = _allot(counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for label_members, count, to_train, to_test in zip(
        members, counts, train_counts, test_counts, strict=True
    ):
        dealt = label_members[rng.permutation(count)]
        train.extend(dealt[:to_train])
        test.extend(dealt[to_train : to_train + to_test])
    return (
        rng.permutation(np.array(train, dtype=np.int64)),
        rng.permutation(np.array(test, dtype=np.int64)),
    )


def _allot(counts: IntArray, draws: int, rng: np.random.RandomState) -> IntArray:
    """How many of ``draws`` each label gets: its proportional share rounded down, then one more
    for the labels with the largest fractional parts, ties drawn at random (every tied group
    reached is drawn from, even when all of it is taken, as scikit-learn does)."""
    exact = counts / counts.sum() * draws
    allotted = np.floor(exact)
    missing = int(draws - allotted.sum())
    fractions = exact - allotted
    for fraction in np.unique(fractions)[::-1]:
        if missing <= 0:
            break
        (tied,) = np.nonzero(fractions == fraction)
        taken = min(len(tied), missing)
        allotted[rng.choice(tied, size=taken, replace=False)] += 1
        missing -= taken
    result: IntArray = allotted.astype(np.int64)
    return result
