"""Do generated cells have the real marker genes of each label?"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData


def top_markers(lognorm, labels, gene_names, groups, n_markers: int = 100) -> dict[str, list]:
    """The ``n_markers`` top genes of each group against the rest (Wilcoxon, scanpy)."""
    adata = AnnData(lognorm, obs=pd.DataFrame({"group": pd.Categorical(np.asarray(labels))},
                                              index=[str(i) for i in range(len(labels))]),
                    var=pd.DataFrame(index=list(gene_names)))
    with warnings.catch_warnings():  # scanpy's own, about its frame of many groups
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(adata, "group", groups=list(groups), reference="rest",
                                method="wilcoxon", n_genes=n_markers, use_raw=False)
    names = adata.uns["rank_genes_groups"]["names"]
    return {group: list(names[group]) for group in groups}


def marker_overlap(
    real_lognorm,
    real_labels,
    generated_lognorm,
    generated_labels,
    gene_names,
    groups,
    n_markers: int = 100,
) -> dict[str, float]:
    """Per group: fraction of the real top-``n_markers`` genes that are also generated ones.

    Markers are ranked by a Wilcoxon test of each group against all other cells of the same
    set (real or generated), on log-normalised expression; 1 means the same top genes.
    """
    groups = list(groups)
    if len(groups) < 2:
        raise ValueError("marker_overlap needs at least two labels.")
    n_markers = min(n_markers, len(gene_names))
    real = top_markers(real_lognorm, real_labels, gene_names, groups, n_markers)
    generated = top_markers(generated_lognorm, generated_labels, gene_names, groups, n_markers)
    return {g: len(set(real[g]) & set(generated[g])) / n_markers for g in groups}
