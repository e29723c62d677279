"""The count sampler: draws against scipy's probability mass functions, the exactness of its
decisions, its compiled kernels against numpy and torch, and the module's chunked decoding."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

import scldiff.module._module as module_file
from scldiff.distributions import CountParams
from scldiff.module import CountDecoder, LapDDPMModule
from scldiff.sampling import draw_counts, transport_counts
from scldiff.sampling._kernels import (
    TICKS,
    entry_uniforms,
    exp_f32,
    inverse_cdf,
    preselect_logits,
)
from scldiff.sampling._torch import BOUND_SLACK, csr_from_tensors, inverse_cdf_draws, to_host


def _generator(backend, seed):
    """numpy draws (the CPU's kernels), or torch draws (a GPU's path, here on the CPU)."""
    return (np.random.default_rng(seed) if backend == "numpy"
            else torch.Generator().manual_seed(seed))


def _params(likelihood, mu, theta, pi, n):
    """``n`` cells of the same means ``mu`` (as logits, with the library that gives them
    back), inverse dispersions and dropout probabilities; and that library."""
    expand = lambda values: torch.tensor(values, dtype=torch.float32).expand(n, -1)  # noqa
    library = ((1 - pi) * mu).sum() if likelihood == "zinb" else mu.sum()
    params = CountParams(
        likelihood, expand(np.log(mu)),
        None if likelihood == "poisson" else torch.tensor(np.log(theta), dtype=torch.float32),
        expand(np.log(pi + 1e-12) - np.log1p(-pi)) if likelihood == "zinb" else None)
    return params, torch.full((n, 1), float(library))


def _chi_square_pvalue(values, pmf, n):
    """A chi-square test of draws against a pmf, the tail pooled so that every bin expects
    at least 20 draws."""
    expected, observed, acc_e, acc_o = [], [], 0.0, 0
    for k in range(pmf.size):
        acc_e += n * pmf[k]
        acc_o += int((values == k).sum())
        if acc_e >= 20:
            expected.append(acc_e)
            observed.append(acc_o)
            acc_e, acc_o = 0.0, 0
    expected.append(n - sum(expected))
    observed.append(n - sum(observed))
    expected, observed = np.array(expected), np.array(observed)
    if expected[-1] < 20:  # merge a small tail into the last bin
        expected[-2:] = [expected[-2] + expected[-1], 0]
        observed[-2:] = [observed[-2] + observed[-1], 0]
        expected, observed = expected[:-1], observed[:-1]
    if expected.size < 2:
        return 1.0 if observed[0] == n else 0.0
    chi2 = ((observed - expected) ** 2 / expected).sum()
    return stats.chi2.sf(chi2, expected.size - 1)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_sampled_counts_follow_the_scipy_pmf(likelihood, backend):
    # means on both sides of the inverse-CDF / Gamma-Poisson switch, tiny and large
    # dispersions; each column has its own parameters, 40,000 cells each
    mu = np.array([1e-3, 0.05, 0.7, 3.0, 9.9, 10.1, 40.0, 300.0])
    theta = np.array([0.05, 2.0, 0.3, 50.0, 1.5, 0.2, 8.0, 3.0])
    pi = np.array([0.0, 0.1, 0.5, 0.2, 0.0, 0.3, 0.05, 0.6])
    n = 40_000
    params, library = _params(likelihood, mu, theta, pi, n)
    counts = draw_counts(params, library, _generator(backend, 3))
    assert sp.isspmatrix_csr(counts) and counts.dtype == np.float32
    counts.check_format(full_check=True)
    counts = counts.toarray()
    assert (counts == np.round(counts)).all()
    for g in range(mu.size):
        dist = stats.poisson(mu[g]) if likelihood == "poisson" else \
            stats.nbinom(theta[g], theta[g] / (theta[g] + mu[g]))
        values = counts[:, g].astype(int)
        pmf = dist.pmf(np.arange(values.max() + 2))
        if likelihood == "zinb":
            pmf = (1 - pi[g]) * pmf
            pmf[0] += pi[g]
        assert _chi_square_pvalue(values, pmf, n) > 1e-4, (g, mu[g], theta[g])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_zinb_cells_total_their_library_size(backend):
    torch.manual_seed(0)
    decoder = CountDecoder(3, 50, n_hidden=8, likelihood="zinb")
    with torch.no_grad():
        decoder.dropout_logits.bias.fill_(0.0)  # about half of the counts zeroed
        params = decoder(torch.randn(3000, 3))
    counts = draw_counts(params, torch.full((3000,), 400.0), _generator(backend, 0))
    assert counts.sum(1).mean() == pytest.approx(400.0, rel=0.03)


def test_torch_count_draws_depend_only_on_the_generator():
    params, library = _params("zinb", np.linspace(0.1, 30, 40), np.full(40, 2.0),
                              np.full(40, 0.3), 50)
    first, second = (draw_counts(params, library, torch.Generator().manual_seed(5))
                     for _ in range(2))
    assert (first != second).nnz == 0 and first.nnz > 0
    other = draw_counts(params, library, torch.Generator().manual_seed(6))
    assert (first != other).nnz > 0


class _FixedKey:
    """A numpy Generator whose key for the CPU sampler's uniforms is ``key``."""

    def __init__(self, key: int):
        self.key, self.rng = key, np.random.default_rng(0)

    def integers(self, low, high, dtype):
        return dtype(self.key)

    def __getattr__(self, name):
        return getattr(self.rng, name)


def _poisson_near_their_uniforms(key: int, n_cells: int, n_genes: int):
    """Poisson parameters (logits and libraries) whose probabilities of a nonzero count lie
    just above or just below each entry's uniform under ``key`` (relative 1e-5;
    alternately, and so among the entries with u < 2**-16), and those probabilities as the
    kernel computes them (its float32 exponential, then float64)."""
    ticks, u = entry_uniforms(key, n_cells, n_genes)
    above = np.arange(u.size) % 2 == 0
    small = np.flatnonzero(ticks == 0)
    above[small] = np.arange(small.size) % 2 == 0
    target = np.minimum(u * np.where(above, 1 + 1e-5, 1 - 1e-5), 0.999).reshape(
        n_cells, n_genes)
    logits = np.log(-np.log1p(-target)).astype(np.float32)
    numerators = np.empty_like(logits)
    for i in range(n_cells):
        exp_f32(logits[i] - logits[i].max(), numerators[i])
    library = np.exp(logits.astype(np.float64)).sum(1)
    mean = library[:, None] * numerators / numerators.astype(np.float64).sum(1, keepdims=True)
    params = CountParams("poisson", torch.from_numpy(logits))
    return params, torch.from_numpy(library)[:, None], ticks.reshape(n_cells, n_genes), \
        u.reshape(n_cells, n_genes), -np.expm1(-mean)


def test_zero_decisions_are_exactly_u_below_the_probability_of_a_count():
    # Every entry's probability of a nonzero count lies within 1e-5 (relative) of its own
    # uniform, above or below, so each decision hinges on the float64 comparison. Among
    # 2**18 entries, a few have 16-bit integer part 0 (u < 2**-16, probabilities down to
    # 1e-9): the dense 16-bit test alone would keep them all.
    key = 20261206
    params, library, ticks, u, p = _poisson_near_their_uniforms(key, 64, 4096)
    counts = draw_counts(params, library, _FixedKey(key)).toarray()
    assert ((counts > 0) == (u < p)).all()
    small = ticks == 0
    assert small.sum() >= 2 and (counts[small] > 0).any() and (counts[small] == 0).any()


def test_cpu_sampler_counts_depend_only_on_the_key():
    params, library, *_ = _poisson_near_their_uniforms(7, 16, 300)
    first, second = (draw_counts(params, library, _FixedKey(7)) for _ in range(2))
    assert (first != second).nnz == 0
    assert (first != draw_counts(params, library, _FixedKey(8))).nnz > 0


def test_compiled_exponential_is_float32_exp_to_two_units_in_the_last_place():
    x = np.concatenate([np.linspace(-87.3, 88.3, 2_000_001, dtype=np.float32),
                        np.float32([0.0, -1e-30, 1e-30, 0.5, -0.5])])
    out = np.empty_like(x)
    exp_f32(x, out)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(out - exact) <= 2 * ulp).all()
    assert out[-5] == 1.0
    # clamped to its range [-87.3, 88.3]: exp(-87.3), about float32's smallest normal
    # number, below it (not a subnormal or zero), finite above
    below = np.float32([-88.0, -200.0, -np.inf])
    exp_f32(below, out[:3])
    low = np.exp(np.float64(np.float32(-87.3)))
    assert (out[:3] == out[0]).all() and abs(out[0] / low - 1) < 3e-7
    exp_f32(np.float32([100.0, np.inf]), out[:2])
    assert np.isfinite(out[:2]).all() and (out[:2] > 1e38).all()


def test_entry_uniforms_are_uniform_in_each_of_an_outputs_four_fields():
    # four entries share one SplitMix64 output: each of its 16-bit fields is uniform, and
    # neighbouring entries' integers are uncorrelated, within a row and across rows
    n_cells, n_genes = 64, 4099  # rows that do not end on a whole output
    ticks, u = entry_uniforms(12345, n_cells, n_genes)
    ticks = ticks.reshape(n_cells, n_genes).astype(np.float64)
    assert ticks.max() < TICKS and (u >= ticks.ravel() / TICKS).all()
    assert (u < (ticks.ravel() + 1) / TICKS).all()
    for field in range(4):
        values = ticks[:, field::4].ravel()
        counts = np.bincount((values // 4096).astype(int), minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-4
    flat = ticks.ravel() / TICKS
    for lag in (1, 2, 3, 4, n_genes):
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.01


def test_pre_selection_from_logits_keeps_every_entry_below_its_float64_bound():
    # The kernel computes each row's softmax and 1 - pi itself, with its own float32
    # exponential, and the bound 2**16 E[X] from them. Every entry whose 16-bit integer
    # lies below the bound computed in float64 from the same logits must be kept; none
    # more than the slack (1e-5) and float32's rounding above it may be. Each entry's
    # bound is put near its own integer (relative 3e-5 either way).
    rng = np.random.default_rng(9)
    key, n_cells, n_genes = 31, 64, 4096
    ticks, uniforms = entry_uniforms(key, n_cells, n_genes)
    ticks = ticks.reshape(n_cells, n_genes).astype(np.float64)
    kept = rng.uniform(0.05, 1.0, (n_cells, n_genes))
    target = np.maximum(ticks, 0.5) * (1 + rng.uniform(-3e-5, 3e-5, ticks.shape))
    # E[X] = library * e k / sum(e k) = target / 2**16 with e proportional to target / k
    logits = (np.log(target / kept) + rng.normal(0, 5, (n_cells, 1))).astype(np.float32)
    zi_logits = np.log((1 - kept) / kept).astype(np.float32)
    library = target.sum(1) / TICKS
    # given as the hidden layer's products and the output layer's biases, whose sums (in
    # float32, as the kernel adds them) are the logits
    bias = rng.normal(0, 2, n_genes).astype(np.float32)
    zi_bias = rng.normal(0, 2, n_genes).astype(np.float32)
    products, zi_products = logits - bias, zi_logits - zi_bias
    logits, zi_logits = products + bias, zi_products + zi_bias
    # the reference in float64 from the float32 inputs
    e = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    k = 1.0 / (1.0 + np.exp(zi_logits.astype(np.float64)))
    mean = library[:, None] * e / (e * k).sum(1, keepdims=True)
    bound = TICKS * mean * k
    rows, cols, got_mean, got_kept, u = preselect_logits(
        products, bias, zi_products, zi_bias, library, BOUND_SLACK * TICKS, True,
        np.uint64(key))
    flat = rows * n_genes + cols
    must = np.flatnonzero(ticks < bound)
    may = np.flatnonzero(ticks <= bound * (1 + 1.2e-5))
    assert must.size > n_cells * n_genes // 3 and np.isin(must, flat).all()
    assert np.isin(flat, may).all()
    close = np.abs(ticks - bound) < 1e-5 * bound  # where a looser or tighter bound errs
    assert close.sum() > 1000
    np.testing.assert_allclose(got_mean, mean[rows, cols], rtol=1e-6)
    np.testing.assert_allclose(got_kept, k[rows, cols], rtol=1e-6)
    assert np.array_equal(u, uniforms[flat])
    # NB and Poisson: the softmax alone
    rows, cols, got_mean, got_kept, _ = preselect_logits(
        products, bias, zi_products[:1], zi_bias, library, BOUND_SLACK * TICKS, False,
        np.uint64(key))
    assert got_kept.size == 0
    mean = library[:, None] * e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(got_mean, mean[rows, cols], rtol=1e-6)
    must = np.flatnonzero(ticks < TICKS * mean)
    assert must.size > 1000 and np.isin(must, rows * n_genes + cols).all()


@pytest.mark.parametrize("where", ["logits", "logits_bias", "zi_logits", "zi_bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_cpu_sampler_refuses_non_finite_logits(where, value):
    values = {"logits": torch.zeros(3, 5), "logits_bias": torch.zeros(5),
              "zi_logits": torch.zeros(3, 5), "zi_bias": torch.zeros(5)}
    params = CountParams("zinb", log_theta=torch.zeros(5), **values)
    values[where].view(-1)[2] = value
    with pytest.raises(FloatingPointError, match="not finite"):
        draw_counts(params, torch.full((3, 1), 10.0), np.random.default_rng(0))
    values[where].view(-1)[2] = 0.0
    assert draw_counts(params, torch.full((3, 1), 10.0),
                       np.random.default_rng(0)).shape == (3, 5)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_bf16_products_are_sampled_as_their_float32_values(likelihood):
    # Under bf16 autocast the decoder's products stay bf16, and the CPU kernel widens
    # them as it reads them: the counts must be those of the same values in float32.
    torch.manual_seed(0)
    decoder = CountDecoder(4, 700, n_hidden=8, likelihood=likelihood)
    z, library = torch.randn(40, 4), torch.full((40, 1), 3000.0)
    with torch.no_grad():
        decoder.scale.bias.normal_(0, 2)  # logits spread, so that counts vary
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = decoder(z, bias_apart=True)
        exact = decoder(z, bias_apart=True)
    assert mixed.logits.dtype == torch.bfloat16
    widened = CountParams(likelihood, mixed.logits.float(), mixed.log_theta,
                          None if mixed.zi_logits is None else mixed.zi_logits.float(),
                          mixed.logits_bias, mixed.zi_bias)
    # the bf16 values are not float32's by accident: the float32 products differ
    assert not torch.equal(exact.logits, widened.logits)
    counts = draw_counts(mixed, library, _FixedKey(11))
    assert counts.nnz > 1000
    assert (counts != draw_counts(widened, library, _FixedKey(11))).nnz == 0


def _inverse_cdf_in_thread(mu, theta, p_zero, uniforms=1.0 - 1e-12, seconds=30.0):
    """The CPU kernel's inverse-CDF draws at the CDF levels of ``uniforms`` (by default
    1e-12 below 1) on (P(0), 1); ``theta`` ``None``: Poisson."""
    import threading

    out = np.zeros_like(mu)
    levels = p_zero + (1.0 - p_zero) * uniforms
    has_theta = theta is not None
    worker = threading.Thread(
        target=lambda: inverse_cdf(mu, theta if has_theta else mu, p_zero, levels, has_theta,
                                   10.0, out), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the inverse-CDF loop did not stop"
    return out


def test_inverse_cdf_draws_reach_the_far_tail_exactly():
    # NB(mu=5, theta=1) is geometric: P(X > k) = (5/6)**(k + 1). A uniform u = 1 - 1e-12
    # on (P(0), 1) is the CDF level v = 1 - (5/6) 1e-12, reached at the smallest k with
    # (5/6)**k < 1e-12, i.e. 152
    out = _inverse_cdf_in_thread(np.array([5.0]), np.array([1.0]), np.array([1.0 / 6.0]))
    assert out[0] == 152


def test_inverse_cdf_draws_stop_when_rounding_leaves_the_cdf_short_of_the_uniform():
    # P(0) 1e-7 too small (a float32 rounding): the summed CDF never passes 1 - 1e-7, so a
    # uniform near 1 is never reached. The pmf falls below the CDF's rounding, and the
    # entry must stop there instead of running on (forever, once the pmf is subnormal).
    mu, theta = np.array([5.0, 9.0]), np.array([1.0, 0.05])
    p_zero = (theta / (theta + mu)) ** theta * (1 - 1e-7)
    out = _inverse_cdf_in_thread(mu, theta, p_zero)
    tail_start = [np.log(1e-7) / np.log(5 / 6) - 1, 0]  # where the true CDF passes 1 - 1e-7
    assert np.isfinite(out).all() and (out >= tail_start).all() and (out < 1e5).all()


@pytest.mark.parametrize("poisson", [False, True])
def test_compiled_inverse_cdf_gives_the_vectorised_draws(poisson):
    # the CPU's compiled loop, entry by entry, against the vectorised steps (the torch
    # sampler's) from the same CDF levels: the same float64 arithmetic, the same draws,
    # including long tails (means up to 10, dispersions down to 0.05)
    rng = np.random.default_rng(4)
    n = 50_000
    mu = rng.uniform(0.001, 10.0, n)
    theta = None if poisson else rng.uniform(0.05, 5.0, n)
    p_zero = np.exp(-mu) if poisson else (theta / (theta + mu)) ** theta
    uniforms = rng.random(n)
    uniforms[:50] = 1.0 - 1e-12  # the far tail
    # P(0) rounded 1e-7 low: the summed CDF never reaches a level near 1, and the entries
    # must stop where rounding stalls it (more of them than step one by one at the end)
    p_zero[50:350] *= 1 - 1e-7
    uniforms[50:350] = 1.0 - 1e-9
    vectorised = inverse_cdf_draws(
        torch.from_numpy(mu), None if poisson else torch.from_numpy(theta),
        torch.from_numpy(p_zero), torch.from_numpy(p_zero + (1.0 - p_zero) * uniforms))
    compiled = _inverse_cdf_in_thread(mu, theta, p_zero, uniforms)
    assert np.array_equal(compiled, vectorised.numpy()) and compiled.max() > 30


def test_csr_from_tensors_matches_csr():
    dense = np.random.default_rng(2).poisson(0.3, size=(7, 9)).astype(np.float64)
    dense[3] = 0  # an empty row
    rows, cols = np.nonzero(dense)
    got = csr_from_tensors(torch.from_numpy(rows), torch.from_numpy(cols),
                           torch.from_numpy(dense[rows, cols]), 7, 9)
    got.check_format(full_check=True)
    assert got.dtype == np.float32 and got.indices.dtype == np.int32
    assert (got != sp.csr_matrix(dense)).nnz == 0 and np.array_equal(got.toarray(), dense)
    assert np.array_equal(to_host(torch.arange(5)), np.arange(5))


def _module(n_genes=40, likelihood="nb"):
    torch.manual_seed(0)
    return LapDDPMModule(n_input=n_genes, n_categories=[], n_continuous=0, n_lpe=0, n_latent=3,
                         n_hidden=8, score_hidden=8, score_blocks=1, likelihood=likelihood).eval()


def test_decode_counts_in_chunks_keeps_each_cell_with_its_latent_and_library(monkeypatch):
    monkeypatch.setattr(module_file, "_COUNT_CHUNK", 3)
    module = _module()
    with torch.no_grad():  # distinct proportions per cell, little count noise
        module.decoder.scale.weight.mul_(8.0)
        module.decoder.log_theta.fill_(5.0)
    n = 11
    z = torch.randn(n, 3)
    z[1::2] += 6.0  # two kinds of cells, alternating, with different gene proportions
    library = torch.tensor([50.0, 5000.0] * 5 + [50.0])
    with torch.no_grad():
        scale = module.decoder(z).scale_and_kept()[0].double().numpy()
    counts = module.decode_counts(z, library, np.random.default_rng(0))
    assert sp.isspmatrix_csr(counts) and counts.shape == (n, 40)
    counts.check_format(full_check=True)
    totals = np.asarray(counts.sum(1)).ravel()
    assert (totals[1::2] > 2000).all() and (totals[0::2] < 200).all()
    # each large cell's genes follow its own proportions, not its neighbour's
    for i in range(1, n, 2):
        x = counts[i].toarray().ravel()
        own = np.corrcoef(x, scale[i])[0, 1]
        assert own > np.corrcoef(x, scale[i - 1])[0, 1] and own > 0.8
    again = module.decode_counts(z, library, np.random.default_rng(0))
    assert (counts != again).nnz == 0
    empty = module.decode_counts(z[:0], library[:0], np.random.default_rng(0))
    assert sp.isspmatrix_csr(empty) and empty.shape == (0, 40)
    on_device = module.decode_counts(z, library, torch.Generator().manual_seed(0))
    assert on_device.shape == (n, 40) and on_device.nnz > 0


def test_cpu_decoding_threads_change_neither_counts_nor_settings(monkeypatch):
    # chunks are decoded in torch.get_num_threads() worker threads, each chunk's draws
    # seeded in chunk order: the counts are those of one thread, and torch's thread count
    # is left alone; the caller's autocast reaches the workers
    monkeypatch.setattr(module_file, "_COUNT_CHUNK", 7)
    module = _module(300, "zinb")
    z, library = torch.randn(50, 3), torch.full((50,), 400.0)
    threads = torch.get_num_threads()
    try:
        counts = {}
        for n_threads in (1, 3):
            torch.set_num_threads(n_threads)
            counts[n_threads] = module.decode_counts(z, library, np.random.default_rng(2))
            assert torch.get_num_threads() == n_threads
        assert counts[1].nnz > 500 and (counts[1] != counts[3]).nnz == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 means: other counts
            low = module.decode_counts(z, library, np.random.default_rng(2))
        torch.set_num_threads(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_one = module.decode_counts(z, library, np.random.default_rng(2))
        assert (low != low_one).nnz == 0 and (low != counts[1]).nnz > 0
    finally:
        torch.set_num_threads(threads)


def test_compile_kernels_draws_every_likelihood_in_both_precisions():
    from scldiff.sampling import _kernels, compile_kernels

    compile_kernels()  # from numba's cache after the first run; an error here breaks install
    # the pre-selection kernel holds float32 logits and bf16 ones (as uint16 bits), the
    # latter with and without the ZINB's dropout logits
    signatures = {tuple(str(a) for a in s[:3]) for s in _kernels.preselect_logits.signatures}
    assert {("array(float32, 2d, C)", "array(float32, 1d, C)", "array(float32, 2d, C)"),
            ("array(uint16, 2d, C)", "array(float32, 1d, C)", "array(uint16, 2d, C)"),
            ("array(uint16, 2d, C)", "array(float32, 1d, C)", "array(float32, 2d, C)"),
            } <= signatures


def _one_distribution(likelihood: str, n: int, mu: float, theta: float = 2.0,
                      pi: float = 0.2) -> tuple[CountParams, torch.Tensor]:
    """``n`` cells of one distribution of two genes, library 1000; gene 0's mean about
    ``mu`` (its exact mean: ``log_scale``)."""
    library = torch.full((n,), 1000.0, dtype=torch.float64)
    rho = torch.tensor([mu / 1000.0, 1.0 - mu / 1000.0], dtype=torch.float64)
    logits = torch.log(rho).expand(n, 2).clone()
    zi = None
    if likelihood == "zinb":
        zi = torch.full((n, 2), float(np.log(pi / (1 - pi))), dtype=torch.float64)
    log_theta = None if likelihood == "poisson" else torch.full((2,), np.log(theta),
                                                                dtype=torch.float64)
    return CountParams(likelihood, logits, log_theta, zi), library


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zinb"])
def test_transported_counts_follow_the_target_distribution(likelihood):
    # x ~ F_s carried by its quantile is distributed as F_t exactly; compare the pmf
    n = 40_000
    source, library = _one_distribution(likelihood, n, mu=3.0)
    target, _ = _one_distribution(likelihood, n, mu=8.0)
    mu_s = library[0].item() * source.log_scale()[0, 0].exp().item()
    mu_t = library[0].item() * target.log_scale()[0, 0].exp().item()
    rng = np.random.default_rng(0)
    base = {"poisson": lambda m: stats.poisson(m),
            "nb": lambda m: stats.nbinom(2.0, 2.0 / (2.0 + m)),
            "zinb": lambda m: stats.nbinom(2.0, 2.0 / (2.0 + m))}[likelihood]
    x = base(mu_s).rvs(size=n, random_state=rng)
    if likelihood == "zinb":
        x = np.where(rng.random(n) < 0.2, 0, x)
    counts = np.stack([x, np.zeros(n)], 1)
    out = transport_counts(counts, source, target, library, rng).toarray()[:, 0]
    k = np.arange(15)
    pmf = base(mu_t).pmf(k)
    if likelihood == "zinb":
        pmf = 0.8 * pmf + 0.2 * (k == 0)
    observed = np.bincount(out.astype(int), minlength=40)[:15] / n
    assert np.all(np.abs(observed - pmf) <= 4 * np.sqrt(pmf * (1 - pmf) / n) + 1e-3)
    # a count high for its distribution stays high: the order of the cells is kept
    assert stats.spearmanr(x, out)[0] > 0.95


def test_transport_to_the_same_distribution_returns_the_counts():
    source, library = _one_distribution("zinb", 500, mu=5.0)
    x = np.random.default_rng(1).poisson(5.0, (500, 2)).astype(float)
    out = transport_counts(sp.csr_matrix(x), source, source, library,
                           np.random.default_rng(2))
    np.testing.assert_array_equal(out.toarray(), x)
