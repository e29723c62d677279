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


def _gene_mean_variance(adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    mean = np.asarray(x.mean(0)).ravel()
    var = np.maximum(np.asarray(x.multiply(x).mean(0)).ravel() - mean**2, 0.0)
    keep = mean > 0
    return mean[keep], var[keep]


def mean_variance(real: AnnData, generated: AnnData, path: str | None = None) -> plt.Figure:
    """Per-gene variance against mean of the raw counts, real and generated (log-log).

    The Poisson line (variance = mean) is drawn for reference: overdispersed genes lie
    above it, and a generator with the wrong dispersion shows up as a shifted cloud.
    """
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = np.inf, -np.inf
    for adata, name in ((real, "real"), (generated, "generated")):
        mean, var = _gene_mean_variance(adata)
        ax.scatter(mean, np.maximum(var, 1e-6), s=3, alpha=0.4, label=name, rasterized=True)
        lo, hi = min(lo, mean.min()), max(hi, mean.max())
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="Poisson")
    ax.set(xscale="log", yscale="log", xlabel="gene mean (counts)",
           ylabel="gene variance (counts)")
    ax.legend(markerscale=4)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def zeros_per_cell(real: AnnData, generated: AnnData, labels_key: str | None = None,
                   path: str | None = None) -> plt.Figure:
    """Distribution of the number of zero genes per cell, real vs generated.

    With ``labels_key``, one box pair per label, so a label whose cells are too sparse or
    too dense stands out.
    """
    def zeros(adata):
        x = sp.csr_matrix(adata.X)
        return x.shape[1] - x.getnnz(1)

    if labels_key is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for adata, name in ((real, "real"), (generated, "generated")):
            ax.hist(zeros(adata), bins=40, alpha=0.5, label=name)
        ax.set(xlabel="zeros per cell", ylabel="cells")
        ax.legend()
    else:
        labels = [str(c) for c in real.obs[labels_key].astype("category").cat.categories]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5))
        data, positions, colors = [], [], []
        for i, label in enumerate(labels):
            for j, (adata, color) in enumerate(((real, "C0"), (generated, "C1"))):
                values = zeros(adata)[np.asarray(adata.obs[labels_key].astype(str)) == label]
                data.append(values if values.size else [np.nan])
                positions.append(3 * i + j)
                colors.append(color)
        boxes = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True,
                           showfliers=False)
        for patch, color in zip(boxes["boxes"], colors, strict=True):
            patch.set_facecolor(color)
            patch.set_alpha(0.6)
        ax.set_xticks([3 * i + 0.5 for i in range(len(labels))], labels, rotation=45,
                      ha="right")
        ax.set_ylabel("zeros per cell")
        ax.legend([boxes["boxes"][0], boxes["boxes"][1]], ["real", "generated"])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
