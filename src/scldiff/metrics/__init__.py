"""Evaluation of generated cells against held-out real cells (docs "Benchmarks")."""

from ._classifier import classifier_auc, tstr_f1
from ._counts import count_diagnostics, library_coupling
from ._distances import MMD_SIGMAS, mmd_rbf, wasserstein
from ._evaluate import evaluate, shared_pca
from ._markers import marker_overlap, top_markers
from ._report import to_markdown
from ._split import label_matched_sample, stratified_split

__all__ = [
    "MMD_SIGMAS", "classifier_auc", "count_diagnostics", "evaluate", "label_matched_sample",
    "library_coupling", "marker_overlap", "mmd_rbf", "shared_pca", "stratified_split",
    "to_markdown", "top_markers", "tstr_f1", "wasserstein",
]
