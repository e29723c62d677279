"""Held-out splits for evaluation."""

from __future__ import annotations

import numpy as np
from anndata import AnnData


def stratified_split(
    adata: AnnData, labels_key: str, test_size: float = 0.2, seed: int = 0
) -> tuple[AnnData, AnnData]:
    """Split cells into train and test sets with the same label proportions.

    Each label keeps ``round(test_size * n_label)`` test cells (at least one when it has two
    or more cells). Returns copies, so setting up the training set leaves ``adata`` alone.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must lie in (0, 1), got {test_size}.")
    rng = np.random.default_rng(seed)
    labels = np.asarray(adata.obs[labels_key].astype(str))
    test = np.zeros(adata.n_obs, dtype=bool)
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        n_test = int(round(test_size * cells.size))
        if cells.size >= 2:
            n_test = min(max(n_test, 1), cells.size - 1)
        test[rng.choice(cells, n_test, replace=False)] = True
    return adata[~test].copy(), adata[test].copy()


def label_matched_sample(
    source: AnnData, target: AnnData, labels_key: str, seed: int = 0
) -> AnnData:
    """Cells of ``source`` with the label counts of ``target`` (the real-vs-real floor).

    Sampled without replacement where the label has enough cells, else with replacement.
    """
    rng = np.random.default_rng(seed)
    source_labels = np.asarray(source.obs[labels_key].astype(str))
    picked = []
    for label, count in target.obs[labels_key].astype(str).value_counts().items():
        cells = np.flatnonzero(source_labels == label)
        if cells.size == 0:
            continue
        picked.append(rng.choice(cells, count, replace=count > cells.size))
    return source[np.concatenate(picked)].copy()
