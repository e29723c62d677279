"""The count likelihoods (NB, ZINB, Poisson) with an explicit library size: their parameters,
their distribution and their log-likelihood on sparse counts, with written-out gradients."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from torch import Tensor
from torch.distributions import Distribution, Poisson

Likelihood = Literal["nb", "zinb", "poisson"]
LIKELIHOODS: tuple[str, ...] = ("nb", "zinb", "poisson")


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for lower precisions (bf16, float16), else ``dtype`` (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class CountParams:
    r"""Parameters of the counts of ``n`` cells over ``G`` genes, given the cells' library
    sizes :math:`\ell` (what :class:`~scldiff.module.CountDecoder` outputs).

    The gene proportions are :math:`\rho = \mathrm{softmax}(a)` of the logits :math:`a`.
    The negative binomial's mean is :math:`\mu_g = \ell\rho_g` (NB, Poisson), and for the
    ZINB, with dropout probabilities :math:`\pi_g = \sigma(l_g)`,

    .. math::
        \mu_g = \frac{\ell\rho_g}{\sum_h (1 - \pi_h)\rho_h},

    so that a cell's expected total count, :math:`\sum_g (1 - \pi_g)\mu_g`, is its library
    size, in training as in generation (scVI's ZINB puts :math:`\ell\rho` on the negative
    binomial, and its zeros remove part of it).

    Attributes
    ----------
    likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    logits
        ``(n, G)`` logits :math:`a` of the gene proportions (plus ``logits_bias``).
    log_theta
        ``(G,)`` log inverse dispersions :math:`\log\theta_g`; ``None`` for the Poisson.
    zi_logits
        ``(n, G)`` dropout logits :math:`l` of the ZINB (plus ``zi_bias``); else ``None``.
    logits_bias, zi_bias
        ``(G,)`` biases still to be added to ``logits`` and ``zi_logits``, where the decoder
        leaves them apart for the CPU sampler, which adds them in its own pass.
    """

    likelihood: Likelihood
    logits: Tensor
    log_theta: Tensor | None = None
    zi_logits: Tensor | None = None
    logits_bias: Tensor | None = None
    zi_bias: Tensor | None = None

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got "
                             f"{self.likelihood!r}.")
        if (self.log_theta is None) != (self.likelihood == "poisson"):
            raise ValueError(f"The {self.likelihood!r} likelihood "
                             f"{'has no' if self.likelihood == 'poisson' else 'needs'} "
                             "log_theta.")
        if (self.zi_logits is None) != (self.likelihood != "zinb"):
            raise ValueError("zi_logits are given for the ZINB, and only for it.")

    def with_biases(self) -> CountParams:
        """The same parameters with the biases added to the logits (in float32); itself
        where there are none."""
        if self.logits_bias is None and self.zi_bias is None:
            return self

        def add(value: Tensor | None, bias: Tensor | None) -> Tensor | None:
            if value is None or bias is None:
                return value
            return value.float() + bias.float()

        return replace(self, logits=add(self.logits, self.logits_bias),
                       zi_logits=add(self.zi_logits, self.zi_bias),
                       logits_bias=None, zi_bias=None)

    def log_scale(self) -> Tensor:
        r""":math:`\log(\mu / \ell)`, ``(n, G)``, in float32 at least: :math:`\log\rho`, for
        the ZINB minus :math:`\log\sum_h (1 - \pi_h)\rho_h`."""
        params = self.with_biases()
        logits = params.logits.to(_at_least_float32(params.logits.dtype))
        log_rho = F.log_softmax(logits, dim=-1)
        if params.zi_logits is None:
            return log_rho
        # log(1 - pi) = -softplus(l)
        return log_rho - torch.logsumexp(log_rho - F.softplus(params.zi_logits), -1,
                                         keepdim=True)

    @torch.no_grad()
    def scale_and_kept(self) -> tuple[Tensor, Tensor | None]:
        r""":math:`\mu / \ell` and, for the ZINB, :math:`1 - \pi`, both ``(n, G)`` float32
        without gradients (``None`` in place of :math:`1 - \pi` otherwise)."""
        params = self.with_biases()
        scale = torch.softmax(params.logits.detach(), dim=-1, dtype=torch.float32)
        if params.zi_logits is None:
            return scale, None
        kept = torch.sigmoid(-params.zi_logits.detach().float())
        return scale.div_(torch.linalg.vecdot(kept, scale)[:, None]), kept

    def distribution(self, library: Tensor) -> Distribution:
        """The count distribution of cells with library sizes ``library`` (``(n, 1)``),
        as scvi-tools' (NB, ZINB) or torch's (Poisson) distribution objects."""
        mu = library * self.log_scale().exp()
        if self.likelihood == "poisson":
            return Poisson(mu.clamp_min(1e-8))
        theta = self.log_theta.exp().expand_as(mu)
        if self.likelihood == "nb":
            return NegativeBinomial(mu=mu, theta=theta)
        return ZeroInflatedNegativeBinomial(mu=mu, theta=theta,
                                            zi_logits=self.with_biases().zi_logits)


def zinb_log_zero(log_mu: Tensor, zi_logits: Tensor, log_theta: Tensor) -> Tensor:
    r""":math:`\log P(X = 0)` of the ZINB entry by entry, :math:`\log(\pi + (1 -
    \pi)\,\mathrm{NB}(0))`, with :math:`\pi = \sigma(l)` for the dropout logits :math:`l`
    and :math:`\mathrm{NB}(0) = e^{-\theta s}`, :math:`s = \log(1 + \mu/\theta)`.

    Computed as :math:`\mathrm{softplus}(-l - \theta s) - \mathrm{softplus}(-l)`, stable
    for logits and means of any size (arguments broadcast)."""
    s = F.softplus(log_mu - log_theta)
    return F.softplus(-zi_logits - log_theta.exp() * s) - F.softplus(-zi_logits)


class _ZINBFromLogits(torch.autograd.Function):
    r"""The dense part of the ZINB's sparse log-likelihood, from the decoder's logits, with
    its gradient written out.

    For cell :math:`i` with logits :math:`a_g`, dropout logits :math:`l_g` (:math:`k_g =
    1 - \pi_g = \sigma(-l_g)`) and library :math:`\ell`, the means are :math:`\log\mu_g =
    a_g + c` with the cell's offset :math:`c = \log\ell - m - \log\sum_h e_h k_h`,
    :math:`e_h = \exp(a_h - m)`, :math:`m = \max_h a_h`. Returns the sum over genes of the
    zero terms :math:`Z_g = \log P(X_g = 0)` (:func:`zinb_log_zero`), the offsets
    :math:`c`, and :math:`a` and :math:`l` at the stored entries (``flat``: their row-major
    positions), from which the caller computes the nonzero entries' terms.

    With :math:`d = \log\mu - \log\theta`, :math:`s = \mathrm{softplus}(d)` and :math:`t =
    -l - \theta s`, :math:`Z = \mathrm{softplus}(t) - \mathrm{softplus}(-l)` has
    :math:`\partial Z/\partial l = \sigma(-l) - \sigma(t)`, :math:`\partial Z/\partial\log\mu
    = -\theta\sigma(t)\sigma(d)` and :math:`\partial Z/\partial\log\theta =
    -\theta\sigma(t)(s - \sigma(d))`. With :math:`G_g = \partial L / \partial\log\mu_g`
    and :math:`C = \sum_g G_g + \partial L / \partial c`, the gradients are
    :math:`\partial L/\partial a_g = G_g - C w_g` and, through :math:`c`, :math:`+\, C w_g
    (1 - k_g)` for :math:`l_g`, with :math:`w_g = e_g k_g / \sum_h e_h k_h`: the softmax and
    the renormalisation need no backward pass of their own.

    Computed in float32 at least (bf16 inputs from autocast are widened); the gradients are
    cast back to the inputs' types. Not twice differentiable. The sum :math:`\sum_h e_h
    k_h` is taken in linear space: it underflows to zero only where every product
    :math:`e_h k_h` of a cell does (dropout logits above about 100 for all its genes), and
    the loss is then not finite, which stops training.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, zi_logits: Tensor, log_theta: Tensor,
                log_library: Tensor, flat: Tensor):
        with torch.autocast(logits.device.type, enabled=False):
            dtype = _at_least_float32(logits.dtype)
            a, zl = logits.to(dtype), zi_logits.to(dtype)
            log_theta = log_theta.to(dtype)
            m = a.amax(1, keepdim=True)
            e = torch.sub(a, m).exp_()
            negated = torch.neg(zl)
            kept = torch.sigmoid(negated)
            total = torch.linalg.vecdot(e, kept)
            offset = log_library.reshape(-1).to(dtype) - m.reshape(-1) - torch.log(total)
            theta = log_theta.exp()
            d = torch.sub(a, log_theta).add_(offset[:, None])  # log mu - log theta
            s = F.softplus(d)
            t = torch.addcmul(negated, theta, s, value=-1)
            zero = F.softplus(t).sum(1) - F.softplus(negated).sum(1)
            ctx.save_for_backward(e, kept, total, d, s, t, theta, flat)
            return zero, offset, a.reshape(-1)[flat], zl.reshape(-1)[flat]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_zero, grad_offset, grad_a_stored, grad_l_stored):
        e, kept, total, d, s, t, theta, flat = ctx.saved_tensors
        with torch.autocast(e.device.type, enabled=False):
            if grad_zero is None:
                grad_zero = e.new_zeros(e.shape[0])
            st = torch.sigmoid(t)
            grad_l = torch.sub(kept, st)  # dZ/dl
            u = st.mul_(theta)  # theta sigma(t)
            sd = torch.sigmoid(d)
            grad_log_theta = None
            if ctx.needs_input_grad[2]:  # dZ/dlog theta = -theta sigma(t) (s - sigma(d))
                grad_log_theta = -(grad_zero @ torch.sub(s, sd).mul_(u))
            g = grad_zero[:, None]
            grad_a = u.mul_(sd).mul_(-g)  # G = dL/dlog mu, from dZ/dlog mu
            c = grad_a.sum(1)
            if grad_offset is not None:
                c = c + grad_offset
            w = torch.mul(e, kept).mul_(total.reciprocal()[:, None])
            grad_a.addcmul_(w, c[:, None], value=-1)
            if grad_a_stored is not None:
                grad_a.view(-1).index_add_(0, flat, grad_a_stored.to(grad_a.dtype))
            grad_l.mul_(g).addcmul_(torch.addcmul(w, w, kept, value=-1), c[:, None])
            if grad_l_stored is not None:
                grad_l.view(-1).index_add_(0, flat, grad_l_stored.to(grad_l.dtype))
            grad_library = c[:, None] if ctx.needs_input_grad[3] else None
        return grad_a, grad_l, grad_log_theta, grad_library, None


def _nb_log_pmf(x: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    r""":math:`\log \mathrm{NB}(x; \mu, \theta)` entry by entry, from :math:`\log\mu` and
    :math:`\log\theta`."""
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    return (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
            + theta * (log_theta - log_theta_mu) + x * (log_mu - log_theta_mu))


def sparse_log_likelihood(params: CountParams, library: Tensor, crow: Tensor, col: Tensor,
                          value: Tensor) -> Tensor:
    r"""Per-cell :math:`\log p(x \mid z)` for counts stored as CSR rows (zeros implicit).

    Most counts are zero, and at zero every likelihood has a closed form without
    :math:`\log\Gamma`: :math:`\log \mathrm{NB}(0) = \theta(\log\theta - \log(\theta +
    \mu))`, :math:`\log \mathrm{Poisson}(0) = -\mu`, :math:`\log \mathrm{ZINB}(0)` as in
    :func:`zinb_log_zero`. The sum over genes is the zero term of every gene, corrected at
    the stored counts, so the :math:`\log\Gamma` terms cost in proportion to the nonzero
    counts. For the ZINB the dense terms and their gradient come from one function
    (:class:`_ZINBFromLogits`), which also normalises the logits. Equal to
    ``params.distribution(library).log_prob(x).sum(-1)``.

    Parameters
    ----------
    params
        The decoder's output for ``n`` cells.
    library
        ``(n, 1)`` library sizes.
    crow, col, value
        CSR structure of the ``(n, n_genes)`` counts.

    Returns
    -------
    ``(n,)`` log-likelihoods.
    """
    params = params.with_biases()
    rows = torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device),
                                   crow.diff())
    log_library = torch.log(library.reshape(-1, 1))
    if params.likelihood == "zinb":
        zero_sum, offset, logits_nz, zi_logits_nz = _ZINBFromLogits.apply(
            params.logits, params.zi_logits, params.log_theta, log_library,
            rows * params.logits.shape[1] + col)
        log_mu_nz = logits_nz + offset[rows]
        log_theta_nz = params.log_theta[col]
        # log(1 - pi) + log NB(x), in place of the zero term counted for every gene
        nonzero = (-F.softplus(zi_logits_nz) + _nb_log_pmf(value, log_mu_nz, log_theta_nz)
                   - zinb_log_zero(log_mu_nz, zi_logits_nz, log_theta_nz))
        return zero_sum.index_add(0, rows, nonzero)
    log_mu = log_library + params.log_scale()
    log_mu_nz = log_mu[rows, col]
    if params.likelihood == "poisson":
        # the -mu of the nonzero counts is already in the zero terms
        nonzero = value * log_mu_nz - torch.lgamma(value + 1.0)
        return (-log_mu.exp()).sum(-1).index_add(0, rows, nonzero)
    log_theta = params.log_theta
    log_nb_zero = log_theta.exp() * (log_theta - torch.logaddexp(log_theta, log_mu))
    nonzero = _nb_log_pmf(value, log_mu_nz, log_theta[col]) - log_nb_zero[rows, col]
    return log_nb_zero.sum(-1).index_add(0, rows, nonzero)
