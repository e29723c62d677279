"""Count likelihoods against scipy, count sampling moments, the KL term."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from scldiff.module import CountDecoder, gaussian_kl, sample_counts, sparse_log_likelihood


def decoder_params(likelihood, n_cells=3, n_genes=5, seed=0, dispersion="gene"):
    """A small decoder and its parameters; with ``dispersion="gene-label"``, 3 labels with
    different inverse dispersions and the cells' labels cycling through them."""
    torch.manual_seed(seed)
    decoder = CountDecoder(4, n_genes, n_hidden=8, likelihood=likelihood,
                           dispersion=dispersion, n_labels=3)
    labels = None
    with torch.no_grad():
        if decoder.log_theta is not None:
            theta = torch.linspace(-1.0, 2.0, n_genes)
            if dispersion == "gene-label":
                theta = torch.stack([theta, theta.flip(0), theta + 1.5])
                labels = torch.arange(n_cells) % 3
            decoder.log_theta.copy_(theta)
        if decoder.detect_offset is not None:  # zero at initialisation; make it matter
            decoder.detect_offset.weight.normal_(0.0, 1.0)
            decoder.detect_offset.bias.normal_(0.0, 1.0)
    return decoder, decoder(torch.randn(n_cells, 4), labels)


def test_negative_binomial_log_likelihood_matches_scipy():
    decoder, params = decoder_params("nb")
    library = torch.tensor([[100.0], [1000.0], [5000.0]])
    px = decoder.distribution(params, library)
    x = torch.tensor([[0, 1, 5, 20, 3], [2, 0, 0, 50, 7], [100, 3, 1, 0, 300]]).float()
    mu = (library * params["scale"]).detach().double().numpy()
    theta = params["theta"].detach().double().numpy()
    expected = stats.nbinom.logpmf(x.numpy(), n=theta, p=theta / (theta + mu))
    np.testing.assert_allclose(px.log_prob(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_zinb_log_likelihood_matches_scipy_mixture():
    decoder, params = decoder_params("zinb")
    library = torch.tensor([[300.0], [30.0], [3000.0]])
    px = decoder.distribution(params, library)
    x = torch.tensor([[0, 1, 0, 4, 9], [0, 0, 2, 0, 1], [40, 0, 8, 0, 0]], dtype=torch.float32)
    mu = (library * params["scale"]).detach().double().numpy()
    theta = params["theta"].detach().double().numpy()
    pi = torch.sigmoid(params["zi_logits"]).detach().double().numpy()
    nb = stats.nbinom.pmf(x.numpy(), n=theta, p=theta / (theta + mu))
    expected = np.log(np.where(x.numpy() == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    np.testing.assert_allclose(px.log_prob(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def _hurdle_logit(mu, theta, offset):
    """Logit of the hurdle's P(X > 0): logit(1 - NB(0)) + offset, from scipy."""
    nb = stats.nbinom(theta, theta / (theta + mu))
    return nb.logsf(0) - nb.logpmf(0) + offset


def _hurdle_p(mu, theta, offset):
    return 1.0 / (1.0 + np.exp(-_hurdle_logit(mu, theta, offset)))


def _hurdle_reference(counts, mu, theta, offset):
    """log P(x) of the hurdle NB from scipy: 1 - p at zero, p NB(x) / (1 - NB(0)) above
    (log p and log(1 - p) from the logit: p can be within float64's spacing of 1)."""
    nb = stats.nbinom(theta, theta / (theta + mu))
    logit = _hurdle_logit(mu, theta, offset)
    return np.where(counts == 0, -np.logaddexp(0.0, logit),
                    -np.logaddexp(0.0, -logit) + nb.logpmf(counts) - nb.logsf(0))


def test_hurdle_log_likelihood_and_mean_match_scipy():
    decoder, params = decoder_params("hurdle")
    library = torch.tensor([[300.0], [3.0], [3000.0]])  # means from well below 1 to large
    px = decoder.distribution(params, library)
    x = torch.tensor([[0, 1, 0, 4, 9], [0, 0, 2, 0, 1], [40, 0, 8, 0, 0]], dtype=torch.float32)
    mu = (library * params["scale"]).detach().double().numpy()
    theta = params["theta"].detach().double().numpy()
    offset = params["detect_offset"].detach().double().numpy()
    p = _hurdle_p(mu, theta, offset)
    np.testing.assert_allclose(px.log_prob(x).detach().numpy(),
                               _hurdle_reference(x.numpy(), mu, theta, offset),
                               rtol=1e-4, atol=1e-4)
    # E[X] = p E[NB | NB > 0], the truncated NB's mean from scipy's pmf
    support = np.arange(20_000)[:, None, None]
    nb = stats.nbinom(theta, theta / (theta + mu))
    truncated_mean = (support * nb.pmf(support)).sum(0) / nb.sf(0)
    np.testing.assert_allclose(px.mean.detach().numpy(), p * truncated_mean, rtol=1e-4)
    # the probability of a zero is free: it can be below the NB's own
    assert ((1 - p) < nb.pmf(0)).any() and ((1 - p) > nb.pmf(0)).any()


def test_hurdle_distribution_samples_follow_its_pmf():
    from scldiff.module import HurdleNegativeBinomial

    torch.manual_seed(0)
    mu, theta = torch.tensor([0.2, 3.0, 40.0]), torch.tensor([0.5, 2.0, 5.0])
    logits = torch.tensor([0.5, 2.0, -1.0])
    px = HurdleNegativeBinomial(mu, theta, logits)
    draws = px.sample((50_000,))
    assert draws.shape == (50_000, 3) and (draws == draws.round()).all()
    for k in range(6):  # frequencies of 0..5 against the pmf: within 5 standard errors
        expected = px.log_prob(torch.full((3,), float(k))).exp()
        observed = (draws == k).float().mean(0)
        assert (observed - expected).abs().le(5 * (expected / 50_000).sqrt() + 1e-4).all(), k
    torch.testing.assert_close(draws.mean(0), px.mean, rtol=0.03, atol=0.01)


def test_hurdle_starts_as_the_negative_binomial():
    """With the decoder's offset at its initial zero, the hurdle NB is the NB: the same
    probabilities (tiny means included, where 1 - NB(0) underflows) and mean l rho."""
    torch.manual_seed(0)
    hurdle = CountDecoder(4, 6, n_hidden=8, likelihood="hurdle")
    nb = CountDecoder(4, 6, n_hidden=8, likelihood="nb")
    nb.load_state_dict({k: v for k, v in hurdle.state_dict().items()
                        if not k.startswith("detect_offset")})
    z, library = torch.randn(3, 4), torch.tensor([[2.0], [200.0], [20000.0]])
    x = torch.tensor([[0, 1, 0, 4, 9, 0], [0, 0, 2, 0, 1, 3], [40, 0, 8, 0, 0, 500]]).float()
    px_h, px_nb = (d.distribution(d(z), library) for d in (hurdle, nb))
    torch.testing.assert_close(px_h.log_prob(x), px_nb.log_prob(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(px_h.mean, library * nb(z)["scale"], rtol=1e-4, atol=1e-6)
    # a mean far below float32's smallest normal: finite likelihood and gradients
    params = hurdle(z)
    params["log_scale"] = params["log_scale"].detach().clone().requires_grad_(True)
    with torch.no_grad():
        params["log_scale"][:, 0] = -120.0
    x = sp.csr_matrix(x.numpy())
    args = (torch.from_numpy(x.indptr.astype(np.int64)), torch.from_numpy(
        x.indices.astype(np.int64)), torch.from_numpy(x.data))
    ll = sparse_log_likelihood("hurdle", params, library, *args)
    (grad,) = torch.autograd.grad(ll.sum(), params["log_scale"])
    assert torch.isfinite(ll).all() and torch.isfinite(grad).all()


def test_sparse_hurdle_likelihood_at_means_far_below_theta():
    # 1 - NB(0) is about mu there, and p with it: the likelihood of a nonzero count rests on
    # log p - log(1 - NB(0)), two logarithms of tiny numbers
    mu = np.array([1e-5, 1e-4, 3e-3, 0.5])
    theta = np.array([30.0, 300.0, 30.0, 2.0])
    counts = np.array([[1.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    offset = np.array([0.3, -0.2, 0.0, 0.1])
    params = {"log_scale": torch.tensor(np.log(mu / 10.0), dtype=torch.float32)[None],
              "log_theta": torch.tensor(np.log(theta), dtype=torch.float32),
              "detect_offset": torch.tensor(offset, dtype=torch.float32)[None]}
    x = sp.csr_matrix(counts)
    sparse = sparse_log_likelihood("hurdle", params, torch.tensor([[10.0]]), torch.from_numpy(
        x.indptr.astype(np.int64)), torch.from_numpy(x.indices.astype(np.int64)),
        torch.from_numpy(x.data))
    mu32 = 10.0 * np.exp(params["log_scale"].double().numpy())  # the float32 parameters
    theta32 = np.exp(params["log_theta"].double().numpy())
    expected = _hurdle_reference(counts, mu32, theta32, offset).sum()
    np.testing.assert_allclose(sparse.item(), expected, rtol=1e-5)


def test_poisson_log_likelihood_matches_scipy():
    decoder, params = decoder_params("poisson")
    library = torch.tensor([[50.0], [500.0], [5.0]])
    px = decoder.distribution(params, library)
    x = torch.tensor([[0, 3, 10, 1, 2], [7, 0, 80, 6, 1], [0, 0, 1, 0, 0]], dtype=torch.float32)
    mu = (library * params["scale"]).detach().double().numpy()
    np.testing.assert_allclose(px.log_prob(x).detach().numpy(),
                               stats.poisson.logpmf(x.numpy(), mu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_decoder_mean_is_library_times_proportions(likelihood):
    decoder, params = decoder_params(likelihood)
    px = decoder.distribution(params, torch.full((3, 1), 1234.0))
    if likelihood == "zinb":  # the NB's mean makes up for the zeros: (1 - pi) mu = l rho
        assert (params["scale"].sum(-1) > 1).all()
        kept = torch.sigmoid(-params["zi_logits"]) * params["scale"] * 1234.0
        torch.testing.assert_close(px.mean, kept)
    else:
        torch.testing.assert_close(params["scale"].sum(-1), torch.ones(3))
    torch.testing.assert_close(px.mean.sum(-1), torch.full((3,), 1234.0))


def _generator(backend, seed):
    """numpy draws, or torch draws (the backend a GPU uses, here on the CPU)."""
    return (np.random.default_rng(seed) if backend == "numpy"
            else torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "hurdle", "poisson"])
def test_sampled_counts_have_the_likelihood_moments(likelihood, backend):
    decoder, params = decoder_params(likelihood, n_cells=1)
    params = {k: v.detach().expand(100_000, -1) for k, v in params.items()}
    library = torch.full((100_000, 1), 200.0)
    counts = sample_counts(likelihood, params, library, _generator(backend, 0))
    assert sp.issparse(counts) and counts.dtype == np.float32
    assert (counts.data == np.round(counts.data)).all() and (counts.data >= 1).all()
    counts = counts.toarray()
    mean = (200.0 * params["scale"][0]).double().numpy()
    var = mean if likelihood == "poisson" else mean + mean**2 / params["theta"][0].numpy()
    if likelihood == "zinb":  # a point mass at zero with probability pi
        pi = torch.sigmoid(params["zi_logits"][0]).double().numpy()
        var = (1 - pi) * (var + mean**2) - ((1 - pi) * mean) ** 2
        mean = (1 - pi) * mean
    if likelihood == "hurdle":  # p times the moments of the NB given X > 0
        theta = params["theta"][0].double().numpy()
        p = _hurdle_p(mean, theta, params["detect_offset"][0].double().numpy())
        nb_positive = -np.expm1(-theta * np.log1p(mean / theta))
        second = p * (var + mean**2) / nb_positive
        mean = p * mean / nb_positive
        var = second - mean**2
    np.testing.assert_allclose(counts.mean(0), mean, rtol=0.03)
    np.testing.assert_allclose(counts.var(0), var, rtol=0.08)


def test_gaussian_kl_matches_torch_distributions():
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 3), torch.ones(4, 3))
    torch.testing.assert_close(gaussian_kl(mean, logvar),
                               torch.distributions.kl_divergence(q, p).sum(-1))


@pytest.mark.parametrize("likelihood,dispersion", [
    ("nb", "gene"), ("zinb", "gene"), ("hurdle", "gene"), ("poisson", "gene"),
    ("nb", "gene-label"), ("zinb", "gene-label"), ("hurdle", "gene-label")])
def test_sparse_log_likelihood_equals_the_dense_one_and_scipy(likelihood, dispersion):
    rng = np.random.default_rng(1)
    decoder, params = decoder_params(likelihood, n_cells=6, n_genes=40, dispersion=dispersion)
    if dispersion == "gene-label":  # one row of inverse dispersions per cell, by label
        assert params["theta"].shape == (6, 40)
        torch.testing.assert_close(params["theta"][4], decoder.log_theta[1].exp())
    library = torch.tensor(rng.uniform(50, 3000, size=(6, 1)), dtype=torch.float32)
    counts = rng.poisson(rng.gamma(0.3, 4.0, size=(6, 40))).astype(np.float32)
    counts[0] = 0  # a row with no stored values
    x = sp.csr_matrix(counts)
    sparse = sparse_log_likelihood(likelihood, params, library, torch.from_numpy(
        x.indptr.astype(np.int64)), torch.from_numpy(x.indices.astype(np.int64)),
        torch.from_numpy(x.data))
    dense = decoder.distribution(params, library).log_prob(torch.from_numpy(counts)).sum(-1)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-3)
    mu = (library * params["scale"]).detach().double().numpy()
    if likelihood == "poisson":
        ref = stats.poisson.logpmf(counts, mu)
    else:
        theta = params["theta"].detach().double().numpy()
        ref = stats.nbinom.logpmf(counts, n=theta, p=theta / (theta + mu))
        if likelihood == "zinb":
            pi = torch.sigmoid(params["zi_logits"]).detach().double().numpy()
            nb = np.exp(ref)
            ref = np.log(np.where(counts == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
        if likelihood == "hurdle":
            ref = _hurdle_reference(counts, mu, theta,
                                    params["detect_offset"].detach().double().numpy())
    np.testing.assert_allclose(sparse.detach().numpy(), ref.sum(-1), rtol=1e-5)


def test_sparse_log_likelihood_gradients_match_the_dense_ones():
    decoder, _ = decoder_params("nb", n_cells=4, n_genes=30)
    z = torch.randn(4, 4, requires_grad=True)
    counts = np.random.default_rng(2).poisson(2.0, size=(4, 30)).astype(np.float32)
    x = sp.csr_matrix(counts)
    library = torch.full((4, 1), 100.0)
    args = (torch.from_numpy(x.indptr.astype(np.int64)), torch.from_numpy(x.indices.astype(
        np.int64)), torch.from_numpy(x.data))
    (g_sparse,) = torch.autograd.grad(sparse_log_likelihood("nb", decoder(z), library, *args)
                                      .sum(), z)
    (g_dense,) = torch.autograd.grad(decoder.distribution(decoder(z), library).log_prob(
        torch.from_numpy(counts)).sum(), z)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-4)


def test_zinb_generated_totals_match_the_library_size():
    from scldiff.module import LapDDPMModule

    torch.manual_seed(0)
    module = LapDDPMModule(n_input=50, n_labels=1, n_lpe=0, n_latent=3, n_hidden=8,
                           score_hidden=8, score_blocks=1, likelihood="zinb")
    with torch.no_grad():
        module.decoder.dropout_logits.bias.fill_(0.0)  # about half of the counts zeroed
    module.eval()
    n = 3000
    counts = module.sample(torch.zeros(n, dtype=torch.long), torch.full((n,), 400.0),
                           np.random.default_rng(0), sampler="ddim", n_steps=3,
                           generator=torch.Generator().manual_seed(0))
    assert counts.sum(1).mean() == pytest.approx(400.0, rel=0.03)


def test_decode_counts_in_chunks_keeps_each_cell_with_its_latent_and_library():
    from scldiff.module import LapDDPMModule

    torch.manual_seed(0)
    module = LapDDPMModule(n_input=40, n_labels=1, n_lpe=0, n_latent=3, n_hidden=8,
                           score_hidden=8, score_blocks=1, likelihood="nb").eval()
    with torch.no_grad():  # distinct proportions per cell, little count noise
        module.decoder.scale.weight.mul_(8.0)
        module.decoder.log_theta.fill_(5.0)
    n = 11
    z = torch.randn(n, 3)
    z[1::2] += 6.0  # two kinds of cells, alternating, with different gene proportions
    library = torch.tensor([50.0, 5000.0] * 5 + [50.0])
    with torch.no_grad():
        scale = module.decoder(z)["scale"].double().numpy()
    counts = module.decode_counts(z, library, np.random.default_rng(0), chunk_size=3)
    assert sp.isspmatrix_csr(counts) and counts.shape == (n, 40)
    counts.check_format(full_check=True)
    totals = np.asarray(counts.sum(1)).ravel()
    assert (totals[1::2] > 2000).all() and (totals[0::2] < 200).all()
    # each large cell's genes follow its own proportions, not its neighbour's
    for i in range(1, n, 2):
        x = counts[i].toarray().ravel()
        own = np.corrcoef(x, scale[i])[0, 1]
        assert own > np.corrcoef(x, scale[i - 1])[0, 1] and own > 0.8
    again = module.decode_counts(z, library, np.random.default_rng(0), chunk_size=3)
    assert (counts != again).nnz == 0
    empty = module.decode_counts(z[:0], library[:0], np.random.default_rng(0))
    assert sp.isspmatrix_csr(empty) and empty.shape == (0, 40)


def test_cpu_decoding_threads_change_neither_counts_nor_settings():
    # chunks are decoded in torch.get_num_threads() worker threads, each chunk's draws
    # seeded in chunk order: the counts are those of one thread. Torch runs on one thread
    # meanwhile, and gets its own count back; the caller's autocast reaches the workers.
    from scldiff.module import LapDDPMModule

    torch.manual_seed(0)
    module = LapDDPMModule(n_input=300, n_labels=1, n_lpe=0, n_latent=3, n_hidden=8,
                           score_hidden=8, score_blocks=1, likelihood="zinb").eval()
    z, library = torch.randn(50, 3), torch.full((50,), 400.0)
    threads = torch.get_num_threads()
    try:
        counts = {}
        for n_threads in (1, 3):
            torch.set_num_threads(n_threads)
            counts[n_threads] = module.decode_counts(z, library, np.random.default_rng(2),
                                                     chunk_size=7)
            assert torch.get_num_threads() == n_threads
        assert counts[1].nnz > 500 and (counts[1] != counts[3]).nnz == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 means: other counts
            low = module.decode_counts(z, library, np.random.default_rng(2), chunk_size=7)
        torch.set_num_threads(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_one = module.decode_counts(z, library, np.random.default_rng(2), chunk_size=7)
        assert (low != low_one).nnz == 0 and (low != counts[1]).nnz > 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("form", ["probabilities", "logits"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "hurdle", "poisson"])
def test_sampled_counts_follow_the_scipy_pmf(likelihood, backend, form):
    # means on both sides of the inverse-CDF / Gamma-Poisson switch, tiny and large
    # dispersions; each column has its own parameters, 40,000 cells each. The parameters
    # come as probabilities, or as the decoder's logits (sampling_params(logits=True)):
    # log-means as the proportions' logits, with the library that gives back the means
    mu = np.array([1e-3, 0.05, 0.7, 3.0, 9.9, 10.1, 40.0, 300.0])
    theta = np.array([0.05, 2.0, 0.3, 50.0, 1.5, 0.2, 8.0, 3.0])
    pi = np.array([0.0, 0.1, 0.5, 0.2, 0.0, 0.3, 0.05, 0.6])
    n = 40_000
    library = 10.0
    if form == "probabilities":
        params = {"scale": torch.tensor(mu / 10.0, dtype=torch.float32).expand(n, -1)}
    else:  # the ZINB's mean is library * rho / sum (1 - pi) rho
        params = {"scale_logits": torch.tensor(np.log(mu), dtype=torch.float32).expand(n, -1)}
        library = float(((1 - pi) * mu).sum() if likelihood == "zinb" else mu.sum())
    if likelihood != "poisson":
        params["theta"] = torch.tensor(theta, dtype=torch.float32).expand(n, -1)
    if likelihood == "zinb":
        params["zi_logits"] = torch.tensor(np.log(pi + 1e-12) - np.log1p(-pi),
                                           dtype=torch.float32).expand(n, -1)
    # hurdle: P(X > 0), below and above the NB's own 1 - NB(0)
    detect = np.array([0.3, 0.02, 0.9, 0.5, 0.999, 0.4, 0.7, 0.05])
    if likelihood == "hurdle":  # the offsets that give these probabilities
        nb = stats.nbinom(theta, theta / (theta + mu))
        offset = np.log(detect) - np.log1p(-detect) - (nb.logsf(0) - nb.logpmf(0))
        params["detect_offset"] = torch.tensor(offset, dtype=torch.float32).expand(n, -1)
    counts = sample_counts(likelihood, params, torch.full((n, 1), library),
                           _generator(backend, 3)).toarray()
    for g in range(mu.size):
        if likelihood == "poisson":
            dist = stats.poisson(mu[g])
        else:
            dist = stats.nbinom(theta[g], theta[g] / (theta[g] + mu[g]))
        values = counts[:, g].astype(int)
        support = np.arange(values.max() + 2)
        pmf = dist.pmf(support)
        if likelihood == "zinb":
            pmf = (1 - pi[g]) * pmf
            pmf[0] += pi[g]
        if likelihood == "hurdle":
            pmf = detect[g] * pmf / dist.sf(0)
            pmf[0] = 1 - detect[g]
        # pool the tail so that every bin expects at least 20 draws, then a chi-square test
        expected, observed, acc_e, acc_o = [], [], 0.0, 0
        for k in support:
            acc_e += n * pmf[k]
            acc_o += int((values == k).sum())
            if acc_e >= 20:
                expected.append(acc_e)
                observed.append(acc_o)
                acc_e, acc_o = 0.0, 0
        tail = n - sum(expected)
        expected.append(tail)
        observed.append(n - sum(observed))
        expected, observed = np.array(expected), np.array(observed)
        if expected[-1] < 20:  # merge a small tail into the last bin
            expected[-2:] = [expected[-2] + expected[-1], 0]
            observed[-2:] = [observed[-2] + observed[-1], 0]
            expected, observed = expected[:-1], observed[:-1]
        if expected.size < 2:
            assert observed[0] == n
            continue
        chi2 = ((observed - expected) ** 2 / expected).sum()
        assert stats.chi2.sf(chi2, expected.size - 1) > 1e-4, (g, mu[g], theta[g], chi2)


def _inverse_cdf_in_thread(mu, theta, p_zero, uniforms=1.0 - 1e-12, seconds=30.0):
    """The CPU kernel's inverse-CDF draws at the CDF levels of ``uniforms`` (by default
    1e-12 below 1) on (P(0), 1); ``theta`` ``None``: Poisson."""
    import threading

    from scldiff.module._kernels import inverse_cdf

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
    mu, theta = np.array([5.0]), np.array([1.0])
    out = _inverse_cdf_in_thread(mu, theta, np.array([1.0 / 6.0]))
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


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "hurdle", "poisson"])
def test_sampling_params_equal_the_forward_ones(likelihood):
    decoder, params = decoder_params(likelihood, n_cells=4, n_genes=30)
    z = torch.randn(4, 4)
    with torch.no_grad():
        if likelihood == "zinb":  # dropout logits far out in both tails: exp overflows
            decoder.dropout_logits.bias[:3] = torch.tensor([120.0, -120.0, 0.0])
        params = decoder(z)
        fast = decoder.sampling_params(z)
    torch.testing.assert_close(fast["scale"], params["scale"], rtol=1e-5, atol=1e-9)
    if likelihood != "poisson":
        torch.testing.assert_close(fast["theta"], params["theta"][0])
    if likelihood == "zinb":
        torch.testing.assert_close(fast["kept"], torch.sigmoid(-params["zi_logits"]))
        assert (fast["kept"][:, 0] == 0).all() and (fast["kept"][:, 1] == 1).all()
    else:
        assert "kept" not in fast
    if likelihood == "hurdle":
        torch.testing.assert_close(fast["detect_offset"], params["detect_offset"])
    else:
        assert "detect_offset" not in fast
    # the logits the CPU sampler takes instead: the same probabilities once converted
    from scldiff.module._decoder import _with_probabilities

    with torch.no_grad():
        logits = decoder.sampling_params(z, logits=True)
    if likelihood == "hurdle":  # its P(X > 0) needs the library size: probabilities
        assert "scale" in logits and "scale_logits" not in logits
        return
    assert "scale" not in logits and logits["scale_logits"].dtype == torch.float32
    assert ("zi_logits" in logits) == (likelihood == "zinb")
    converted = _with_probabilities(likelihood, logits)
    torch.testing.assert_close(converted["scale"], fast["scale"], rtol=1e-5, atol=1e-9)
    if likelihood == "zinb":
        torch.testing.assert_close(converted["kept"], fast["kept"])


class _FixedKey:
    """A numpy Generator whose key for the CPU sampler's uniforms is ``key``."""

    def __init__(self, key: int):
        self.key, self.rng = key, np.random.default_rng(0)

    def integers(self, low, high, dtype):
        return dtype(self.key)

    def __getattr__(self, name):
        return getattr(self.rng, name)


def _near_their_uniforms(key: int, n_cells: int, n_genes: int):
    """The uniforms of the CPU sampler's entries under ``key``, and probabilities of a
    nonzero count just above or just below each (relative 1e-5; alternately, and so
    among the entries with u < 2**-16)."""
    from scldiff.module._kernels import entry_uniforms

    ticks, u = entry_uniforms(key, n_cells, n_genes)
    above = np.arange(u.size) % 2 == 0
    small = np.flatnonzero(ticks == 0)
    above[small] = np.arange(small.size) % 2 == 0
    side = np.where(above, 1 + 1e-5, 1 - 1e-5)
    return ticks.reshape(n_cells, n_genes), u.reshape(n_cells, n_genes), \
        np.minimum(u * side, 0.999).reshape(n_cells, n_genes)


@pytest.mark.parametrize("likelihood", ["poisson", "hurdle"])
def test_zero_decisions_are_exactly_u_below_the_probability_of_a_count(likelihood):
    # Every entry's probability of a nonzero count lies within 1e-5 (relative) of its own
    # uniform, above or below, so each decision hinges on the float64 comparison. Among
    # 2**18 entries, a few have 16-bit integer part 0 (u < 2**-16, probabilities down to
    # 1e-9): the dense 16-bit test alone would keep them all.
    key, n_cells, n_genes = 20261206, 64, 4096
    ticks, u, target = _near_their_uniforms(key, n_cells, n_genes)
    library = torch.full((n_cells, 1), 10.0)
    if likelihood == "poisson":  # P(X > 0) = 1 - exp(-mu)
        scale = torch.tensor(-np.log1p(-target) / 10.0, dtype=torch.float32)
        params = {"scale": scale}
        p = -np.expm1(-(10.0 * scale.double().numpy()))
    else:  # the hurdle's P(X > 0) is given
        detect = torch.tensor(target, dtype=torch.float32)
        params = {"scale": torch.full((n_cells, n_genes), 0.1), "theta":
                  torch.full((n_genes,), 2.0), "detect": detect}
        p = detect.double().numpy()
    counts = sample_counts(likelihood, params, library, _FixedKey(key)).toarray()
    assert ((counts > 0) == (u < p)).all()
    small = ticks == 0
    assert small.sum() >= 2 and (counts[small] > 0).any() and (counts[small] == 0).any()


def test_pre_selection_keeps_every_entry_below_its_float64_bound():
    # The CPU kernel computes the bound 2**16 E[X] in float32. Every entry whose 16-bit
    # integer k lies below the float64 bound (ZINB: library * scale * (1 - pi)) must be
    # kept, or a count that should be nonzero could be missed. Each entry's bound is put
    # just above its own k (relative 1e-7 at most, float32's rounding), where the float32
    # product alone would fall below k for many of them: the slack must cover it.
    from scldiff.module._decoder import _BOUND_SLACK
    from scldiff.module._kernels import TICKS, entry_uniforms, preselect

    rng = np.random.default_rng(8)
    key, n_cells, n_genes = 99, 64, 4096
    ticks, uniforms = entry_uniforms(key, n_cells, n_genes)
    ticks = ticks.reshape(n_cells, n_genes).astype(np.float64)
    library = rng.uniform(500.0, 5000.0, n_cells)
    kept = rng.uniform(0.5, 1.0, (n_cells, n_genes)).astype(np.float32)
    target = np.maximum(ticks, 0.5) * (1 + rng.uniform(0, 1e-7, ticks.shape))
    scale = (target / (TICKS * library[:, None] * kept)).astype(np.float32)
    factor = (library * (_BOUND_SLACK * TICKS)).astype(np.float32)
    rows, cols, mean, keep, u = preselect(scale, kept, library, factor, True, True,
                                          np.uint64(key))
    bound = TICKS * library[:, None] * scale.astype(np.float64) * kept.astype(np.float64)
    must = np.flatnonzero(ticks < bound)
    flat = rows * n_genes + cols
    assert must.size > n_cells * n_genes // 3 and np.isin(must, flat).all()
    # what comes back is each entry's own mean, (1 - pi) and completed uniform
    assert np.array_equal(mean, library[rows] * scale[rows, cols].astype(np.float64))
    assert np.array_equal(keep, kept[rows, cols].astype(np.float64))
    assert np.array_equal(u, uniforms[flat])


def test_compiled_exponential_is_float32_exp_to_two_units_in_the_last_place():
    from scldiff.module._kernels import exp_f32

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
    from scldiff.module._kernels import TICKS, entry_uniforms

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
    # The fused kernel computes each row's softmax and 1 - pi itself, with its own float32
    # exponential, and the bound 2**16 E[X] from them. Every entry whose 16-bit integer
    # lies below the bound computed in float64 from the same logits must be kept; none
    # more than the slack (1e-5) and float32's rounding above it may be. Each entry's
    # bound is put near its own integer (relative 3e-5 either way).
    from scldiff.module._decoder import _BOUND_SLACK
    from scldiff.module._kernels import TICKS, entry_uniforms, preselect_logits

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
        products, bias, zi_products, zi_bias, library, _BOUND_SLACK * TICKS, True,
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
        products, bias, zi_products[:1], zi_bias, library, _BOUND_SLACK * TICKS, False,
        np.uint64(key))
    assert got_kept.size == 0
    mean = library[:, None] * e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(got_mean, mean[rows, cols], rtol=1e-6)
    must = np.flatnonzero(ticks < TICKS * mean)
    assert must.size > 1000 and np.isin(must, rows * n_genes + cols).all()


@pytest.mark.parametrize("where", ["scale_logits", "scale_bias", "zi_logits", "zi_bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_cpu_sampler_refuses_non_finite_logits(where, value):
    params = {"scale_logits": torch.zeros(3, 5), "scale_bias": torch.zeros(5),
              "zi_logits": torch.zeros(3, 5), "zi_bias": torch.zeros(5),
              "theta": torch.ones(5)}
    params[where].view(-1)[2] = value
    with pytest.raises(FloatingPointError, match="not finite"):
        sample_counts("zinb", params, torch.full((3, 1), 10.0), np.random.default_rng(0))
    params[where].view(-1)[2] = 0.0
    assert sample_counts("zinb", params, torch.full((3, 1), 10.0),
                         np.random.default_rng(0)).shape == (3, 5)


def test_cpu_sampler_counts_depend_only_on_the_key():
    key, n_cells, n_genes = 7, 16, 300
    _, u, target = _near_their_uniforms(key, n_cells, n_genes)
    params = {"scale": torch.tensor(-np.log1p(-target) / 10.0, dtype=torch.float32)}
    library = torch.full((n_cells, 1), 10.0)
    first = sample_counts("poisson", params, library, _FixedKey(key))
    second = sample_counts("poisson", params, library, _FixedKey(key))
    assert (first != second).nnz == 0
    other = sample_counts("poisson", params, library, _FixedKey(key + 1))
    assert (first != other).nnz > 0


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_bf16_products_are_sampled_as_their_float32_values(likelihood):
    # Under bf16 autocast the decoder's products stay bf16, and the CPU kernel widens
    # them as it reads them: the counts must be those of the same values in float32.
    decoder, _ = decoder_params(likelihood, n_cells=40, n_genes=700)
    z, library = torch.randn(40, 4), torch.full((40, 1), 3000.0)
    with torch.no_grad():
        decoder.scale.bias.normal_(0, 2)  # logits spread, so that counts vary
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = decoder.sampling_params(
                z, logits=True, weights=decoder.output_weights(torch.bfloat16))
    names = [name for name in ("scale_logits", "zi_logits") if name in mixed]
    assert names == ["scale_logits"] + (["zi_logits"] if likelihood == "zinb" else [])
    assert all(mixed[name].dtype == torch.bfloat16 for name in names)
    widened = {**mixed, **{name: mixed[name].float() for name in names}}
    # the bf16 values are not float32's by accident: the float32 products differ
    with torch.no_grad():
        exact = decoder.sampling_params(z, logits=True)
    assert not torch.equal(exact["scale_logits"], widened["scale_logits"])
    counts = sample_counts(likelihood, mixed, library, _FixedKey(11))
    assert counts.nnz > 1000
    assert (counts != sample_counts(likelihood, widened, library, _FixedKey(11))).nnz == 0


@pytest.mark.parametrize("shape", [0.05, 0.3, 1.0, 4.0, 60.0])
def test_torch_gamma_draws_follow_scipy_and_the_generator(shape):
    from scldiff.module._decoder import _standard_gamma

    shapes = torch.full((50_000,), shape, dtype=torch.float64)
    draws = _standard_gamma(shapes, torch.Generator().manual_seed(0))
    assert torch.isfinite(draws).all() and (draws >= 0).all()
    assert stats.kstest(draws.numpy(), stats.gamma(shape).cdf).pvalue > 1e-3
    again = _standard_gamma(shapes, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_torch_count_draws_depend_only_on_the_generator():
    decoder, params = decoder_params("zinb", n_cells=50, n_genes=40)
    params = {k: v.detach() for k, v in params.items()}
    library = torch.full((50, 1), 300.0)
    first, second = (sample_counts("zinb", params, library, torch.Generator().manual_seed(5))
                     for _ in range(2))
    assert (first != second).nnz == 0 and first.nnz > 0
    first.check_format(full_check=True)
    other = sample_counts("zinb", params, library, torch.Generator().manual_seed(6))
    assert (first != other).nnz > 0


@pytest.mark.parametrize("poisson", [False, True])
def test_inverse_cdf_tail_on_the_host_gives_the_same_draws(poisson):
    # on a GPU the last entries of the inverse CDF finish in numpy: the same float64
    # arithmetic, so the same draws as stepping them all in torch (here every entry moves
    # to numpy at once, and again after a few steps)
    from scldiff.module._decoder import _positive_draws_with, _standard_gamma

    rng = np.random.default_rng(0)
    mu = torch.from_numpy(rng.uniform(0.01, 12.0, 20_000))  # above 10: Gamma-Poisson
    theta = None if poisson else torch.from_numpy(rng.uniform(0.05, 5.0, 20_000))
    p_zero = torch.exp(-mu) if poisson else (theta / (theta + mu)) ** theta

    def draws(host_below):
        generator = torch.Generator().manual_seed(1)
        return _positive_draws_with(
            mu, theta, p_zero, torch, lambda mask: torch.nonzero(mask).squeeze(1),
            lambda n: torch.rand(n, generator=generator, dtype=torch.float64),
            lambda shape, scale: _standard_gamma(shape, generator) * scale,
            lambda rate: torch.poisson(rate, generator=generator), host_below=host_below)

    on_device = draws(0)
    assert (on_device >= 1).all() and on_device.max() > 20  # a tail of many steps
    for host_below in (10**9, 500):
        assert torch.equal(draws(host_below), on_device)


@pytest.mark.parametrize("poisson", [False, True])
def test_compiled_inverse_cdf_gives_the_vectorised_draws(poisson):
    # the CPU's compiled loop, entry by entry, against the vectorised steps (the torch
    # sampler's) from the same CDF levels: the same float64 arithmetic, the same draws,
    # including long tails (means up to 10, dispersions down to 0.05)
    from scldiff.module._decoder import _positive_draws_with

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
    vectorised = _positive_draws_with(mu, theta, p_zero, np, np.flatnonzero,
                                      lambda size: uniforms, None, None)
    compiled = _inverse_cdf_in_thread(mu, theta, p_zero, uniforms)
    assert np.array_equal(compiled, vectorised) and vectorised.max() > 30


def test_csr_from_tensors_matches_csr():
    from scldiff.module._decoder import _csr_from_tensors, _to_host

    dense = np.random.default_rng(2).poisson(0.3, size=(7, 9)).astype(np.float64)
    dense[3] = 0  # an empty row
    rows, cols = np.nonzero(dense)
    expected = sp.csr_matrix(dense)
    got = _csr_from_tensors(torch.from_numpy(rows), torch.from_numpy(cols),
                            torch.from_numpy(dense[rows, cols]), 7, 9)
    got.check_format(full_check=True)
    assert got.dtype == np.float32 and got.indices.dtype == np.int32
    assert (got != expected).nnz == 0 and np.array_equal(got.toarray(), dense)
    assert np.array_equal(_to_host(torch.arange(5)), np.arange(5))


def _leaf(shape, gen, scale=1.0):
    """A float64 standard normal tensor times ``scale``, requiring its gradient."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("per_cell_theta", [False, True])
def test_zinb_log_zero_and_its_written_out_gradient_match_autograd(per_cell_theta):
    # the ZINB's log P(X = 0) with its own backward: the value of the logaddexp form, and
    # gradients that torch's finite-difference check accepts, in float64, from means far
    # below to far above theta and dropout logits far out in both tails; the inverse
    # dispersions one per gene, or one per cell and gene (dispersion="gene-label")
    import torch.nn.functional as F

    from scldiff.module import zinb_log_zero

    gen = torch.Generator().manual_seed(3)
    n, g = 5, 7
    log_mu, logits = _leaf((n, g), gen, 6), _leaf((n, g), gen, 8)
    log_theta = _leaf((n, g) if per_cell_theta else (g,), gen, 2)

    def reference(log_mu, logits, log_theta):
        log_nb_zero = log_theta.exp() * (log_theta - torch.logaddexp(log_theta, log_mu))
        return torch.logaddexp(-F.softplus(-logits), -F.softplus(logits) + log_nb_zero)

    inputs = (log_mu, logits, log_theta)
    torch.testing.assert_close(zinb_log_zero(*inputs), reference(*inputs))
    assert torch.autograd.gradcheck(zinb_log_zero, inputs)
    weights = torch.randn(n, g, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad((zinb_log_zero(*inputs) * weights).sum(), inputs)
    theirs = torch.autograd.grad((reference(*inputs) * weights).sum(), inputs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    # only the gradients asked for
    (only_mu,) = torch.autograd.grad(
        (zinb_log_zero(log_mu, logits.detach(), log_theta.detach()) * weights).sum(), log_mu)
    torch.testing.assert_close(only_mu, theirs[0])


def test_gene_label_dispersion_gradients_and_errors():
    """The sparse likelihood's gradient reaches each label's own inverse dispersions."""
    decoder, _ = decoder_params("zinb", n_cells=6, n_genes=30, dispersion="gene-label")
    z, labels = torch.randn(6, 4), torch.tensor([0, 0, 2, 2, 2, 0])  # label 1 absent
    counts = np.random.default_rng(3).poisson(2.0, size=(6, 30)).astype(np.float32)
    x = sp.csr_matrix(counts)
    library = torch.full((6, 1), 100.0)
    args = (torch.from_numpy(x.indptr.astype(np.int64)), torch.from_numpy(x.indices.astype(
        np.int64)), torch.from_numpy(x.data))
    (g_sparse,) = torch.autograd.grad(
        sparse_log_likelihood("zinb", decoder(z, labels), library, *args).sum(),
        decoder.log_theta)
    (g_dense,) = torch.autograd.grad(decoder.distribution(decoder(z, labels), library).log_prob(
        torch.from_numpy(counts)).sum(), decoder.log_theta)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-4)
    assert g_sparse[1].abs().max() == 0 and g_sparse[0].abs().max() > 0
    with pytest.raises(ValueError, match="label codes"):
        decoder(z)
    with pytest.raises(ValueError, match="dispersion must be one of"):
        CountDecoder(4, 10, dispersion="cell")


@pytest.mark.parametrize("likelihood", ["zinb", "hurdle"])
def test_label_covariate_is_a_one_hot_input_of_the_hidden_layer(likelihood):
    """With ``label_covariate`` the decoder is the same network on ``[z, one-hot(label)]``:
    equal to a plain decoder of n_latent + n_labels inputs given that concatenation, in
    :meth:`forward` and :meth:`sampling_params`."""
    torch.manual_seed(0)
    decoder = CountDecoder(4, 30, n_hidden=8, likelihood=likelihood, n_labels=3,
                           label_covariate=True).eval()
    plain = CountDecoder(7, 30, n_hidden=8, likelihood=likelihood).eval()
    plain.load_state_dict(decoder.state_dict())
    z, labels = torch.randn(5, 4), torch.tensor([0, 2, 1, 2, 0])
    joined = torch.cat([z, torch.eye(3)[labels]], dim=1)
    for key, value in plain(joined).items():
        torch.testing.assert_close(decoder(z, labels)[key], value)
    for key, value in plain.sampling_params(joined).items():
        torch.testing.assert_close(decoder.sampling_params(z, labels)[key], value)
    with pytest.raises(ValueError, match="label codes"):
        decoder(z)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sampled_counts_follow_each_labels_dispersion(backend):
    """Cells of two labels with the same means: each label's count variance is that of its
    own inverse dispersion, mu + mu^2 / theta_label."""
    from scldiff.module import LapDDPMModule

    module = LapDDPMModule(n_input=6, n_labels=2, n_lpe=0, n_latent=2, n_hidden=8,
                           score_hidden=8, score_blocks=1, likelihood="nb",
                           dispersion="gene-label").eval()
    theta = torch.tensor([[0.5, 2.0, 20.0, 0.5, 2.0, 20.0], [20.0, 0.5, 2.0, 20.0, 0.5, 2.0]])
    with torch.no_grad():
        module.decoder.log_theta.copy_(theta.log())
    n = 40_000
    z = torch.zeros(n, 2)  # the same gene proportions for every cell
    labels = torch.arange(n) % 2
    counts = module.decode_counts(z, torch.full((n,), 60.0), np.random.default_rng(0),
                                  labels=labels) if backend == "numpy" else sample_counts(
        "nb", module.decoder.sampling_params(z, labels), torch.full((n, 1), 60.0),
        torch.Generator().manual_seed(0))
    counts = counts.toarray()
    with torch.no_grad():
        mean = 60.0 * module.decoder(z[:1], labels[:1])["scale"][0].double().numpy()
    for label in (0, 1):
        rows = counts[labels.numpy() == label]
        expected = mean + mean**2 / theta[label].double().numpy()
        np.testing.assert_allclose(rows.mean(0), mean, rtol=0.04)
        np.testing.assert_allclose(rows.var(0), expected, rtol=0.1)


@pytest.mark.parametrize("likelihood,dispersion", [
    ("zinb", "gene"), ("zinb", "gene-label"), ("nb", "gene"), ("hurdle", "gene-label"),
    ("poisson", "gene")])
def test_likelihood_from_the_decoders_logits_equals_the_normalised_one(likelihood,
                                                                      dispersion):
    # CountDecoder.forward(..., normalized=False), as training calls it: the logits of the
    # gene proportions, normalised inside sparse_log_likelihood (the ZINB's dense terms in
    # one function with a written-out gradient). The same values and gradients as from
    # log_scale, in float64, for every parameter, the library size and z
    decoder, _ = decoder_params(likelihood, n_cells=6, n_genes=40, dispersion=dispersion)
    decoder = decoder.double()
    rng = np.random.default_rng(4)
    labels = torch.arange(6) % 3 if dispersion == "gene-label" else None
    z = torch.randn(6, 4, dtype=torch.float64) * 2
    library = torch.tensor(rng.uniform(50, 3000, size=(6, 1)))
    counts = rng.poisson(rng.gamma(0.3, 4.0, size=(6, 40))).astype(np.float64)
    counts[0], counts[1, :5] = 0, 500  # a row with no stored values, large counts
    x = sp.csr_matrix(counts)
    args = (torch.from_numpy(x.indptr.astype(np.int64)),
            torch.from_numpy(x.indices.astype(np.int64)), torch.from_numpy(x.data))
    weights = torch.from_numpy(rng.normal(size=6))
    results = []
    for normalized in (True, False):
        decoder.zero_grad()
        z_in = z.clone().requires_grad_()
        lib = library.clone().requires_grad_()
        params = decoder(z_in, labels, normalized=normalized)
        assert ("log_scale" in params) == normalized
        assert ("scale_logits" in params) != normalized
        ll = sparse_log_likelihood(likelihood, params, lib, *args)
        (ll * weights).sum().backward()
        results.append((ll.detach(), z_in.grad, lib.grad,
                        {n: p.grad.clone() for n, p in decoder.named_parameters()}))
    (ll, g_z, g_lib, g_params), (ll_logits, g_z_logits, g_lib_logits, g_params_logits) = results
    torch.testing.assert_close(ll_logits, ll, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_z_logits, g_z, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_lib_logits, g_lib, rtol=1e-7, atol=1e-9)
    for name, grad in g_params.items():
        torch.testing.assert_close(g_params_logits[name], grad, rtol=1e-7, atol=1e-9,
                                   msg=name)


@pytest.mark.parametrize("per_cell_theta", [False, True])
def test_zinb_from_logits_passes_the_finite_difference_check(per_cell_theta):
    # every output (the zero terms' sums, the offsets, the logits at the stored entries)
    # and every input (logits, dropout logits far out in both tails, inverse dispersions
    # per gene or per cell, log library sizes) in float64
    from scldiff.module._decoder import _ZINBFromLogits

    gen = torch.Generator().manual_seed(5)
    n, g = 4, 6
    logits, zi_logits = _leaf((n, g), gen, 3), _leaf((n, g), gen, 6)
    log_theta = _leaf((n, g) if per_cell_theta else (g,), gen)
    log_library = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 6 + 2
                   ).requires_grad_()
    flat = torch.tensor([0, 3, 7, 8, 8 + 5, 3 * g + 1])  # row-major positions, row 1 twice

    def function(*inputs):
        return _ZINBFromLogits.apply(*inputs, flat)

    inputs = (logits, zi_logits, log_theta, log_library)
    assert torch.autograd.gradcheck(function, inputs)
    # the values: log P(X = 0) summed over genes, and log mu = logits + offset
    import torch.nn.functional as F

    from scldiff.module import zinb_log_zero

    zero, offset, logits_nz, zi_nz = function(*inputs)
    log_scale = F.log_softmax(logits, -1)
    log_scale = log_scale - torch.logsumexp(log_scale - F.softplus(zi_logits), -1, True)
    log_mu = log_library + log_scale
    torch.testing.assert_close(zero, zinb_log_zero(log_mu, zi_logits, log_theta).sum(-1))
    torch.testing.assert_close(logits + offset[:, None], log_mu)
    torch.testing.assert_close(logits_nz, logits.reshape(-1)[flat])
    torch.testing.assert_close(zi_nz, zi_logits.reshape(-1)[flat])


def test_zinb_from_logits_under_bf16_autocast_computes_in_float32():
    # under autocast the decoder's logits arrive in bf16: widened, the result in float32,
    # the gradients back in bf16
    decoder, _ = decoder_params("zinb", n_cells=5, n_genes=30)
    counts = np.random.default_rng(6).poisson(1.0, size=(5, 30)).astype(np.float32)
    x = sp.csr_matrix(counts)
    args = (torch.from_numpy(x.indptr.astype(np.int64)),
            torch.from_numpy(x.indices.astype(np.int64)), torch.from_numpy(x.data))
    library = torch.full((5, 1), 300.0)
    z = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = decoder(z, normalized=False)
        assert params["scale_logits"].dtype == torch.bfloat16
        ll = sparse_log_likelihood("zinb", params, library, *args)
    assert ll.dtype == torch.float32
    (g,) = torch.autograd.grad(ll.sum(), params["scale_logits"])
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    # as the same bf16 values give it in float64
    reference = sparse_log_likelihood(
        "zinb", {key: value.detach().double() for key, value in params.items()},
        library.double(), *args)
    torch.testing.assert_close(ll.double(), reference, rtol=1e-6, atol=1e-4)
