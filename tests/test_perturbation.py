"""Perturbation prediction: the metrics against hand-computed values, the counterfactual's
output, identity at strength 0, reproducibility, the draws' intervals, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from scipy.stats import energy_distance

from scldiff import LapDDPM
from scldiff.graph import log_normalize
from scldiff.metrics import (
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

from .conftest import QUIET, small_pbmc
from .test_reliability import fingerprint


# ------------------------------------------------------------------------------ metrics
def _cells_with_means(means, n: int = 4) -> np.ndarray:
    """``n`` cells whose column means are ``means`` (a symmetric spread around them)."""
    means = np.asarray(means, dtype=np.float64)
    spread = np.linspace(-1, 1, n)[:, None]
    return means + spread


def test_mean_r2_is_the_squared_correlation_of_the_means():
    # means (1, 2, 3) and (1, 2, 4): r = 3 / sqrt(2 * 42/9), r^2 = 81/84
    pred, real = _cells_with_means([1, 2, 3]), _cells_with_means([1, 2, 4])
    assert mean_r2(pred, real) == pytest.approx(81 / 84)
    assert mean_r2(pred, real, genes=[0, 1]) == pytest.approx(1.0)


def test_pearson_delta_scores_the_change_from_control():
    control = _cells_with_means([1, 1, 1, 1])
    real = _cells_with_means([2, 0, 1, 3])  # change (1, -1, 0, 2)
    assert pearson_delta(_cells_with_means([3, -1, 1, 5]), real, control) == pytest.approx(1)
    assert pearson_delta(_cells_with_means([0, 2, 1, -1]), real, control) == pytest.approx(-1)
    assert np.isnan(pearson_delta(control, real, control))  # no change predicted


def test_e_distance_by_hand_and_against_scipy_in_one_dimension():
    assert e_distance([[0.0]], [[1.0]]) == pytest.approx(2.0)
    # x = {0, 2}, y = {1}: 2 * 1 - mean(0, 2, 2, 0) - 0 = 1
    assert e_distance([[0.0], [2.0]], [[1.0]]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(1.0, 2.0, size=20)
    # scipy's energy distance is the square root of the same V-statistic
    assert e_distance(x[:, None], y[:, None]) == pytest.approx(energy_distance(x, y) ** 2)
    assert e_distance(x[:, None], x[:, None]) == pytest.approx(0.0, abs=1e-12)


def test_top_de_genes_finds_genes_changed_either_way_and_the_overlaps():
    rng = np.random.default_rng(0)
    control = rng.normal(2.0, 0.3, size=(60, 8))
    real = rng.normal(2.0, 0.3, size=(60, 8))
    real[:, 3] += 2.0  # up
    real[:, 5] -= 1.5  # down
    assert set(top_de_genes(real, control, 2).tolist()) == {3, 5}
    assert de_overlap(real, real, control, 2) == 1.0
    wrong = control.copy()
    wrong[:, 0] += 2.0
    wrong[:, 1] += 2.0
    assert de_overlap(wrong, real, control, 2) == 0.0


def test_direction_agreement_by_hand():
    control = _cells_with_means([0, 0, 0])
    real = _cells_with_means([1, -1, 1])
    assert direction_agreement(_cells_with_means([1, 1, 2]), real, control) == \
        pytest.approx(2 / 3)
    assert direction_agreement(_cells_with_means([1, 1, 2]), real, control, genes=[0, 2]) == 1


def test_response_intervals_by_hand():
    # draw 0 has means (1, 2), draw 1 (5, 6): the central 50% interval is the quartiles
    x = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=float)
    out = response_intervals(x, np.array([0, 0, 1, 1]), source=np.ones((3, 2)), level=0.5,
                             resample_cells=False)
    np.testing.assert_allclose(out["mean"], [3, 4])
    np.testing.assert_allclose(out["mean_low"], [2, 3])
    np.testing.assert_allclose(out["mean_high"], [4, 5])
    np.testing.assert_allclose(out["log_fold_change"], [2, 3])
    np.testing.assert_allclose(out["log_fold_change_low"], [1, 2])
    # resampling the cells of each draw widens the interval on average
    rng = np.random.default_rng(0)
    y = rng.normal(size=(400, 50))
    draws = np.repeat(np.arange(20), 20)
    plain = response_intervals(y, draws, resample_cells=False)
    resampled = response_intervals(y, draws, resample_cells=True)
    width = lambda f: (f["mean_high"] - f["mean_low"]).mean()
    assert width(resampled) > 1.2 * width(plain)


def test_response_intervals_refuse_bad_input():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="one entry per cell"):
        response_intervals(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="at least two draws"):
        response_intervals(x, np.zeros(4))
    with pytest.raises(ValueError, match="level"):
        response_intervals(x, np.array([0, 0, 1, 1]), level=1.0)


def test_interval_coverage_by_hand():
    assert interval_coverage([0, 0, 0], [1, 1, 1], [0.5, 2, 1]) == pytest.approx(2 / 3)


def test_perturbation_scores_of_the_truth_and_of_no_change():
    rng = np.random.default_rng(1)
    control = rng.gamma(2.0, 1.0, size=(80, 120))
    real = rng.gamma(2.0, 1.0, size=(80, 120))
    real[:, :10] += 1.5
    perfect = perturbation_scores(real, real, control, n_genes=20, n_pcs=10)
    assert perfect["R2 top DE"] == pytest.approx(1.0)
    assert perfect["Pearson delta"] == pytest.approx(1.0)
    assert perfect["E-distance"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["DE overlap"] == 1.0 and perfect["direction agreement"] == 1.0
    none = perturbation_scores(control, real, control, n_genes=20, n_pcs=10)
    assert none["E-distance"] > 0.5 and none["direction agreement"] == 0.0


# -------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def perturbation_model():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=240, n_genes=150)
    rng = np.random.default_rng(0)
    adata.obs["condition"] = pd.Categorical(rng.choice(["ctrl", "stim"], adata.n_obs))
    adata.obs["dose"] = rng.uniform(0.0, 10.0, adata.n_obs)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", categorical_covariate_keys=[
        "condition"], continuous_covariate_keys=["dose"], n_neighbors=6, n_lpe=2)
    model = LapDDPM(adata, n_latent=4, n_hidden=32, score_hidden=32, score_blocks=1,
                    decoder_covariates=False)
    model.train(max_epochs_vae=10, max_epochs_diffusion=5, **QUIET)
    return model


def _controls(model) -> np.ndarray:
    return np.flatnonzero(model.adata.obs["condition"] == "ctrl")[:40]


@pytest.mark.parametrize("method", ["noise", "inversion"])
def test_counterfactual_output(perturbation_model, method):
    model, cells = perturbation_model, _controls(perturbation_model)
    out = model.predict_perturbation(model.adata, "condition", "stim", indices=cells,
                                     n_draws=3, seed=1, method=method)
    assert out.shape == (3 * cells.size, model.adata.n_vars)
    assert list(out.var_names) == list(model.adata.var_names)
    assert (out.obs["condition"] == "stim").all()
    assert list(out.obs["condition"].cat.categories) == ["ctrl", "stim"]
    np.testing.assert_array_equal(out.obs["source_cell"],
                                  np.tile(model.adata.obs_names[cells], 3))
    np.testing.assert_array_equal(out.obs["draw"], np.repeat([0, 1, 2], cells.size))
    np.testing.assert_array_equal(out.obs["cell_type"],
                                  np.tile(model.adata.obs["cell_type"].iloc[cells], 3))
    assert out.obs["synthetic"].all() and out.obs_names.is_unique
    assert not any(c.startswith("_scvi") for c in out.obs.columns)
    counts = out.layers["counts"]
    assert sp.issparse(counts) and np.all(counts.data == np.round(counts.data))
    assert out.obsm["X_scldiff"].shape == (out.n_obs, 4)
    info = out.uns["scldiff"]
    assert (info["covariate"], info["to"], info["method"], info["n_draws"]) == \
        ("condition", "stim", method, 3)
    assert info["strength"] == 0.5 and info["unseen_combinations"] == []
    assert info["guidance"] == "compositional"
    assert info["guidance_scale"] == {"cell_type": 1.0, "condition": 3.0, "dose": 1.0}
    assert (out.var["mean_low"] <= out.var["mean_high"]).all()
    lognorm = log_normalize(out.X)
    np.testing.assert_allclose(out.var["mean"], np.asarray(lognorm.mean(0)).ravel(),
                               rtol=1e-5)
    np.testing.assert_allclose(
        out.var["log_fold_change"], out.var["mean"]
        - np.asarray(log_normalize(model.adata.X[cells]).mean(0)).ravel(), atol=1e-5)
    np.testing.assert_allclose(out.var["log_fold_change_high"] - out.var["log_fold_change_low"],
                               out.var["mean_high"] - out.var["mean_low"], atol=1e-9)


def test_identity_at_strength_zero(perturbation_model):
    # strength 0 leaves each cell's latent a draw from its own posterior
    model, cells = perturbation_model, _controls(perturbation_model)
    out = model.predict_perturbation(model.adata, "condition", "stim", strength=0,
                                     indices=cells, seed=2)
    mean, logvar = model._posterior(model._collator(), cells)
    residual = (out.obsm["X_scldiff"] - mean.numpy()) / np.exp(0.5 * logvar.numpy())
    assert abs(residual.mean()) < 0.2 and 0.8 < residual.std() < 1.2
    # the decoder does not read the condition: the cells keep their own counts, exactly
    observed = model.adata.X[cells]
    assert (out.X != observed).nnz == 0
    fresh = model.predict_perturbation(model.adata, "condition", "stim", strength=0,
                                       indices=cells, seed=2, keep_noise=False)
    assert (fresh.X != observed).nnz > 0 and fresh.uns["scldiff"]["keep_noise"] is False
    far = model.predict_perturbation(model.adata, "condition", "stim", strength=1.0,
                                     indices=cells, seed=2)
    moved = lambda o: np.linalg.norm(o.obsm["X_scldiff"] - mean.numpy(), axis=1).mean()
    assert moved(far) > 1.5 * moved(out)


def test_counterfactuals_are_reproducible(perturbation_model):
    model, cells = perturbation_model, _controls(perturbation_model)
    run = lambda seed: model.predict_perturbation(model.adata, "condition", "stim",
                                                  indices=cells, seed=seed)
    a, b, c = run(5), run(5), run(6)
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0


def test_counterfactual_of_a_continuous_covariate(perturbation_model):
    model, cells = perturbation_model, _controls(perturbation_model)
    out = model.predict_perturbation(model.adata, "dose", 5.0, indices=cells, seed=0)
    assert (out.obs["dose"] == 5.0).all() and out.uns["scldiff"]["to"] == 5.0
    with pytest.warns(UserWarning, match="outside the training range"):
        model.predict_perturbation(model.adata, "dose", 50.0, indices=cells, seed=0)


BAD = {
    "unknown covariate": ({"covariate": "donor", "to": "d1"}, "not an attribute"),
    "unknown value": ({"covariate": "condition", "to": "never"}, "not a category"),
    "strength above 1": ({"covariate": "condition", "to": "stim", "strength": 1.5},
                         "strength"),
    "bad method": ({"covariate": "condition", "to": "stim", "method": "bridge"}, "method"),
    "no draws": ({"covariate": "condition", "to": "stim", "n_draws": 0}, "n_draws"),
    "text for a dose": ({"covariate": "dose", "to": "high"}, "finite number"),
    "level of 1": ({"covariate": "condition", "to": "stim", "n_draws": 2, "level": 1.0},
                   "level"),
    "no cells": ({"covariate": "condition", "to": "stim", "indices": np.array([], int)},
                 "No cells"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_refused_and_leave_the_input(perturbation_model, case):
    model = perturbation_model
    before = fingerprint(model.adata)
    kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        model.predict_perturbation(model.adata, **{"indices": _controls(model), **kwargs})
    assert fingerprint(model.adata) == before


def test_cells_without_counts_and_unseen_input_categories_are_refused(perturbation_model):
    model = perturbation_model
    empty = model.adata.copy()
    x = empty.X.tolil()
    x[3] = 0
    empty.X = sp.csr_matrix(x)
    before = fingerprint(empty)
    with pytest.raises(ValueError, match="have no counts"):
        model.predict_perturbation(empty, "condition", "stim", indices=[1, 3])
    assert fingerprint(empty) == before
    other = model.adata.copy()
    other.obs["condition"] = pd.Categorical(["other"] * other.n_obs)
    before = fingerprint(other)
    with pytest.raises(ValueError, match=r"values the model was not trained on: \['other'\]"):
        model.predict_perturbation(other, "condition", "stim", indices=[0])
    assert fingerprint(other) == before


def test_a_decoder_that_reads_the_covariate_is_warned_of():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=120, n_genes=80)
    adata.obs["condition"] = pd.Categorical(
        np.random.default_rng(0).choice(["ctrl", "stim"], adata.n_obs))
    LapDDPM.setup_anndata(adata, labels_key="cell_type", categorical_covariate_keys=[
        "condition"], n_neighbors=5, n_lpe=2)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
    model.train(max_epochs_vae=1, max_epochs_diffusion=1, **QUIET)
    with pytest.warns(UserWarning, match="decoder reads 'condition'"):
        out = model.predict_perturbation(adata, "condition", "stim", indices=[0, 1], seed=0)
    assert out.n_obs == 2
