"""Evaluation of generated cells against held-out real cells (DESIGN.md's protocol)."""

from ._distances import MMD_SIGMAS, mmd_rbf, wasserstein
from ._evaluate import evaluate, shared_pca
from ._report import to_markdown
from ._split import label_matched_sample, stratified_split

__all__ = [
    "MMD_SIGMAS", "evaluate", "label_matched_sample", "mmd_rbf", "shared_pca",
    "stratified_split", "to_markdown", "wasserstein",
]
