"""The evaluation protocol of DESIGN.md on two AnnData of raw counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

from ._distances import mmd_rbf, wasserstein


def _counts(adata: AnnData, layer: str | None):
    x = adata.X if layer is None else adata.layers[layer]
    return sp.csr_matrix(x, dtype=np.float32)


def _log_normalize(x: sp.csr_matrix) -> np.ndarray:
    library = np.asarray(x.sum(1)).ravel()
    scale = np.divide(1e4, library, out=np.zeros_like(library), where=library > 0)
    return np.log1p(sp.diags(scale) @ x).toarray()


def _seurat_v3_genes(counts: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Seurat v3 HVG mask; the loess fit of small sets can be singular, so widen its span."""
    for span in (0.3, 0.5, 1.0):
        try:
            table = sc.pp.highly_variable_genes(AnnData(counts), flavor="seurat_v3",
                                                n_top_genes=n_top, span=span, inplace=False)
            return table["highly_variable"].to_numpy()
        except ValueError:
            continue
    raise ValueError("Seurat v3 gene selection failed on the real cells even with span=1; "
                     "pass more real cells or n_hvg=None.")


def shared_pca(
    real: AnnData,
    generated: AnnData,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    layer: str | None = None,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Project real and generated cells into the real cells' principal components.

    ``n_hvg`` highly variable genes (Seurat v3, on the real counts), library-size
    normalisation to 1e4 and ``log1p``, then PCA fitted on the real cells only; the
    generated cells are projected with the same loadings.
    """
    if list(real.var_names) != list(generated.var_names):
        raise ValueError("real and generated must have the same var_names in the same order.")
    n_hvg = min(n_hvg, real.n_vars)
    hvg = _seurat_v3_genes(_counts(real, layer), n_hvg)
    x_real = _log_normalize(_counts(real, layer)[:, hvg])
    x_gen = _log_normalize(_counts(generated, layer)[:, hvg])
    n_pcs = min(n_pcs, x_real.shape[0] - 1, x_real.shape[1])
    pca = PCA(n_components=n_pcs, random_state=random_state).fit(x_real)
    return pca.transform(x_real), pca.transform(x_gen)


def evaluate(
    real: AnnData,
    generated: AnnData,
    labels_key: str | None = None,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    layer: str | None = None,
    min_cells: int = 2,
) -> pd.DataFrame:
    """Distances between generated cells and held-out real cells (lower is better).

    The protocol of the LapDDPM paper as coded by CFGen: Seurat-v3 HVGs chosen on the real
    counts, normalise + log1p, PCA fitted on the real cells, generated cells projected;
    RBF-kernel MMD (biased MMD², kernel scales 0.01-100), exact W2 and W1. *Conditional*
    values are averaged over the labels present in both sets with at least ``min_cells``
    cells each; *unconditional* ones use all cells. Also compares median library size and
    mean fraction of zeros per cell.

    Returns
    -------
    DataFrame indexed by metric with columns ``conditional`` and ``unconditional``.
    """
    pcs_real, pcs_gen = shared_pca(real, generated, n_hvg, n_pcs, layer)
    rows = {"MMD": (mmd_rbf, {}), "W2": (wasserstein, {"power": 2}),
            "W1": (wasserstein, {"power": 1})}
    result = {name: {"unconditional": fn(pcs_gen, pcs_real, **kw)}
              for name, (fn, kw) in rows.items()}
    if labels_key is not None:
        real_labels = np.asarray(real.obs[labels_key].astype(str))
        gen_labels = np.asarray(generated.obs[labels_key].astype(str))
        shared = [label for label in np.unique(real_labels)
                  if (real_labels == label).sum() >= min_cells
                  and (gen_labels == label).sum() >= min_cells]
        if not shared:
            raise ValueError(f"No label has at least {min_cells} cells in both sets.")
        for name, (fn, kw) in rows.items():
            per_label = [fn(pcs_gen[gen_labels == label], pcs_real[real_labels == label], **kw)
                         for label in shared]
            result[name]["conditional"] = float(np.mean(per_label))
    real_counts, gen_counts = _counts(real, layer), _counts(generated, layer)
    for name, fn in (("median library size", lambda x: np.median(np.asarray(x.sum(1)))),
                     ("mean zero fraction", lambda x: 1.0 - x.getnnz(1).mean() / x.shape[1])):
        result[f"{name} (real)"] = {"unconditional": float(fn(real_counts))}
        result[f"{name} (generated)"] = {"unconditional": float(fn(gen_counts))}
    frame = pd.DataFrame(result).T
    return frame.reindex(columns=[c for c in ("conditional", "unconditional")
                                  if c in frame.columns])
