"""Evaluation metrics against hand-computed values."""

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from scldiff.metrics import (
    classifier_auc,
    count_diagnostics,
    evaluate,
    library_coupling,
    marker_overlap,
    mmd_rbf,
    shared_pca,
    tstr_f1,
    wasserstein,
)


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


def test_classifier_auc_is_one_for_separable_and_half_for_identical_distributions():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 10))
    assert classifier_auc(real, real + 10.0, n_pcs=5) == pytest.approx(1.0)
    same = classifier_auc(real, rng.normal(size=(150, 10)), n_pcs=5)
    assert 0.4 < same < 0.6
    # the larger set is subsampled; too few cells for the folds is an error
    assert 0.4 < classifier_auc(real, rng.normal(size=(400, 10)), n_pcs=5) < 0.6
    with pytest.raises(ValueError, match="n_folds"):
        classifier_auc(real[:3], real[:3])


def test_tstr_f1_hand_computed():
    rng = np.random.default_rng(0)
    centres = {"a": 0.0, "b": 10.0, "c": 20.0}
    labels = np.repeat(list(centres), 30)
    real = np.array([centres[x] for x in labels])[:, None] + rng.normal(size=(90, 2))
    generated = np.array([centres[x] for x in labels])[:, None] + rng.normal(size=(90, 2))
    assert tstr_f1(generated, labels, real, labels) == pytest.approx(1.0)
    # generator that swaps a and b: per-label F1 is 0, 0, 1 -> macro 1/3
    swapped = np.array([{"a": "b", "b": "a"}.get(x, x) for x in labels])
    assert tstr_f1(generated, swapped, real, labels) == pytest.approx(1 / 3)


def test_count_diagnostics_hand_computed():
    real = sp.csr_matrix(np.array([[1, 0, 3], [0, 2, 0]], dtype=float))
    generated = sp.csr_matrix(np.array([[2, 0, 6], [0, 4, 0]], dtype=float))
    d = count_diagnostics(real, generated)
    assert d["median library size (real)"] == 3.0
    assert d["median library size (generated)"] == 6.0
    assert d["median library relative error"] == pytest.approx(1.0)
    assert d["mean zero fraction (real)"] == pytest.approx(0.5)
    assert d["zeros per cell KS"] == 0.0  # same zeros per cell
    # libraries {2, 4} vs {4, 8}: the ECDFs differ by at most 1/2 (on [2, 4) and [4, 8))
    assert d["library size KS"] == 0.5
    mean_r, mean_g = np.array([0.5, 1.0, 1.5]), np.array([1.0, 2.0, 3.0])
    var_r = np.array([0.25, 1.0, 2.25])
    assert d["gene mean correlation"] == pytest.approx(
        np.corrcoef(np.log1p(mean_r), np.log1p(mean_g))[0, 1])
    assert d["gene variance correlation"] == pytest.approx(
        np.corrcoef(np.log1p(var_r), np.log1p(4 * var_r))[0, 1])
    # Pearson correlations do not change when every count doubles
    assert d["gene-gene correlation error"] == pytest.approx(0.0, abs=1e-12)
    flipped = count_diagnostics(real, sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3]], float)))
    assert flipped["gene-gene correlation error"] == pytest.approx(0.0, abs=1e-12)
    anti = count_diagnostics(real, sp.csr_matrix(np.array([[1, 2, 0], [0, 0, 3]], float)))
    # real: corr(g0,g1)=-1, corr(g0,g2)=1, corr(g1,g2)=-1; generated: -1, -1, 1
    assert anti["gene-gene correlation error"] == pytest.approx((0 + 2 + 2) * 2 / 6)


def test_marker_overlap_finds_planted_markers():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(20)]
    labels = np.repeat(["a", "b"], 40)

    def data(markers_a, markers_b):
        x = rng.poisson(1.0, size=(80, 20)).astype(float)
        x[:40, markers_a] += 20
        x[40:, markers_b] += 20
        return np.log1p(x)

    real = data([0, 1, 2], [3, 4, 5])
    same = marker_overlap(real, labels, data([0, 1, 2], [3, 4, 5]), labels, genes, ["a", "b"], 3)
    assert same == {"a": 1.0, "b": 1.0}
    moved = marker_overlap(real, labels, data([0, 1, 9], [10, 11, 12]), labels, genes,
                           ["a", "b"], 3)
    assert moved["a"] == pytest.approx(2 / 3) and moved["b"] == 0.0


def test_evaluate_reports_every_metric_and_is_ideal_on_a_copy():
    real = toy_counts(200, 0)
    same = evaluate(real, real.copy(), labels_key="cell_type", n_hvg=40, n_pcs=5, n_markers=10)
    # a fresh sample of the same distribution is indistinguishable (exact copies are not a
    # fair test: each held-out cell's twin sits in the training fold with the other label)
    twin = evaluate(real, toy_counts(200, 1), labels_key="cell_type", n_hvg=40, n_pcs=5,
                    n_markers=10)
    assert 0.35 < twin.loc["RF AUC", "unconditional"] < 0.65
    assert same.loc["TSTR macro F1", "conditional"] == pytest.approx(1.0)
    assert same.loc["marker overlap", "conditional"] == pytest.approx(1.0)
    assert same.loc["gene-gene correlation error", "unconditional"] == pytest.approx(0.0, abs=1e-9)
    assert same.loc["median library relative error", "unconditional"] == 0.0
    # the same cells, the same within-type coupling of library size and state
    assert same.loc["library-expression R2 (generated)", "conditional"] == pytest.approx(
        same.loc["library-expression R2 (real)", "conditional"])
    far = evaluate(real, toy_counts(200, 1, shift=3.0), labels_key="cell_type", n_hvg=40,
                   n_pcs=5, n_markers=10)
    # 4x the counts: normalisation removes the scale, the lower Poisson noise is still found
    assert far.loc["RF AUC", "unconditional"] > 0.8
    unlabelled = evaluate(real, real.copy(), n_hvg=40, n_pcs=5)
    assert "TSTR macro F1" not in unlabelled.index and "conditional" not in unlabelled.columns
    with pytest.raises(ValueError, match="labels_key 'nope'"):
        evaluate(real, real.copy(), labels_key="nope", n_hvg=40, n_pcs=5)


def test_evaluate_keeps_torch_thread_count():
    # scanpy's Seurat-v3 selection runs numba-parallel code, whose OpenMP layer resets the
    # process's OpenMP thread count (torch's) to numba's own
    import numba
    import torch

    before = torch.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: nothing would change the count")
    try:
        torch.set_num_threads(1)
        evaluate(toy_counts(200, 0), toy_counts(200, 1), labels_key="cell_type", n_hvg=40,
                 n_pcs=5, n_markers=10)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_library_coupling_is_the_adjusted_r2_within_labels():
    rng = np.random.default_rng(0)
    n = 400
    pcs = rng.normal(size=(n, 12))
    labels = np.repeat(["a", "b", "c"], [200, 180, 20])  # "c": too few cells, left out
    log_library = 7.0 + rng.normal(size=n) * 0.3
    log_library[labels == "a"] = 7.0 + 0.5 * pcs[labels == "a", 0]  # exactly linear: 1
    value = library_coupling(pcs, np.exp(log_library), labels, n_pcs=10, min_cells=30)
    # hand-computed for "b": least squares on an intercept and 10 components
    rows = labels == "b"
    design = np.c_[np.ones(rows.sum()), pcs[rows, :10]]
    y = log_library[rows]
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    r2 = 1 - (residual**2).sum() / ((y - y.mean()) ** 2).sum()
    adjusted = 1 - (1 - r2) * (180 - 1) / (180 - 10 - 1)
    assert value == pytest.approx((200 * 1.0 + 180 * adjusted) / 380)
    # an independent library explains nothing: the adjusted R2 is about 0, not above
    noise = library_coupling(rng.normal(size=(20_000, 10)), np.exp(rng.normal(size=20_000)))
    assert abs(noise) < 0.002
    assert np.isnan(library_coupling(pcs[:10], np.ones(10), min_cells=30))
    with pytest.raises(ValueError, match="one row per cell"):
        library_coupling(pcs, np.ones(5))
