"""The evaluation protocol (docs "Benchmarks") on two AnnData of raw counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

from ._classifier import classifier_auc, tstr_f1
from ._counts import count_diagnostics, library_coupling
from ._distances import mmd_rbf, wasserstein
from ._markers import marker_overlap
from ._threads import torch_threads_kept


def _check_genes(real: AnnData, generated: AnnData) -> None:
    if list(real.var_names) != list(generated.var_names):
        raise ValueError("real and generated must have the same var_names in the same order.")


def _counts(adata: AnnData, layer: str | None):
    x = adata.X if layer is None else adata.layers[layer]
    return sp.csr_matrix(x, dtype=np.float32)


def _log_normalize_sparse(x: sp.csr_matrix) -> sp.csr_matrix:
    library = np.asarray(x.sum(1)).ravel()
    scale = np.divide(1e4, library, out=np.zeros_like(library), where=library > 0)
    return sp.csr_matrix(sp.diags(scale) @ x).log1p()


def _log_normalize(x: sp.csr_matrix) -> np.ndarray:
    return _log_normalize_sparse(x).toarray()


def _seurat_v3_genes(counts: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Seurat v3 HVG mask; the loess fit of small sets can be singular, so widen its span."""
    for span in (0.3, 0.5, 1.0):
        try:
            with torch_threads_kept():  # its numba code resets torch's thread count
                table = sc.pp.highly_variable_genes(AnnData(counts), flavor="seurat_v3",
                                                    n_top_genes=n_top, span=span,
                                                    inplace=False)
            return table["highly_variable"].to_numpy()
        except ValueError:
            continue
    raise ValueError("Seurat v3 gene selection failed on the real cells even with span=1; "
                     "pass more real cells or a smaller n_hvg.")


def shared_pca(
    real: AnnData,
    generated: AnnData,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    layer: str | None = None,
    random_state: int = 0,
    hvg: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Project real and generated cells into the real cells' principal components.

    ``n_hvg`` highly variable genes (Seurat v3, on the real counts), library-size
    normalisation to 1e4 and ``log1p``, then PCA fitted on the real cells only; the
    generated cells are projected with the same loadings. ``hvg`` (a boolean gene mask)
    skips the gene selection when the caller has made it already.
    """
    _check_genes(real, generated)
    if hvg is None:
        hvg = _seurat_v3_genes(_counts(real, layer), min(n_hvg, real.n_vars))
    x_real = _log_normalize(_counts(real, layer)[:, hvg])
    x_gen = _log_normalize(_counts(generated, layer)[:, hvg])
    n_pcs = min(n_pcs, x_real.shape[0] - 1, x_real.shape[1])
    pca = PCA(n_components=n_pcs, random_state=random_state).fit(x_real)
    return pca.transform(x_real), pca.transform(x_gen)


def _marker_overlap(real_log, real_labels, gen_log, gen_labels, genes, shared, n_markers
                    ) -> float:
    """The mean over the ``shared`` labels of :func:`marker_overlap`."""
    keep_real, keep_gen = np.isin(real_labels, shared), np.isin(gen_labels, shared)
    overlap = marker_overlap(real_log[keep_real], real_labels[keep_real], gen_log[keep_gen],
                             gen_labels[keep_gen], genes, shared, n_markers)
    return float(np.mean(list(overlap.values())))


def _labels(adata: AnnData, labels_key: str, name: str) -> np.ndarray:
    if labels_key not in adata.obs:
        raise ValueError(f"labels_key {labels_key!r} is not a column of the {name} cells' obs; "
                         "pass labels_key=None for unconditional metrics.")
    return np.asarray(adata.obs[labels_key].astype(str))


def evaluate(
    real: AnnData,
    generated: AnnData,
    labels_key: str | None = None,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    layer: str | None = None,
    min_cells: int = 2,
    random_state: int = 0,
    classifier: bool = True,
    markers: bool = True,
    n_markers: int = 100,
) -> pd.DataFrame:
    """Compare generated cells with held-out real cells (the protocol of docs "Benchmarks").

    Distances (the LapDDPM paper's, as coded by CFGen): ``n_hvg`` Seurat-v3 genes chosen on
    the real counts, normalise to 1e4 + log1p, PCA(``n_pcs``) fitted on the real cells with
    the generated cells projected; RBF-kernel MMD (biased MMD², kernel scales 0.01-100),
    exact W2 and W1. *Conditional* values are averaged over the labels with at least
    ``min_cells`` cells in both sets; *unconditional* ones use all cells.

    With ``classifier``: ``RF AUC``, a random forest telling real from generated cells in
    its own PCA of the pooled cells (:func:`classifier_auc`; 0.5 is ideal), and with labels
    ``TSTR macro F1``, a forest trained on the generated cells' labels and tested on the
    real cells (:func:`tstr_f1`). With ``markers`` and labels: ``marker overlap``, the mean
    over labels of the shared fraction of the top ``n_markers`` Wilcoxon marker genes
    (:func:`marker_overlap`). ``library-expression R2`` of the real and of the generated
    cells: how much of the log library size their first 10 principal components explain,
    within labels with at least 30 cells (:func:`library_coupling`; conditional with
    labels). Always: count diagnostics on all genes (:func:`count_diagnostics`).

    Returns
    -------
    DataFrame indexed by metric with columns ``conditional`` and ``unconditional`` (the
    column that does not apply to a metric is NaN).
    """
    _check_genes(real, generated)
    real_counts, gen_counts = _counts(real, layer), _counts(generated, layer)
    hvg = _seurat_v3_genes(real_counts, min(n_hvg, real.n_vars))
    pcs_real, pcs_gen = shared_pca(real, generated, n_hvg, n_pcs, layer, random_state, hvg)
    rows = {"MMD": (mmd_rbf, {}), "W2": (wasserstein, {"power": 2}),
            "W1": (wasserstein, {"power": 1})}
    result = {name: {"unconditional": fn(pcs_gen, pcs_real, **kw)}
              for name, (fn, kw) in rows.items()}
    shared, real_labels, gen_labels = [], None, None
    if labels_key is not None:
        real_labels, gen_labels = (_labels(adata, labels_key, name) for adata, name in
                                   ((real, "real"), (generated, "generated")))
        shared = [label for label in np.unique(real_labels)
                  if (real_labels == label).sum() >= min_cells
                  and (gen_labels == label).sum() >= min_cells]
        if not shared:
            raise ValueError(f"No label has at least {min_cells} cells in both sets.")
        for name, (fn, kw) in rows.items():
            per_label = [fn(pcs_gen[gen_labels == label], pcs_real[real_labels == label], **kw)
                         for label in shared]
            result[name]["conditional"] = float(np.mean(per_label))
    real_log, gen_log = _log_normalize_sparse(real_counts), _log_normalize_sparse(gen_counts)
    if classifier:
        result["RF AUC"] = {"unconditional": classifier_auc(
            real_log[:, hvg].toarray(), gen_log[:, hvg].toarray(), n_pcs=n_pcs,
            random_state=random_state)}
        if labels_key is not None:
            result["TSTR macro F1"] = {"conditional": tstr_f1(
                pcs_gen, gen_labels, pcs_real, real_labels, random_state=random_state)}
    if markers and labels_key is not None and len(shared) >= 2:
        result["marker overlap"] = {"conditional": _marker_overlap(
            real_log, real_labels, gen_log, gen_labels, real.var_names, shared, n_markers)}
    for name, pcs, counts, cell_labels in (("real", pcs_real, real_counts, real_labels),
                                           ("generated", pcs_gen, gen_counts, gen_labels)):
        value = library_coupling(pcs, np.asarray(counts.sum(1)).ravel(), cell_labels)
        if np.isfinite(value):
            column = "unconditional" if labels_key is None else "conditional"
            result[f"library-expression R2 ({name})"] = {column: value}
    diagnostics = count_diagnostics(real_counts, gen_counts, real_log, gen_log)
    for name, value in diagnostics.items():
        result[name] = {"unconditional": value}
    frame = pd.DataFrame(result).T
    return frame.reindex(columns=[c for c in ("conditional", "unconditional")
                                  if c in frame.columns])
