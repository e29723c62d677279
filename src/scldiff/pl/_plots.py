"""Real vs generated: a joint UMAP, library sizes and zeros per cell."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData


def real_vs_generated_umap(
    real: AnnData,
    generated: AnnData,
    labels_key: str | None = None,
    path: str | None = None,
    n_pcs: int = 30,
    random_state: int = 0,
) -> plt.Figure:
    """UMAP of real and generated cells together, coloured by origin and by label.

    Both sets are normalised to 1e4, log1p-transformed and embedded jointly (PCA, k-NN,
    UMAP) so that generated cells that leave the real manifold show up apart.
    """
    both = sc.concat({"real": real, "generated": generated}, label="origin",
                     index_unique="-", join="inner")
    both.X = sp.csr_matrix(both.X, dtype=np.float32)
    sc.pp.normalize_total(both, target_sum=1e4)
    sc.pp.log1p(both)
    sc.pp.pca(both, n_comps=min(n_pcs, both.n_vars - 1, both.n_obs - 1),
              random_state=random_state)
    sc.pp.neighbors(both, random_state=random_state)
    sc.tl.umap(both, random_state=random_state)
    colors = ["origin"] + ([labels_key] if labels_key else [])
    fig, axes = plt.subplots(1, len(colors), figsize=(6.5 * len(colors), 5.5))
    axes = np.atleast_1d(axes)
    for ax, color in zip(axes, colors, strict=True):
        sc.pl.umap(both, color=color, ax=ax, show=False, frameon=False, size=12)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def library_and_zeros(real: AnnData, generated: AnnData, path: str | None = None) -> plt.Figure:
    """Histograms of library size and zeros per cell, real vs generated."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for adata, name in ((real, "real"), (generated, "generated")):
        x = sp.csr_matrix(adata.X)
        axes[0].hist(np.log10(np.asarray(x.sum(1)).ravel()), bins=40, alpha=0.5, label=name)
        axes[1].hist(x.shape[1] - x.getnnz(1), bins=40, alpha=0.5, label=name)
    axes[0].set_xlabel("log10 library size")
    axes[1].set_xlabel("zeros per cell")
    for ax in axes:
        ax.set_ylabel("cells")
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
