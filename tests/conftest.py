"""Shared fixtures: a small real dataset (a PBMC3K subset) and a briefly trained model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scanpy as sc
import scvi
import torch
from hypothesis import HealthCheck, settings

import scldiff

torch.set_num_threads(2)

# property-based tests: a fixed, quick set in CI; SCLDIFF_HYPOTHESIS_PROFILE=explore
# (environment variable) draws many more examples
_quiet_checks = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=_quiet_checks, database=None)
settings.register_profile("explore", max_examples=200, deadline=None,
                          suppress_health_check=_quiet_checks)
settings.load_profile(os.environ.get("SCLDIFF_HYPOTHESIS_PROFILE", "ci"))
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def small_pbmc(n_cells: int = 400, n_genes: int = 600, seed: int = 0):
    """PBMC3K cells (labels with at least 2 of them), the genes with most counts; raw."""
    adata = scldiff.datasets.pbmc3k()
    rng = np.random.default_rng(seed)
    keep = rng.choice(adata.n_obs, n_cells, replace=False)
    adata = adata[np.sort(keep)].copy()
    totals = np.asarray(adata.X.sum(0)).ravel()
    adata = adata[:, np.sort(np.argsort(-totals)[:n_genes])].copy()
    sc.pp.filter_cells(adata, min_counts=1)
    # setup_anndata refuses labels with a single cell; a small sample can draw one
    keep = adata.obs["cell_type"].map(adata.obs["cell_type"].value_counts()).to_numpy() > 1
    adata = adata[keep].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
    return adata


@pytest.fixture
def pbmc_small():
    return small_pbmc()


@pytest.fixture(scope="session")
def trained_model():
    scvi.settings.seed = 0
    adata = small_pbmc()
    scldiff.LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=10, n_lpe=8)
    model = scldiff.LapDDPM(adata, n_latent=8, n_hidden=64, score_hidden=64, score_blocks=2)
    model.train(max_epochs_vae=8, max_epochs_diffusion=20, **QUIET)
    return model
