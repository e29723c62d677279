r"""How close a predicted perturbation response is to the real one (scGen's and CPA's
leave-one-cell-type-out protocol), and the spread of a response over independent draws.

All functions take log-normalised expression (:math:`\log(1 + 10^4 x / \sum x)`, cells ×
genes) of three sets of cells of one cell type: ``predicted`` (the prediction of the
perturbed cells), ``real`` (the real perturbed cells) and ``control`` (the real unperturbed
cells the prediction started from). The change of a gene is the difference of its mean log
expression, the log fold change as scGen computes it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial.distance import cdist
from scipy.stats import pearsonr
from sklearn.decomposition import PCA


def _dense(x) -> np.ndarray:
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.asarray(x, dtype=np.float64)


def _mean(x, genes=None) -> np.ndarray:
    """Column means in float64, of a sparse matrix without densifying it."""
    mean = np.asarray(sp.csr_matrix(x, dtype=np.float64).mean(0)).ravel() if sp.issparse(x) \
        else _dense(x).mean(0)
    return mean if genes is None else mean[np.asarray(genes)]


def mean_r2(predicted, real, genes=None) -> float:
    r"""scGen's :math:`R^2`: the squared Pearson correlation, across ``genes`` (positions;
    default all), of the predicted and the real mean expression (Lotfollahi et al., 2019,
    Fig. 2; ``scipy.stats.linregress``' ``rvalue ** 2``)."""
    return float(pearsonr(_mean(predicted, genes), _mean(real, genes))[0] ** 2)


def pearson_delta(predicted, real, control, genes=None) -> float:
    r"""Pearson correlation, across ``genes``, of the predicted and the real change from
    control, :math:`\bar x_{pred} - \bar x_{ctrl}` against :math:`\bar x_{real} - \bar
    x_{ctrl}`: unlike :func:`mean_r2` it gives no credit for the profile shared by both
    conditions (a prediction of no change scores 0, or NaN when it is exactly zero)."""
    base = _mean(control, genes)
    delta = _mean(predicted, genes) - base
    if np.ptp(delta) == 0:
        return float("nan")
    return float(pearsonr(delta, _mean(real, genes) - base)[0])


def e_distance(x, y) -> float:
    r"""Energy distance :math:`2\,E\lVert x - y\rVert - E\lVert x - x'\rVert - E\lVert y -
    y'\rVert` between two point sets (Székely & Rizzo, 2013; the E-distance of scPerturb,
    Peidli et al., 2024), with Euclidean distances averaged over all pairs (diagonals
    included, the V-statistic). Zero for equal sets, positive otherwise; pertpy's version
    squares the distances, which leaves only the distance of the means.

    scipy's ``energy_distance`` is one-dimensional, hence ``cdist`` here.
    """
    x, y = _dense(x), _dense(y)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("e_distance needs at least one point in each set.")
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


def top_de_genes(group, reference, n_genes: int = 100) -> np.ndarray:
    """Positions of the ``n_genes`` genes most differentially expressed between ``group``
    and ``reference`` (Wilcoxon rank-sum, scanpy's ``rank_genes_groups``), ranked by the
    absolute test statistic: up- and down-regulated genes alike."""
    group, reference = _dense(group), _dense(reference)
    labels = np.r_[np.zeros(len(group), int), np.ones(len(reference), int)]
    adata = AnnData(np.vstack([group, reference]),
                    obs=pd.DataFrame({"set": pd.Categorical.from_codes(labels, ["a", "b"])},
                                     index=[str(i) for i in range(len(labels))]),
                    var=pd.DataFrame(index=[str(g) for g in range(group.shape[1])]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(adata, "set", groups=["a"], reference="b", method="wilcoxon",
                                n_genes=group.shape[1], use_raw=False)
    result = adata.uns["rank_genes_groups"]
    names = np.asarray(result["names"]["a"]).astype(int)
    scores = np.asarray(result["scores"]["a"], dtype=np.float64)
    order = np.argsort(-np.abs(scores), kind="stable")
    return names[order][:n_genes]


def de_overlap(predicted, real, control, n_genes: int = 100) -> float:
    """Fraction of the real response's top ``n_genes`` differentially expressed genes
    (:func:`top_de_genes` of ``real`` against ``control``) that are also among the
    prediction's (``predicted`` against ``control``)."""
    return _overlap(top_de_genes(real, control, n_genes),
                    top_de_genes(predicted, control, n_genes))


def _overlap(truth: np.ndarray, guess: np.ndarray) -> float:
    return len(set(truth.tolist()) & set(guess.tolist())) / len(truth)


def direction_agreement(predicted, real, control, genes=None) -> float:
    """Fraction of ``genes`` whose predicted change from control has the sign of the real
    change (a gene predicted unchanged counts as wrong)."""
    base = _mean(control, genes)
    predicted = np.sign(_mean(predicted, genes) - base)
    return float(np.mean((predicted == np.sign(_mean(real, genes) - base)) & (predicted != 0)))


def response_intervals(lognorm, draws, source=None, level: float = 0.95,
                       resample_cells: bool = True, seed: int = 0) -> pd.DataFrame:
    r"""Per gene, the mean of a predicted population over independent draws, and the
    central ``level`` interval of the draws' means (their quantiles).

    Parameters
    ----------
    lognorm
        ``(n_cells, n_genes)`` log-normalised expression of all draws stacked (dense, or
        sparse, which stays sparse).
    draws
        ``(n_cells,)`` the draw each row belongs to (at least two draws).
    source
        Log-normalised expression of the cells the prediction started from: adds the
        change from their mean (``log_fold_change``) with its interval.
    level
        Coverage of the interval, in (0, 1).
    resample_cells
        Average each draw over a bootstrap resample of its cells, so that the interval also
        holds the uncertainty of a population of that many cells, not only the model's.
    seed
        Seed of the resampling.

    Returns
    -------
    DataFrame with a row per gene: ``mean``, ``mean_low``, ``mean_high`` and with ``source``
    ``log_fold_change``, ``log_fold_change_low``, ``log_fold_change_high``.
    """
    x = sp.csr_matrix(lognorm) if sp.issparse(lognorm) else _dense(lognorm)
    draws = np.asarray(draws)
    if draws.shape != (x.shape[0],):
        raise ValueError(f"draws must hold one entry per cell ({x.shape[0]}), got shape "
                         f"{draws.shape}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")
    names = np.unique(draws)
    if names.size < 2:
        raise ValueError("response_intervals needs at least two draws.")
    rng = np.random.default_rng(seed)
    means = []
    for name in names:
        rows = x[np.flatnonzero(draws == name)]
        if resample_cells:
            rows = rows[rng.integers(0, rows.shape[0], rows.shape[0])]
        means.append(_mean(rows))
    means = np.stack(means)
    tails = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    low, high = np.quantile(means, tails, axis=0)
    out = pd.DataFrame({"mean": _mean(x), "mean_low": low, "mean_high": high})
    if source is not None:
        base = _mean(source)
        out["log_fold_change"] = out["mean"] - base
        out["log_fold_change_low"] = low - base
        out["log_fold_change_high"] = high - base
    return out


def interval_coverage(low, high, truth) -> float:
    """Fraction of entries with ``low <= truth <= high``: how often an interval holds the
    true value (at a calibrated 95% interval, about 0.95)."""
    low, high, truth = (np.asarray(v, dtype=np.float64) for v in (low, high, truth))
    return float(np.mean((low <= truth) & (truth <= high)))


def perturbation_scores(predicted, real, control, n_genes: int = 100, n_pcs: int = 50
                        ) -> dict[str, float]:
    """Every score of the protocol at once: :func:`mean_r2` on all genes and on the real
    response's top ``n_genes`` DE genes, :func:`pearson_delta` on both, :func:`e_distance`
    in the PCA (``n_pcs``) of the real and control cells, :func:`de_overlap` and
    :func:`direction_agreement` on the top DE genes."""
    predicted, real, control = _dense(predicted), _dense(real), _dense(control)
    top = top_de_genes(real, control, n_genes)
    both = np.vstack([real, control])
    pca = PCA(n_components=min(n_pcs, both.shape[0] - 1, both.shape[1]), random_state=0)
    pca.fit(both)
    return {
        "R2 all genes": mean_r2(predicted, real),
        "R2 top DE": mean_r2(predicted, real, top),
        "Pearson delta": pearson_delta(predicted, real, control),
        "Pearson delta top DE": pearson_delta(predicted, real, control, top),
        "E-distance": e_distance(pca.transform(predicted), pca.transform(real)),
        "DE overlap": _overlap(top, top_de_genes(predicted, control, n_genes)),
        "direction agreement": direction_agreement(predicted, real, control, top),
    }
