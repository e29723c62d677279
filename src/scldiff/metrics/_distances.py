"""Distribution distances of the evaluation protocol (CFGen's code, papers 001/002)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot

MMD_SIGMAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigmas: Sequence[float] = MMD_SIGMAS) -> float:
    r"""Biased MMD² with a sum of Gaussian kernels :math:`\sum_\sigma e^{-\lVert a-b
    \rVert^2 / 2\sigma^2}`.

    :math:`\mathrm{MMD}^2 = \overline{K_{xx}} + \overline{K_{yy}} - 2\,\overline{K_{xy}}`
    (means over all pairs, diagonals included). As in CFGen's evaluation, both sets are
    truncated to the smaller one's size first (their first rows).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = min(len(x), len(y))
    if m == 0:
        raise ValueError("mmd_rbf needs at least one point in each set.")
    x, y = x[:m], y[:m]
    total = 0.0
    for block, sign in ((_squared_distances(x, x), 1.0), (_squared_distances(y, y), 1.0),
                        (_squared_distances(x, y), -2.0)):
        kernel = sum(np.exp(-block / (2.0 * s**2)) for s in sigmas)
        total += sign * kernel.mean()
    return float(total)


def wasserstein(x: np.ndarray, y: np.ndarray, power: int = 2) -> float:
    r"""Exact Wasserstein distance between two empirical distributions (POT ``emd2``).

    ``power=2``: :math:`W_2 = (\min_\pi \sum \pi_{ij} \lVert x_i - y_j\rVert^2)^{1/2}`;
    ``power=1``: :math:`W_1 = \min_\pi \sum \pi_{ij} \lVert x_i - y_j\rVert`; uniform weights.
    """
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}.")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cost = _squared_distances(x, y)
    if power == 1:
        cost = np.sqrt(cost)
    value = ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=10_000_000)
    return float(np.sqrt(value) if power == 2 else value)
