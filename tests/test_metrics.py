"""Evaluation metrics against hand-computed values."""

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from scldiff.metrics import evaluate, mmd_rbf, shared_pca, wasserstein


def test_mmd_matches_a_hand_computation():
    x = np.array([[0.0], [1.0]])
    y = np.array([[0.0], [3.0]])
    k = lambda d2: sum(np.exp(-d2 / (2 * s**2)) for s in (1.0, 10.0))
    kxx = (2 * k(0.0) + 2 * k(1.0)) / 4
    kyy = (2 * k(0.0) + 2 * k(9.0)) / 4
    kxy = (k(0.0) + k(9.0) + k(1.0) + k(4.0)) / 4
    assert mmd_rbf(x, y, sigmas=(1.0, 10.0)) == pytest.approx(kxx + kyy - 2 * kxy)
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    # CFGen truncates to the smaller set
    assert mmd_rbf(x, np.vstack([y, [[50.0]]]), (1.0, 10.0)) == pytest.approx(kxx + kyy - 2 * kxy)


def test_wasserstein_matches_brute_force_assignment():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 1.0
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    best2 = min(np.mean([d2[i, p[i]] for i in range(5)]) for p in itertools.permutations(range(5)))
    best1 = min(np.mean([np.sqrt(d2[i, p[i]]) for i in range(5)])
                for p in itertools.permutations(range(5)))
    assert wasserstein(x, y, power=2) == pytest.approx(np.sqrt(best2))
    assert wasserstein(x, y, power=1) == pytest.approx(best1)


def test_wasserstein_of_shifted_point_clouds_is_the_shift():
    x = np.random.default_rng(1).normal(size=(200, 2))
    assert wasserstein(x, x + np.array([3.0, 4.0]), power=2) == pytest.approx(5.0)


def toy_counts(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b"])[rng.integers(0, 2, n)]
    rates = np.where((labels == "a")[:, None], 5.0, 1.0) * np.linspace(0.2, 3, 60)[None, :]
    rates = rates * (1 + shift)
    adata = AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(60)]
    adata.obs_names = [f"c{seed}_{i}" for i in range(n)]
    adata.obs["cell_type"] = pd.Categorical(labels)
    return adata


def test_shared_pca_fits_on_real_and_projects_generated():
    real, gen = toy_counts(120, 0), toy_counts(80, 1)
    pcs_real, pcs_gen = shared_pca(real, gen, n_hvg=40, n_pcs=5)
    assert pcs_real.shape == (120, 5) and pcs_gen.shape == (80, 5)
    np.testing.assert_allclose(pcs_real.mean(0), 0, atol=1e-5)  # centred on the real cells
    same_real, same_gen = shared_pca(real, real, n_hvg=40, n_pcs=5)
    np.testing.assert_allclose(same_real, same_gen)


def test_evaluate_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = toy_counts(150, 0)
    same = evaluate(real, real.copy(), labels_key="cell_type", n_hvg=40, n_pcs=5)
    assert same.loc["W2", "conditional"] == pytest.approx(0.0, abs=1e-6)
    assert same.loc["MMD", "unconditional"] == pytest.approx(0.0, abs=1e-9)
    near = evaluate(real, toy_counts(150, 1), labels_key="cell_type", n_hvg=40, n_pcs=5)
    far = evaluate(real, toy_counts(150, 1, shift=1.0), labels_key="cell_type", n_hvg=40,
                   n_pcs=5)
    for metric in ("MMD", "W2", "W1"):
        assert far.loc[metric, "conditional"] > near.loc[metric, "conditional"] > 0
    lib_real = np.median(np.asarray(real.X.sum(1)))
    assert same.loc["median library size (real)", "unconditional"] == lib_real


def test_evaluate_refuses_mismatched_genes():
    real, gen = toy_counts(50, 0), toy_counts(50, 1)
    with pytest.raises(ValueError, match="same var_names"):
        evaluate(real, gen[:, :30].copy())
