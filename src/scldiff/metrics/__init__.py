"""Evaluation of generated cells against held-out real cells (docs "Benchmarks")."""

from ._classifier import classifier_auc, tstr_f1
from ._counts import count_diagnostics, library_coupling
from ._distances import MMD_SIGMAS, mmd_rbf, wasserstein
from ._evaluate import evaluate, shared_pca
from ._markers import marker_overlap, top_markers
from ._perturbation import (
    de_overlap,
    direction_agreement,
    e_distance,
    interval_coverage,
    mean_r2,
    pearson_delta,
    perturbation_scores,
    response_intervals,
    top_de_genes,
)
from ._report import to_markdown
from ._spatial import (
    domain_ari,
    graph_fourier_spectrum,
    moran_agreement,
    morans_i,
    spectral_mismatch,
)
from ._split import label_matched_sample, stratified_split

__all__ = [
    "MMD_SIGMAS", "classifier_auc", "count_diagnostics", "de_overlap", "direction_agreement",
    "domain_ari", "e_distance", "evaluate", "graph_fourier_spectrum", "interval_coverage",
    "label_matched_sample", "library_coupling", "marker_overlap", "mean_r2", "mmd_rbf",
    "moran_agreement", "morans_i", "pearson_delta", "perturbation_scores",
    "response_intervals", "shared_pca", "spectral_mismatch", "stratified_split",
    "to_markdown", "top_de_genes", "top_markers", "tstr_f1", "wasserstein",
]
