"""The library-size model against known answers: its fit recovers a known regression, its
draws follow interpolated quantile functions, and it saves as plain numbers."""

import numpy as np
import pytest
import torch
from scipy import stats

from scldiff.model import LibrarySizeModel
from scldiff.model._library import interpolated_draws


def _regression_data(n: int, rng: np.random.Generator):
    """Latents, labels and log library sizes of a known per-label linear-Gaussian model."""
    coef = np.array([0.3, -0.2, 0.1, 0.0])
    intercept = np.array([7.0, 8.0, 6.5, 0.0])  # label 3 has no cells
    std = np.array([0.2, 0.3, 0.25, 0.0])
    labels = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 4)) + labels[:, None]  # label means differ, as in a latent
    log_library = intercept[labels] + z @ coef + std[labels] * rng.normal(size=n)
    return z, labels, log_library, coef, intercept, std


def _quantile_std(quantiles: np.ndarray) -> float:
    """Standard deviation of the distribution whose quantile function is linear between
    ``quantiles`` (evenly spaced probabilities), by a fine grid."""
    values = np.interp(np.linspace(0, 1, 200_001), np.linspace(0, 1, quantiles.size), quantiles)
    return float(values.std())


def test_interpolated_draws_follow_the_interpolated_empirical_distribution():
    values = np.log(np.array([100.0, 150.0, 400.0, 1000.0, 5000.0]))
    quantiles = np.stack([np.quantile(values, np.linspace(0, 1, 101)), np.full(101, 2.0)])
    rows = torch.tensor(quantiles)[np.r_[np.zeros(200_000, int), np.ones(10, int)]]
    draws = interpolated_draws(rows, torch.Generator().manual_seed(0)).numpy()
    first = draws[:200_000]
    # inverse transform of the linear interpolation of the sorted values: its CDF is
    # piecewise linear through (value_i, i / 4), so each interval between two training
    # values holds a quarter of the draws, uniformly
    assert first.min() >= values[0] and first.max() <= values[-1]
    shares = np.histogram(first, bins=values)[0] / first.size
    np.testing.assert_allclose(shares, 0.25, atol=0.005)
    inside = first[(first > values[1]) & (first < values[2])]
    assert stats.kstest(inside, stats.uniform(values[1], values[2] - values[1]).cdf).pvalue > 1e-3
    np.testing.assert_array_equal(draws[200_000:], 2.0)  # a one-value label gives that value


def test_fit_recovers_a_known_regression():
    z, labels, y, coef, intercept, std = _regression_data(60_000, np.random.default_rng(0))
    fit = LibrarySizeModel.fit(np.exp(y), labels, 4, z, np.zeros_like(z))
    np.testing.assert_allclose(fit.coef, coef, atol=0.005)
    np.testing.assert_allclose(fit.intercept[:3], intercept[:3], atol=0.01)
    quantiles = fit.residual_quantiles
    assert quantiles.shape == (4, 101) and (np.diff(quantiles, axis=1) >= 0).all()
    for code in range(3):  # normal residuals: quartiles at -+0.674 sd, median at 0
        np.testing.assert_allclose(quantiles[code, [25, 50, 75]],
                                   np.array([-0.6745, 0.0, 0.6745]) * std[code], atol=0.01)
        np.testing.assert_allclose(fit.log_quantiles[code],
                                   np.quantile(y[labels == code], np.linspace(0, 1, 101)))
    np.testing.assert_allclose(fit.log_range, [y.min(), y.max()])
    # a label without cells: the intercept of all cells, the quantiles of all cells
    assert fit.intercept[3] == pytest.approx(y.mean() - z.mean(0) @ fit.coef, abs=1e-6)
    residual = y - fit.intercept[labels] - z @ fit.coef
    np.testing.assert_allclose(quantiles[3], np.quantile(residual, np.linspace(0, 1, 101)),
                               atol=1e-6)
    np.testing.assert_allclose(fit.log_quantiles[3], np.quantile(y, np.linspace(0, 1, 101)))
    # a label with one cell gets all cells' residuals, its intercept through that cell
    one = LibrarySizeModel.fit(np.exp(y[:501]), np.r_[np.zeros(500, dtype=np.int64), 1], 2,
                               z[:501], np.zeros((501, 4)))
    assert one.residual_quantiles[1, -1] > one.residual_quantiles[1, 0]
    assert one.intercept[1] + z[500] @ one.coef == pytest.approx(y[500], abs=1e-6)
    np.testing.assert_allclose(one.log_quantiles[1], y[500])  # its own library size


def test_fit_with_posterior_variances_is_the_fit_to_drawn_latents():
    """With the posterior variances, the fit equals least squares on latents drawn from
    the posteriors N(z, z_var), in expectation, and its residuals are those of such draws:
    checked against 300 draws per cell."""
    rng = np.random.default_rng(1)
    mean, labels, y, *_ = _regression_data(2_000, rng)
    var = rng.uniform(0.1, 1.0, size=mean.shape)
    fit = LibrarySizeModel.fit(np.exp(y), labels, 3, mean, var)
    draws = 300
    drawn = np.repeat(mean, draws, 0) + np.sqrt(np.repeat(var, draws, 0)) * rng.normal(
        size=(mean.shape[0] * draws, mean.shape[1]))
    codes = np.repeat(labels, draws)
    onehot = np.eye(3)[codes]
    solution = np.linalg.lstsq(np.c_[drawn, onehot], np.repeat(y, draws), rcond=None)[0]
    np.testing.assert_allclose(fit.coef, solution[:4], atol=0.004)
    np.testing.assert_allclose(fit.intercept, solution[4:], atol=0.01)
    residual = np.repeat(y, draws) - np.c_[drawn, onehot] @ solution
    grid = np.linspace(0, 1, 101)
    for code in range(3):
        quantiles = fit.residual_quantiles[code]
        assert _quantile_std(quantiles) == pytest.approx(residual[codes == code].std(),
                                                         rel=0.02)
        np.testing.assert_allclose(quantiles[10:91],
                                   np.quantile(residual[codes == code], grid)[10:91],
                                   atol=0.02)
    # drawn latents attenuate the slopes against the means' own fit
    plain = LibrarySizeModel.fit(np.exp(y), labels, 3, mean, np.zeros_like(var))
    assert (np.abs(fit.coef) <= np.abs(plain.coef) + 1e-9).all()


def test_draws_follow_the_regression_and_skewed_residuals_clipped_to_the_range():
    grid = np.linspace(0, 1, 101)
    skewed = np.quantile(np.random.default_rng(2).gamma(2.0, 0.2, 200_000) - 0.4, grid)
    normal = 0.1 * stats.norm.ppf(np.clip(grid, 1e-4, 1 - 1e-4))
    fit = LibrarySizeModel(log_quantiles=np.stack([np.full(101, 5.0), grid + 6.0]),
                           coef=np.array([0.5, -1.0]), intercept=np.array([7.0, 5.0]),
                           residual_quantiles=np.stack([normal, skewed]),
                           log_range=np.array([4.0, 9.0]), effects=np.array([6.0]),
                           effect_sizes=np.zeros(0), centred_quantiles=normal)
    z = torch.tensor([[1.0, 0.5], [0.0, -1.0]]).repeat(100_000, 1)
    labels = torch.tensor([0, 1]).repeat(100_000)
    log_library = fit.draw("latent", z, labels, torch.Generator().manual_seed(0)).log()
    first, second = log_library[0::2].double().numpy(), log_library[1::2].double().numpy()
    assert np.median(first) == pytest.approx(7.0 + 0.5 - 0.5, abs=0.002)
    assert first.std() == pytest.approx(_quantile_std(normal), rel=0.01)
    # the skewed residuals keep their shape: quantiles of the draws are the table's, shifted
    np.testing.assert_allclose(np.quantile(second, [0.1, 0.5, 0.9]),
                               6.0 + np.interp([0.1, 0.5, 0.9], grid, skewed), atol=0.005)
    assert log_library.min() >= 4.0 - 1e-5 and log_library.max() <= 9.0 + 1e-5
    fit.log_range = np.array([6.0, 6.5])
    clipped = fit.draw("latent", z, labels, torch.Generator().manual_seed(0)).log()
    assert clipped.min().item() >= 6.0 - 1e-5 and clipped.max().item() <= 6.5 + 1e-5
    # by label: the label's quantile function, whatever the latent
    by_label = fit.draw("label", z, labels, torch.Generator().manual_seed(0)).log()
    np.testing.assert_allclose(by_label[0::2].numpy(), 5.0, rtol=1e-6)
    second = by_label[1::2].double().numpy()
    assert stats.kstest(second, stats.uniform(6.0, 1.0).cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="library_size must be one of"):
        fit.draw("diffusion", z, labels)


def test_the_model_round_trips_through_plain_lists_and_refuses_damage():
    z, labels, y, *_ = _regression_data(500, np.random.default_rng(3))
    fit = LibrarySizeModel.fit(np.exp(y), labels, 4, z, np.full_like(z, 0.1))
    values = fit.to_dict()
    assert all(isinstance(v, list) for v in values.values())
    back = LibrarySizeModel.from_dict(values, n_latent=4, n_labels=4)
    for name, value in values.items():
        np.testing.assert_array_equal(getattr(back, name), np.asarray(value))
    for damaged, message in (({**values, "coef": [0.0]}, "shape"),
                             ({**values, "intercept": [1.0, 2.0, float("inf"), 0.0]}, "finite"),
                             ({**values, "log_range": [9.0, 4.0]}, "ordered"),
                             ({**values, "residual_quantiles": [list(reversed(r)) for r in
                                                                values["residual_quantiles"]]},
                              "non-decreasing"),
                             ({**values, "coef": ["a"] * 4}, "not numbers"),
                             ({"coef": values["coef"]}, "fields")):
        with pytest.raises(ValueError, match=message):
            LibrarySizeModel.from_dict(damaged, n_latent=4, n_labels=4)


def test_an_unseen_combination_gets_the_additive_effects_of_its_attributes():
    """log library = 6 + type effect + condition effect + noise; the combination (type 1,
    condition 1) is never seen. Drawn for it (the last group), the median is the sum of the
    effects learned from the other combinations; a seen one keeps its own group."""
    rng = np.random.default_rng(0)
    type_effect, condition_effect = np.array([0.0, -0.8, 0.5]), np.array([0.0, 0.6])
    codes = np.stack([rng.integers(0, 3, 20_000), rng.integers(0, 2, 20_000)], 1)
    codes = codes[~((codes[:, 0] == 1) & (codes[:, 1] == 1))]
    y = 6.0 + type_effect[codes[:, 0]] + condition_effect[codes[:, 1]] + \
        0.2 * rng.standard_normal(len(codes))
    groups = codes[:, 0] * 2 + codes[:, 1]  # 0..5; group 3 = (1, 1) has no cells
    groups = np.where(groups > 3, groups - 1, groups)  # seen combinations 0..4, unseen 5
    z = np.zeros((len(codes), 2))
    fit = LibrarySizeModel.fit(np.exp(y), groups, 6, z, np.zeros_like(z), codes=codes,
                               n_categories=[3, 2])
    np.testing.assert_allclose(fit.effects[0] + fit.effects[2] + fit.effects[5], 6.0 - 0.8 + 0.6,
                               atol=0.01)
    n = 50_000
    draw = lambda group, code: fit.draw(
        "latent", torch.zeros(n, 2), torch.full((n,), group),
        torch.Generator().manual_seed(1), torch.tensor([code]).repeat(n, 1)).log().numpy()
    assert np.median(draw(5, [1, 1])) == pytest.approx(5.8, abs=0.01)
    assert np.std(draw(5, [1, 1])) == pytest.approx(0.2, abs=0.01)
    assert np.median(draw(0, [0, 0])) == pytest.approx(6.0, abs=0.01)  # a seen group: its own
    back = LibrarySizeModel.from_dict(fit.to_dict(), n_latent=2, n_labels=6)
    np.testing.assert_array_equal(back.effects, fit.effects)
