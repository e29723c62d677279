"""Count-level diagnostics: library size, zeros, mean-variance, gene-gene correlation."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.stats import ks_2samp


def _gene_moments(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(x.mean(0)).ravel()
    square = np.asarray(x.multiply(x).mean(0)).ravel()
    return mean, np.maximum(square - mean**2, 0.0)


def _correlation(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(x, rowvar=False)
    return np.nan_to_num(corr, nan=0.0)


def count_diagnostics(
    real: sp.spmatrix,
    generated: sp.spmatrix,
    real_lognorm: np.ndarray | sp.spmatrix | None = None,
    generated_lognorm: np.ndarray | sp.spmatrix | None = None,
    n_corr_genes: int = 100,
) -> dict[str, float]:
    """Compare raw counts of real and generated cells (same genes, same order).

    Returns median library size and mean zero fraction per cell of both sets, their relative
    error, two-sample Kolmogorov-Smirnov statistics of log library size and of zeros per
    cell, Pearson correlations across genes of log1p gene means and log1p gene variances
    (the mean-variance relation), and the gene-gene correlation error: the mean absolute
    difference between the real and generated Pearson correlation matrices (off-diagonal)
    of the ``n_corr_genes`` genes with the highest real mean, computed on the log-normalised
    matrices when given, else on the counts.
    """
    real, generated = sp.csr_matrix(real, dtype=np.float64), sp.csr_matrix(generated,
                                                                          dtype=np.float64)
    if real.shape[1] != generated.shape[1]:
        raise ValueError("real and generated must have the same genes.")
    lib_real, lib_gen = (np.asarray(x.sum(1)).ravel() for x in (real, generated))
    zeros_real, zeros_gen = (x.shape[1] - x.getnnz(1) for x in (real, generated))
    out = {
        "median library size (real)": float(np.median(lib_real)),
        "median library size (generated)": float(np.median(lib_gen)),
        "mean zero fraction (real)": float(zeros_real.mean() / real.shape[1]),
        "mean zero fraction (generated)": float(zeros_gen.mean() / real.shape[1]),
        "library size KS": float(ks_2samp(np.log1p(lib_real), np.log1p(lib_gen)).statistic),
        "zeros per cell KS": float(ks_2samp(zeros_real, zeros_gen).statistic),
    }
    out["median library relative error"] = abs(
        out["median library size (generated)"] / out["median library size (real)"] - 1.0)
    (mean_r, var_r), (mean_g, var_g) = _gene_moments(real), _gene_moments(generated)
    out["gene mean correlation"] = float(np.corrcoef(np.log1p(mean_r), np.log1p(mean_g))[0, 1])
    out["gene variance correlation"] = float(np.corrcoef(np.log1p(var_r), np.log1p(var_g))[0, 1])
    genes = np.argsort(-mean_r, kind="stable")[: min(n_corr_genes, real.shape[1])]
    if real_lognorm is None or generated_lognorm is None:
        a, b = real[:, genes].toarray(), generated[:, genes].toarray()
    else:
        a, b = (x[:, genes].toarray() if sp.issparse(x) else np.asarray(x)[:, genes]
                for x in (real_lognorm, generated_lognorm))
    off = ~np.eye(len(genes), dtype=bool)
    out["gene-gene correlation error"] = float(
        np.abs(_correlation(a) - _correlation(b))[off].mean())
    return out


def library_coupling(
    pcs: np.ndarray,
    library: np.ndarray,
    labels: np.ndarray | None = None,
    n_pcs: int = 10,
    min_cells: int = 30,
) -> float:
    r"""How much of the library size the expression state explains, within cell types.

    For each label with at least ``min_cells`` cells (all cells when ``labels`` is
    ``None``), the adjusted :math:`R^2 = 1 - (1 - R^2)\frac{n - 1}{n - p - 1}` of the least
    squares fit of the log library size on an intercept and the first ``n_pcs`` principal
    components (``p`` of them); the mean over labels, weighted by their numbers of cells.
    In real cells the sequencing depth goes with the state inside a type (cell size,
    activation) and with how many genes are detected; a generator that draws library
    sizes apart from the state has a lower value. NaN when no label has enough cells.
    """
    pcs = np.asarray(pcs, dtype=np.float64)[:, :n_pcs]
    log_library = np.log(np.asarray(library, dtype=np.float64).ravel())
    if pcs.shape[0] != log_library.size:
        raise ValueError("pcs and library must have one row per cell.")
    groups = (np.zeros(log_library.size, dtype=int) if labels is None
              else np.unique(np.asarray(labels), return_inverse=True)[1].ravel())
    p = pcs.shape[1]
    values, weights = [], []
    for group in np.unique(groups):
        rows = groups == group
        n = int(rows.sum())
        if n < max(min_cells, p + 2):
            continue
        y = log_library[rows]
        design = np.c_[np.ones(n), pcs[rows]]
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        total = ((y - y.mean()) ** 2).sum()
        if total == 0:
            continue
        r2 = 1.0 - ((y - design @ coef) ** 2).sum() / total
        values.append(1.0 - (1.0 - r2) * (n - 1) / (n - p - 1))
        weights.append(n)
    return float(np.average(values, weights=weights)) if values else float("nan")
