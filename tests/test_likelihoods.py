"""The count likelihoods against scipy, the sparse log-likelihood and its written-out
gradients against autograd, the decoder's parameters, the KL term."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy import stats

from scldiff.distributions import CountParams, sparse_log_likelihood, zinb_log_zero
from scldiff.distributions._likelihood import _ZINBFromLogits
from scldiff.module import CountDecoder, gaussian_kl


def decoder_params(likelihood, n_cells=3, n_genes=5, seed=0):
    """A small decoder with spread inverse dispersions, and its parameters."""
    torch.manual_seed(seed)
    decoder = CountDecoder(4, n_genes, n_hidden=8, likelihood=likelihood)
    if decoder.log_theta is not None:
        with torch.no_grad():
            decoder.log_theta.copy_(torch.linspace(-1.0, 2.0, n_genes))
    return decoder, decoder(torch.randn(n_cells, 4))


def csr_args(counts):
    x = sp.csr_matrix(counts)
    return (torch.from_numpy(x.indptr.astype(np.int64)),
            torch.from_numpy(x.indices.astype(np.int64)), torch.from_numpy(x.data))


def _numpy(params: CountParams, library):
    """Means, inverse dispersions and dropout probabilities in float64."""
    mu = (library * params.log_scale().exp()).detach().double().numpy()
    theta = None if params.log_theta is None else params.log_theta.exp().detach().double()\
        .numpy()
    pi = None if params.zi_logits is None else torch.sigmoid(params.zi_logits).detach()\
        .double().numpy()
    return mu, theta, pi


def _scipy_log_pmf(likelihood, counts, mu, theta, pi):
    if likelihood == "poisson":
        return stats.poisson.logpmf(counts, mu)
    nb = stats.nbinom.logpmf(counts, n=theta, p=theta / (theta + mu))
    if likelihood == "nb":
        return nb
    return np.log(np.where(counts == 0, pi + (1 - pi) * np.exp(nb), (1 - pi) * np.exp(nb)))


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_count_distributions_match_scipy(likelihood):
    _, params = decoder_params(likelihood)
    library = torch.tensor([[300.0], [30.0], [3000.0]])
    x = torch.tensor([[0, 1, 0, 4, 9], [0, 0, 2, 0, 1], [40, 0, 8, 0, 300]], dtype=torch.float32)
    expected = _scipy_log_pmf(likelihood, x.numpy(), *_numpy(params, library))
    got = params.distribution(library).log_prob(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_decoder_mean_is_library_times_proportions(likelihood):
    _, params = decoder_params(likelihood)
    px = params.distribution(torch.full((3, 1), 1234.0))
    scale, kept = params.scale_and_kept()
    torch.testing.assert_close(scale, params.log_scale().exp().detach())
    if likelihood == "zinb":  # the NB's mean makes up for the zeros: E[X] = (1 - pi) mu
        assert (scale.sum(-1) > 1).all()
        torch.testing.assert_close(kept, torch.sigmoid(-params.zi_logits).detach())
        torch.testing.assert_close(px.mean, 1234.0 * kept * scale)
    else:
        assert kept is None
        torch.testing.assert_close(scale.sum(-1), torch.ones(3))
        torch.testing.assert_close(px.mean, 1234.0 * torch.softmax(params.logits, -1))
    # a cell's expected total is its library size
    torch.testing.assert_close(px.mean.sum(-1), torch.full((3,), 1234.0))


def test_gaussian_kl_matches_torch_distributions():
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 3), torch.ones(4, 3))
    torch.testing.assert_close(gaussian_kl(mean, logvar),
                               torch.distributions.kl_divergence(q, p).sum(-1))


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_sparse_log_likelihood_equals_scipy(likelihood):
    rng = np.random.default_rng(1)
    _, params = decoder_params(likelihood, n_cells=6, n_genes=40)
    library = torch.tensor(rng.uniform(50, 3000, size=(6, 1)), dtype=torch.float32)
    counts = rng.poisson(rng.gamma(0.3, 4.0, size=(6, 40))).astype(np.float32)
    counts[0] = 0  # a row with no stored values
    sparse = sparse_log_likelihood(params, library, *csr_args(counts))
    expected = _scipy_log_pmf(likelihood, counts, *_numpy(params, library)).sum(-1)
    np.testing.assert_allclose(sparse.detach().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_sparse_log_likelihood_and_its_gradients_equal_the_dense_distributions(likelihood):
    # the sparse path (for the ZINB through the function with the written-out gradient)
    # against autograd through the dense distribution's log_prob, in float64: the values
    # and the gradients of every parameter, z and the library size (scVI's distributions
    # add 1e-8 inside their logarithms: agreement to about 1e-7)
    decoder, _ = decoder_params(likelihood, n_cells=6, n_genes=40)
    decoder = decoder.double()
    rng = np.random.default_rng(4)
    z = torch.randn(6, 4, dtype=torch.float64) * 2
    library = torch.tensor(rng.uniform(50, 3000, size=(6, 1)))
    counts = rng.poisson(rng.gamma(0.3, 4.0, size=(6, 40))).astype(np.float64)
    counts[0], counts[1, :5] = 0, 500  # a row with no stored values, large counts
    weights = torch.from_numpy(rng.normal(size=6))
    results = []
    for path in ("sparse", "dense"):
        decoder.zero_grad()
        z_in, lib = z.clone().requires_grad_(), library.clone().requires_grad_()
        params = decoder(z_in)
        ll = sparse_log_likelihood(params, lib, *csr_args(counts)) if path == "sparse" \
            else params.distribution(lib).log_prob(torch.from_numpy(counts)).sum(-1)
        (ll * weights).sum().backward()
        results.append((ll.detach(), z_in.grad, lib.grad,
                        {n: p.grad.clone() for n, p in decoder.named_parameters()}))
    (ll, g_z, g_lib, g_params), (ref, r_z, r_lib, r_params) = results
    torch.testing.assert_close(ll, ref, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(g_z, r_z, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_lib, r_lib, rtol=1e-6, atol=1e-7)
    for name, grad in r_params.items():
        torch.testing.assert_close(g_params[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def _leaf(shape, gen, scale=1.0):
    """A float64 standard normal tensor times ``scale``, requiring its gradient."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def test_zinb_log_zero_matches_the_mixture_far_out_in_every_tail():
    # log(pi + (1 - pi) NB(0)) as logaddexp of its terms, in float64, from means far below
    # to far above theta and dropout logits far out in both tails; values and gradients
    gen = torch.Generator().manual_seed(3)
    log_mu, logits, log_theta = _leaf((5, 7), gen, 6), _leaf((5, 7), gen, 8), _leaf(7, gen, 2)

    def reference(log_mu, logits, log_theta):
        log_nb_zero = log_theta.exp() * (log_theta - torch.logaddexp(log_theta, log_mu))
        return torch.logaddexp(-F.softplus(-logits), -F.softplus(logits) + log_nb_zero)

    inputs = (log_mu, logits, log_theta)
    torch.testing.assert_close(zinb_log_zero(*inputs), reference(*inputs))
    weights = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad((zinb_log_zero(*inputs) * weights).sum(), inputs)
    theirs = torch.autograd.grad((reference(*inputs) * weights).sum(), inputs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_zinb_from_logits_passes_the_finite_difference_check():
    # every output (the zero terms' sums, the offsets, the logits at the stored entries)
    # and every input (logits, dropout logits far out in both tails, inverse dispersions,
    # log library sizes) in float64, and the values against the normalised formulas
    gen = torch.Generator().manual_seed(5)
    n, g = 4, 6
    logits, zi_logits = _leaf((n, g), gen, 3), _leaf((n, g), gen, 6)
    log_theta = _leaf((g,), gen)
    log_library = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 6 + 2
                   ).requires_grad_()
    flat = torch.tensor([0, 3, 7, 8, 8 + 5, 3 * g + 1])  # row-major positions, row 1 twice

    def function(*inputs):
        return _ZINBFromLogits.apply(*inputs, flat)

    inputs = (logits, zi_logits, log_theta, log_library)
    assert torch.autograd.gradcheck(function, inputs)
    zero, offset, logits_nz, zi_nz = function(*inputs)
    log_mu = log_library + CountParams("zinb", logits, log_theta, zi_logits).log_scale()
    torch.testing.assert_close(zero, zinb_log_zero(log_mu, zi_logits, log_theta).sum(-1))
    torch.testing.assert_close(logits + offset[:, None], log_mu)
    torch.testing.assert_close(logits_nz, logits.reshape(-1)[flat])
    torch.testing.assert_close(zi_nz, zi_logits.reshape(-1)[flat])


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_sparse_log_likelihood_under_bf16_autocast_computes_in_float32(likelihood):
    # under autocast the decoder's logits arrive in bf16: widened, the result in float32,
    # the gradients back in bf16, and the value that of the same bf16 logits in float64
    decoder, _ = decoder_params(likelihood, n_cells=5, n_genes=30)
    counts = np.random.default_rng(6).poisson(1.0, size=(5, 30)).astype(np.float32)
    library = torch.full((5, 1), 300.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = decoder(torch.randn(5, 4))
        assert params.logits.dtype == torch.bfloat16
        ll = sparse_log_likelihood(params, library, *csr_args(counts))
    assert ll.dtype == torch.float32
    (g,) = torch.autograd.grad(ll.sum(), params.logits)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    wide = CountParams(likelihood, params.logits.detach().double(),
                       params.log_theta.detach().double(),
                       None if params.zi_logits is None else params.zi_logits.detach().double())
    torch.testing.assert_close(ll.double(), sparse_log_likelihood(wide, library.double(),
                                                                  *csr_args(counts)),
                               rtol=1e-6, atol=1e-4)


def test_decoder_covariates_are_one_hot_inputs_of_the_hidden_layer():
    # the decoder reading two categorical attributes is the same network on
    # [z, one-hot(first), one-hot(second)]
    torch.manual_seed(0)
    decoder = CountDecoder(4, 30, n_hidden=8, likelihood="zinb", n_categories=[3, 2]).eval()
    plain = CountDecoder(9, 30, n_hidden=8, likelihood="zinb").eval()
    plain.load_state_dict(decoder.state_dict())
    z = torch.randn(5, 4)
    codes = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 1], [0, 0]])
    ours = decoder(z, codes)
    theirs = plain(torch.cat([z, torch.eye(3)[codes[:, 0]], torch.eye(2)[codes[:, 1]]], dim=1))
    torch.testing.assert_close(ours.logits, theirs.logits)
    torch.testing.assert_close(ours.zi_logits, theirs.zi_logits)
    with pytest.raises(ValueError, match="categorical attributes"):
        decoder(z)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_biases_given_apart_are_the_same_parameters(likelihood):
    decoder, _ = decoder_params(likelihood, n_cells=4, n_genes=30)
    z = torch.randn(4, 4)
    with torch.no_grad():
        whole, apart = decoder(z), decoder(z, bias_apart=True)
    assert apart.logits_bias is not None and (apart.zi_bias is None) == (likelihood != "zinb")
    joined = apart.with_biases()
    torch.testing.assert_close(joined.logits, whole.logits)
    if likelihood == "zinb":
        torch.testing.assert_close(joined.zi_logits, whole.zi_logits)
    for a, b in zip(apart.scale_and_kept(), whole.scale_and_kept(), strict=True):
        torch.testing.assert_close(a, b)


def test_count_params_refuse_parameters_their_likelihood_lacks_or_ignores():
    logits, log_theta = torch.zeros(2, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        CountParams("hurdle", logits, log_theta)
    with pytest.raises(ValueError, match="needs log_theta"):
        CountParams("nb", logits)
    with pytest.raises(ValueError, match="has no log_theta"):
        CountParams("poisson", logits, log_theta)
    with pytest.raises(ValueError, match="zi_logits"):
        CountParams("zinb", logits, log_theta)
    with pytest.raises(ValueError, match="zi_logits"):
        CountParams("nb", logits, log_theta, zi_logits=logits)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        CountDecoder(4, 10, likelihood="hurdle")
