"""Count decoder p(x | z, library): NB, ZINB, hurdle NB or Poisson with an explicit library
size."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from torch import Tensor, nn
from torch.distributions import Distribution, Poisson

from ._csr import entry_rows

Likelihood = Literal["nb", "zinb", "hurdle", "poisson"]
LIKELIHOODS: tuple[str, ...] = ("nb", "zinb", "hurdle", "poisson")
Dispersion = Literal["gene", "gene-label"]
DISPERSIONS: tuple[str, ...] = ("gene", "gene-label")


def _log_scale(logits: Tensor, zi_logits: Tensor | None) -> Tensor:
    r""":math:`\log(\mu / \ell)` from the logits of the gene proportions :math:`\rho`:
    :math:`\log\rho`, and for the ZINB (``zi_logits``) minus :math:`\log\sum_h (1 -
    \pi_h)\rho_h`, so that the ZINB's mean is :math:`\ell\rho`."""
    log_scale = F.log_softmax(logits, dim=-1)
    if zi_logits is None:
        return log_scale
    # log(1 - pi) = -softplus(logits)
    log_kept = torch.logsumexp(log_scale - F.softplus(zi_logits), -1, keepdim=True)
    return log_scale - log_kept


class CountDecoder(nn.Module):
    r"""MLP :math:`z \mapsto` gene proportions :math:`\rho` (softmax), mean :math:`\ell\rho`.

    The negative binomial has one inverse dispersion :math:`\theta_g` per gene (or, with
    ``dispersion="gene-label"``, one per gene and cell label, as scVI's option of that
    name), the ZINB adds per-cell dropout probabilities :math:`\pi_g`.

    Unlike scVI, whose ZINB puts :math:`\ell\rho` on the negative binomial so that the
    zeros remove part of it, the ZINB's own mean is :math:`\ell\rho`: the negative binomial
    has mean :math:`\mu_g = \ell\rho_g / \sum_h (1 - \pi_h)\rho_h`, so a cell's expected
    total count is exactly its library size :math:`\ell`, in training as at generation (on
    PBMC3K this lowered the real-vs-generated random-forest AUC from 0.72 to 0.62;
    ``benchmarks/``). ``params["scale"]`` is :math:`\mu / \ell`.

    The hurdle negative binomial (:class:`HurdleNegativeBinomial`) has a per-cell
    probability :math:`p_g` of a nonzero count and above zero the negative binomial
    :math:`\mathrm{NB}(\ell\rho_g, \theta_g)` truncated at zero. Its zeros are fitted by
    their own Bernoulli likelihood, so their rate can be below the negative binomial's as
    well as above it (the ZINB's can only be above). An output layer gives the offset of
    :math:`\mathrm{logit}\, p_g` from the negative binomial's own :math:`\mathrm{logit}(1 -
    \mathrm{NB}(0))` (:func:`hurdle_logits`); it starts at zero, where the model is the
    negative binomial and the mean is :math:`\ell\rho_g`.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_output
        Number of genes.
    n_hidden
        Hidden width.
    n_layers
        Number of hidden layers.
    likelihood
        ``"nb"``, ``"zinb"``, ``"hurdle"`` or ``"poisson"``.
    dropout_rate
        Dropout after each hidden layer.
    dispersion
        ``"gene"`` or ``"gene-label"``; the latter needs the cells' label codes in
        :meth:`forward` and :meth:`sampling_params`.
    n_labels
        Number of labels (``dispersion="gene-label"`` or ``label_covariate``).
    label_covariate
        Give the hidden layers the cell's label (one-hot) beside ``z``, as scVI's decoder
        takes its categorical covariates: the latent then need not separate labels for the
        decoder to tell them apart. Needs the label codes in :meth:`forward` and
        :meth:`sampling_params`.
    """

    def __init__(
        self,
        n_latent: int,
        n_output: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        likelihood: Likelihood = "nb",
        dropout_rate: float = 0.0,
        dispersion: Dispersion = "gene",
        n_labels: int = 1,
        label_covariate: bool = False,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        if dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}.")
        self.likelihood = likelihood
        self.dispersion = dispersion
        self.n_labels = n_labels
        self.label_covariate = bool(label_covariate)
        layers: list[nn.Module] = []
        width = n_latent + (n_labels if self.label_covariate else 0)
        for _ in range(n_layers):
            layers += [nn.Linear(width, n_hidden), nn.LayerNorm(n_hidden), nn.GELU(),
                       nn.Dropout(dropout_rate)]
            width = n_hidden
        self.hidden = nn.Sequential(*layers)
        self.scale = nn.Linear(width, n_output)
        self.dropout_logits = nn.Linear(width, n_output) if likelihood == "zinb" else None
        self.detect_offset = None
        if likelihood == "hurdle":
            # logit P(X > 0) = logit(1 - NB(0)) + offset: zero at first, so that training
            # starts from the negative binomial and learns where the zeros depart from it
            self.detect_offset = nn.Linear(width, n_output)
            nn.init.zeros_(self.detect_offset.weight)
            nn.init.zeros_(self.detect_offset.bias)
        shape = (n_output,) if dispersion == "gene" else (n_labels, n_output)
        self.log_theta = nn.Parameter(torch.zeros(shape)) if likelihood != "poisson" else None

    def _log_theta(self, labels: Tensor | None) -> Tensor:
        """One log inverse dispersion per gene (``(n_genes,)``), or with
        ``dispersion="gene-label"`` one row per cell (``(n_cells, n_genes)``)."""
        if self.dispersion == "gene":
            return self.log_theta
        if labels is None:
            raise ValueError('dispersion="gene-label" needs the cells\' label codes.')
        return self.log_theta[labels.reshape(-1).long()]

    def _hidden(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """The last hidden layer, from ``z`` and (with ``label_covariate``) the labels."""
        if self.label_covariate:
            if labels is None:
                raise ValueError("A decoder with label_covariate=True needs the cells' "
                                 "label codes.")
            # scattered rather than F.one_hot, which checks the codes' range on the host
            # (a device synchronisation on a GPU); a code out of range fails in scatter_
            codes = labels.reshape(-1, 1).long()
            onehot = z.new_zeros(codes.shape[0], self.n_labels).scatter_(1, codes, 1.0)
            z = torch.cat([z, onehot], dim=-1)
        return self.hidden(z)

    def forward(self, z: Tensor, labels: Tensor | None = None, normalized: bool = True
                ) -> dict[str, Tensor]:
        """Likelihood parameters that do not depend on the library size (``labels``: the
        cells' label codes, needed with ``dispersion="gene-label"`` or
        ``label_covariate``). ``normalized=False`` gives the output layer's logits of the
        gene proportions, ``scale_logits``, in place of ``log_scale`` and ``scale``, dense
        tensors the training loss does not read: :func:`sparse_log_likelihood` normalises
        the logits itself, for the ZINB in one pass with its zero terms and their
        gradients."""
        h = self._hidden(z, labels)
        logits = self.scale(h)
        params: dict[str, Tensor] = {}
        if self.log_theta is not None:
            log_theta = self._log_theta(labels)
            params["theta"] = log_theta.exp().expand_as(logits)
            params["log_theta"] = log_theta
        if self.dropout_logits is not None:
            params["zi_logits"] = self.dropout_logits(h)
        if self.detect_offset is not None:
            params["detect_offset"] = self.detect_offset(h)
        if not normalized:
            params["scale_logits"] = logits
            return params
        params["log_scale"] = _log_scale(logits, params.get("zi_logits"))
        params["scale"] = params["log_scale"].exp()
        return params

    @torch.no_grad()
    def sampling_params(self, z: Tensor, labels: Tensor | None = None, logits: bool = False,
                        weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        r"""The parameters :func:`sample_counts` needs, in fewer passes than :meth:`forward`.

        ``scale`` (:math:`\mu / \ell`, as in :meth:`forward`), ``theta`` (one per gene, or
        one row per cell with ``dispersion="gene-label"``),
        for the ZINB ``kept`` (:math:`1 - \pi`), computed in linear rather than log space,
        and for the hurdle NB ``detect_offset`` (its :math:`P(X > 0)` needs the library
        size, which :func:`sample_counts` has): no gradients, and no ``log_scale`` or
        ``zi_logits``.

        ``logits=True`` (NB, ZINB and Poisson): the output layers' logits instead of
        ``scale`` and ``kept``, as ``scale_logits``, the hidden layer times the weights
        (float32, or bfloat16 under bf16 autocast), and ``scale_bias``, the biases to add,
        and for the ZINB ``zi_logits`` and ``zi_bias``. From these :func:`sample_counts` on
        a CPU computes the probabilities in its own pass over each cell
        (:func:`~scldiff.module._kernels.preselect_logits`), without writing them out, nor
        a copy of the biases for every cell, nor a float32 copy of bf16 products. The
        hurdle NB's parameters are the usual ones either way.

        ``weights``: the output layers' weights as :meth:`output_weights` gives them, for a
        caller that decodes many chunks under autocast and casts the weights once.
        """
        h = self._hidden(z, labels)
        params: dict[str, Tensor] = {}
        if self.log_theta is not None:
            params["theta"] = self._log_theta(labels).exp()
        if logits and self.detect_offset is None:
            if weights is None:
                weights = self.output_weights()
            for name, layer in self._output_layers().items():
                products = torch.mm(h, weights[name].t())
                # bf16 stays bf16: the CPU kernel widens it as it reads it
                if products.dtype not in (torch.float32, torch.bfloat16):
                    products = products.float()
                params[f"{name}_logits"] = products
                params[f"{name}_bias"] = layer.bias
            return params
        # softmax in one fused pass: on a CPU about 3.5x faster than log_softmax then exp.
        # In float32 also under autocast, where the products come out in bf16: the
        # elementwise passes that follow are then faster too, and need no conversion
        scale = torch.softmax(self.scale(h), dim=-1, dtype=torch.float32)  # rho
        if self.dropout_logits is not None:
            # 1 - pi = sigmoid(-logits): the negated logits come out of the matrix product
            # (beta = alpha = -1), then one sigmoid pass
            layer = self.dropout_logits
            kept = torch.addmm(layer.bias, h, layer.weight.t(), beta=-1, alpha=-1
                               ).float().sigmoid_()
            scale.div_(torch.linalg.vecdot(kept, scale)[:, None])  # rho / sum (1 - pi) rho
            params["kept"] = kept
        if self.detect_offset is not None:
            params["detect_offset"] = self.detect_offset(h)
        params["scale"] = scale
        return params

    def _output_layers(self) -> dict[str, nn.Linear]:
        """The output layers whose products :meth:`sampling_params` gives with
        ``logits=True``: ``"scale"``, and for the ZINB ``"zi"``."""
        layers = {"scale": self.scale, "zi": self.dropout_logits}
        return {name: layer for name, layer in layers.items() if layer is not None}

    def output_weights(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The weights of the output layers that :meth:`sampling_params` multiplies with
        ``logits=True`` (``"scale"``, and for the ZINB ``"zi"``), cast to ``dtype`` (as
        they are when ``None``)."""
        return {name: layer.weight.detach() if dtype is None
                else layer.weight.detach().to(dtype)
                for name, layer in self._output_layers().items()}

    def distribution(self, params: dict[str, Tensor], library: Tensor) -> Distribution:
        """The count distribution for cells of the given library sizes ``(batch, 1)``."""
        mu = library * params["scale"]
        if self.likelihood == "nb":
            return NegativeBinomial(mu=mu, theta=params["theta"])
        if self.likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(
                mu=mu, theta=params["theta"], zi_logits=params["zi_logits"]
            )
        if self.likelihood == "hurdle":
            log_nb_zero = -params["theta"] * torch.log1p(mu / params["theta"])
            return HurdleNegativeBinomial(
                mu, params["theta"], hurdle_logits(log_nb_zero, params["detect_offset"]))
        return Poisson(mu.clamp_min(1e-8))


# -log NB(0) is floored here in the hurdle's logits: at a mean that underflows, the logit
# of 1 - NB(0) = 0 would be -inf, and its gradient nan
_MIN_NB_POSITIVE = 1e-20


def hurdle_logits(log_nb_zero: Tensor, offset: Tensor) -> Tensor:
    r"""Logits of the hurdle's :math:`P(X > 0)`: :math:`\mathrm{logit}(1 -
    \mathrm{NB}(0)) + \delta`, with the decoder's offset :math:`\delta` (0: the negative
    binomial's own probability of a nonzero count).

    With :math:`y = -\log \mathrm{NB}(0)`, :math:`\mathrm{logit}(1 - e^{-y}) = \log(e^y -
    1) = y + \log(1 - e^{-y})`, stable for small and large :math:`y`.
    """
    return _hurdle_parts(-log_nb_zero, offset)[0]


def _hurdle_parts(nb_zero_nll: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    r""":func:`hurdle_logits` from :math:`y = -\log \mathrm{NB}(0)`, and :math:`\log(1 -
    \mathrm{NB}(0))`, which the likelihood of the nonzero counts needs too."""
    y = nb_zero_nll.clamp_min(_MIN_NB_POSITIVE)
    log_nb_positive = _log1mexp(-y)
    return y + log_nb_positive + offset, log_nb_positive


def _log1mexp(x: Tensor) -> Tensor:
    r""":math:`\log(1 - e^{x})` for :math:`x < 0`, accurate at both ends (Mächler, 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


class HurdleNegativeBinomial(Distribution):
    r"""Hurdle negative binomial: :math:`P(X > 0) = p`, and :math:`X \mid X > 0` the
    negative binomial :math:`\mathrm{NB}(\mu, \theta)` truncated at zero.

    .. math::
        P(0) = 1 - p, \qquad P(x) = p\, \frac{\mathrm{NB}(x; \mu, \theta)}
        {1 - \mathrm{NB}(0; \mu, \theta)} \quad (x \ge 1).

    Unlike the ZINB, whose zero inflation can only add zeros to the negative binomial's,
    the probability of a zero is a free parameter: it can be lower than the negative
    binomial's too. ``mu`` is the mean of the untruncated negative binomial; the mean is
    :math:`p\mu / (1 - \mathrm{NB}(0))`.

    Parameters
    ----------
    mu
        Mean of the negative binomial before truncation.
    theta
        Inverse dispersion.
    detect_logits
        Logits of :math:`p = P(X > 0)`.
    """

    arg_constraints: dict = {}
    support = torch.distributions.constraints.nonnegative_integer

    def __init__(self, mu: Tensor, theta: Tensor, detect_logits: Tensor,
                 validate_args: bool | None = None):
        self.mu, self.theta, self.detect_logits = torch.broadcast_tensors(
            mu, theta, detect_logits)
        super().__init__(self.mu.shape, validate_args=validate_args)

    def _log_nb_zero(self) -> Tensor:
        return -self.theta * torch.log1p(self.mu / self.theta)

    @property
    def mean(self) -> Tensor:
        p = torch.sigmoid(self.detect_logits)
        return p * self.mu / -torch.expm1(self._log_nb_zero())

    def log_prob(self, value: Tensor) -> Tensor:
        log_p0 = self._log_nb_zero()
        log_theta_mu = torch.log(self.theta + self.mu)
        log_nb = (torch.lgamma(value + self.theta) - torch.lgamma(self.theta)
                  - torch.lgamma(value + 1.0) + log_p0
                  + value * (torch.log(self.mu) - log_theta_mu))
        positive = -F.softplus(-self.detect_logits) + log_nb - _log1mexp(log_p0)
        return torch.where(value > 0, positive, -F.softplus(self.detect_logits))

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        p = torch.sigmoid(self.detect_logits).expand(shape)
        mu, theta = self.mu.expand(shape).double(), self.theta.expand(shape).double()
        where = torch.nonzero(torch.rand(shape) < p, as_tuple=False)
        out = torch.zeros(shape, dtype=torch.float64)
        index = tuple(where.t())
        m, t = mu[index], theta[index]
        values = _positive_draws_torch(m, t, torch.exp(-t * torch.log1p(m / t)),
                                       torch.default_generator)
        out[index] = values
        return out.to(self.mu.dtype)


class _ZINBLogZero(torch.autograd.Function):
    r""":math:`\log P(X = 0)` of the ZINB, entry by entry, with its gradient written out.

    With :math:`d = \log\mu - \log\theta`, :math:`s = \mathrm{softplus}(d) = \log(1 +
    \mu/\theta)` and :math:`t = -\theta s - l` (:math:`l` the dropout logit, :math:`\pi =
    \sigma(l)`), :math:`\log(\pi + (1 - \pi)\,\mathrm{NB}(0)) = \mathrm{softplus}(t) -
    \mathrm{softplus}(-l)`, whose derivatives are :math:`\partial/\partial l = \sigma(-l) -
    \sigma(t)`, :math:`\partial/\partial\log\mu = -\theta\sigma(t)\sigma(d)` and
    :math:`\partial/\partial\log\theta = -\theta\sigma(t)(s - \sigma(d))`. Autograd
    through the same formula as ``logaddexp`` of its terms takes about twice the time
    (and tensor operations) on a ``(128, 13713)`` batch.
    """

    @staticmethod
    def forward(ctx, log_mu: Tensor, logits: Tensor, log_theta: Tensor) -> Tensor:
        theta = log_theta.exp()
        negated = torch.neg(logits)
        d = log_mu - log_theta
        s = F.softplus(d)
        t = torch.addcmul(negated, theta, s, value=-1)
        ctx.save_for_backward(d, s, t, negated, theta)
        ctx.log_theta_shape = log_theta.shape
        return F.softplus(t).sub_(F.softplus(negated))

    @staticmethod
    def backward(ctx, grad: Tensor):
        d, s, t, negated, theta = ctx.saved_tensors
        weighted = torch.sigmoid(t).mul_(grad)  # grad * sigma(t)
        grad_logits = torch.sigmoid(negated).mul_(grad).sub_(weighted) \
            if ctx.needs_input_grad[1] else None
        weighted.mul_(theta)
        sd = torch.sigmoid(d)
        grad_log_theta = None
        if ctx.needs_input_grad[2]:
            grad_log_theta = (weighted * (sd - s)).sum_to_size(ctx.log_theta_shape)
        grad_log_mu = weighted.mul_(sd).neg_() if ctx.needs_input_grad[0] else None
        return grad_log_mu, grad_logits, grad_log_theta


class _ZINBFromLogits(torch.autograd.Function):
    r"""The dense part of the ZINB's sparse log-likelihood, from the decoder's logits, with
    its gradient written out.

    For cell :math:`i` with logits :math:`a_g` of its gene proportions, dropout logits
    :math:`l_g` (:math:`1 - \pi_g = k_g = \sigma(-l_g)`) and library :math:`\ell`, the
    means are :math:`\log\mu_g = a_g + c` with the cell's offset :math:`c = \log\ell - m
    - \log\sum_h e_h k_h`, :math:`e_h = \exp(a_h - m)`, :math:`m = \max_h a_h` (the
    decoder's ``log_scale`` plus :math:`\log\ell`, in one pass). Returns the sum over
    genes of the zero terms :math:`Z_g = \log P(X_g = 0)` (:class:`_ZINBLogZero`'s), the
    offsets :math:`c`, and :math:`a` and :math:`l` at the stored entries (``flat``: their
    row-major positions), from which the caller computes the nonzero entries' terms.

    With :math:`G_g = \partial L / \partial\log\mu_g` of the dense terms and :math:`C =
    \sum_g G_g + \partial L / \partial c`, the gradients are :math:`\partial L/\partial a_g
    = G_g - C w_g` and, through :math:`c`, :math:`+\, C w_g (1 - k_g)` for :math:`l_g`,
    with :math:`w_g = e_g k_g / \sum_h e_h k_h`; the softmax and the ZINB's
    renormalisation need no backward pass of their own. On a PBMC3K minibatch (128 cells,
    13,713 genes, 2 cores) the likelihood's forward and backward passes take 28 ms against
    37 ms through autograd.

    Computed in float32 at least (bf16 inputs, from autocast, are widened; float64 stays);
    the gradients are cast back to the inputs' types. Not twice differentiable. The sum
    :math:`\sum_h e_h k_h` is taken in linear space: it underflows to zero only where
    every one of a cell's products :math:`e_h k_h` does (for instance with dropout logits
    above about 100 for all its genes). The cell's offset is then infinite and the
    gradients NaN, which stops training (:class:`~scldiff.train.NonFiniteLossError`); the
    normalised path (``log_scale``) takes that sum in log space.
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
            ctx.log_theta_dim = log_theta.dim()
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
                x = torch.sub(s, sd).mul_(u)
                grad_log_theta = -(grad_zero @ x) if ctx.log_theta_dim == 1 \
                    else x.mul_(-grad_zero[:, None])
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


def zinb_log_zero(log_mu: Tensor, logits: Tensor, log_theta: Tensor) -> Tensor:
    r""":math:`\log P(X = 0)` of the ZINB with means :math:`e^{\log\mu}`, dropout logits
    (:math:`\pi = \sigma(\mathrm{logits})`) and log inverse dispersions ``log_theta``
    (broadcast to ``log_mu``), differentiable in all three (:class:`_ZINBLogZero`)."""
    return _ZINBLogZero.apply(log_mu, logits, log_theta)


def sparse_log_likelihood(
    likelihood: Likelihood,
    params: dict[str, Tensor],
    library: Tensor,
    crow: Tensor,
    col: Tensor,
    value: Tensor,
) -> Tensor:
    r"""Per-cell :math:`\log p(x \mid z)` for counts stored as CSR rows (zeros implicit).

    Most counts are zero, and at zero every likelihood has a closed form without
    :math:`\log\Gamma`: :math:`\log \mathrm{NB}(0) = \theta(\log\theta - \log(\theta +
    \mu))`, :math:`\log \mathrm{Poisson}(0) = -\mu`, :math:`\log \mathrm{ZINB}(0) =
    \log(\pi + (1 - \pi)\,\mathrm{NB}(0))`. The sum over genes is the zero term of every
    gene, corrected at the stored (non-zero) counts, so the cost of the
    :math:`\log\Gamma` terms is proportional to the non-zeros. Equal to
    ``distribution(params, library).log_prob(x).sum(-1)``.

    Parameters
    ----------
    likelihood
        ``"nb"``, ``"zinb"``, ``"hurdle"`` or ``"poisson"``.
    params
        Decoder output for ``n`` cells: with ``log_scale``, or with the logits
        ``scale_logits`` in its place (:meth:`CountDecoder.forward` with
        ``normalized=False``; the biases ``scale_bias`` and ``zi_bias`` added where given
        apart), which are normalised here. For the ZINB that happens in one function with
        the dense zero terms and a written-out gradient, the training loss's path.
    library
        ``(n, 1)`` library sizes.
    crow, col, value
        CSR structure of the ``(n, n_genes)`` counts.

    Returns
    -------
    ``(n,)`` log-likelihoods.
    """
    rows = entry_rows(crow, value.shape[0])
    x = value
    # from the decoder's logits (CountDecoder.forward(..., normalized=False)): the ZINB's
    # dense terms in one function with its own gradient, the others' log_scale here
    from_logits = "log_scale" not in params
    if from_logits and likelihood == "zinb":
        logits = _with_bias(params, "scale_logits", "scale_bias")
        zi_logits = _with_bias(params, "zi_logits", "zi_bias")
        zero_sum, offset, logits_nz, zi_logits_nz = _ZINBFromLogits.apply(
            logits, zi_logits, params["log_theta"], torch.log(library),
            rows * logits.shape[1] + col)
        log_mu_nz = logits_nz + offset[rows]
    else:
        if from_logits:
            logits = _with_bias(params, "scale_logits", "scale_bias")
            params = {**params, "log_scale": _log_scale(
                logits.to(_at_least_float32(logits.dtype)), None)}
        log_mu = torch.log(library) + params["log_scale"]
        log_mu_nz = log_mu[rows, col]
    if likelihood == "poisson":
        zero = -log_mu.exp()
        nonzero = x * log_mu_nz - torch.lgamma(x + 1.0)  # the -mu part is already in `zero`
        return zero.sum(-1).index_add(0, rows, nonzero)
    log_theta = params["log_theta"]  # (n_genes,) or, per gene and label, (n, n_genes)
    log_theta_nz = log_theta[col] if log_theta.dim() == 1 else log_theta[rows, col]
    theta_nz = log_theta_nz.exp()
    log_theta_mu_nz = torch.logaddexp(log_theta_nz, log_mu_nz)
    log_nb_nz = (
        torch.lgamma(x + theta_nz) - torch.lgamma(theta_nz) - torch.lgamma(x + 1.0)
        + theta_nz * (log_theta_nz - log_theta_mu_nz)
        + x * (log_mu_nz - log_theta_mu_nz)
    )
    if likelihood == "zinb":
        if from_logits:  # the dense zero terms' sum came with the offsets
            zero_nz = zinb_log_zero(log_mu_nz, zi_logits_nz, log_theta_nz)
        else:  # the dense zero terms in one function with its own gradient
            zi_logits = params["zi_logits"]
            zero = zinb_log_zero(log_mu, zi_logits, log_theta)
            zero_sum, zero_nz, zi_logits_nz = zero.sum(-1), zero[rows, col], zi_logits[rows, col]
        nonzero = -F.softplus(zi_logits_nz) + log_nb_nz  # log(1 - pi) + log NB(x)
        return zero_sum.index_add(0, rows, nonzero - zero_nz)
    theta = log_theta.exp()
    if likelihood == "nb":
        log_nb_zero = theta * (log_theta - torch.logaddexp(log_theta, log_mu))
        return log_nb_zero.sum(-1).index_add(0, rows, log_nb_nz - log_nb_zero[rows, col])
    if likelihood == "hurdle":
        # -log NB(0) = theta log(1 + mu / theta), to relative precision where mu << theta
        # (log_nb_zero above, log(theta) - log(theta + mu), cancels there)
        logits, log_nb_positive = _hurdle_parts(theta * F.softplus(log_mu - log_theta),
                                                params["detect_offset"])
        zero = -F.softplus(logits)  # log(1 - p)
        nonzero = (-F.softplus(-logits[rows, col]) + log_nb_nz
                   - log_nb_positive[rows, col])  # log p + log NB(x) - log(1 - NB(0))
        return zero.sum(-1).index_add(0, rows, nonzero - zero[rows, col])
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")


# P(X > 0) <= E[X]: the dense pre-selection's bound is E[X] times this, so that float32
# rounding cannot push it below the exact probability
_BOUND_SLACK = 1.0 + 1e-5
# spacing of the torch sampler's dense uniforms (24-bit integers, multiples of 2**-24)
_FLOAT32_SPACING = 2.0**-24
# stand in for ``kept`` and ``theta`` in the CPU kernels where the likelihood has none
_NO_KEPT = np.zeros((1, 1), np.float32)
_NO_THETA = np.zeros(1)
# what sampling_params(..., logits=True) gives in place of scale and kept
_LOGIT_KEYS = ("scale_logits", "scale_bias", "zi_logits", "zi_bias")
# means up to this are drawn by inverse CDF (a few steps each), larger ones as Gamma-Poisson
_INVERSE_CDF_MAX_MEAN = 10.0
# on a GPU, the inverse CDF's last entries finish on the CPU once fewer than this remain
_HOST_TAIL = 16_384
# elements of the pinned buffer through which counts come back from a GPU (16 MiB)
_STAGING_ELEMENTS = 4 * 2**20


def _gamma_poisson_positive(mu: np.ndarray, theta: np.ndarray | None,
                            rng: np.random.Generator) -> np.ndarray:
    r"""Draws of :math:`X \mid X \ge 1` for :math:`X \sim \mathrm{NB}(\mu, \theta)`
    (Poisson when ``theta`` is ``None``) as Gamma–Poisson draws from ``rng``, redrawn
    while zero (rejection, exact): the CPU sampler's for means above
    ``_INVERSE_CDF_MAX_MEAN``, where a zero is rare and the inverse CDF takes many steps.
    Float64 arrays."""
    out = np.empty_like(mu)
    idx = np.arange(mu.size)
    while len(idx):
        m = mu[idx]
        draws = rng.poisson(m if theta is None else rng.gamma(theta[idx], m / theta[idx]))
        out[idx] = draws
        idx = idx[np.flatnonzero(draws == 0)]
    return out


def _positive_draws_with(mu, theta, p_zero, xp, indices, uniform, gamma, poisson,
                         host_below: int = 0):
    r"""Draws of :math:`X \mid X \ge 1` for :math:`X \sim \mathrm{NB}(\mu, \theta)`
    (Poisson when ``theta`` is ``None``; ``p_zero`` is :math:`P(X = 0)`), vectorised, for
    numpy or torch arrays: the torch sampler's. The CPU's steps entry by entry
    (:func:`~scldiff.module._kernels.inverse_cdf`), with the same arithmetic. Means up to
    ``_INVERSE_CDF_MAX_MEAN`` by inverse CDF from a uniform level on :math:`(P(0), 1)`,
    larger ones as Gamma–Poisson draws redrawn while zero. ``xp`` is the module,
    ``indices(mask)`` the positions of a mask, ``uniform(n)``, ``gamma(shape, scale)`` and
    ``poisson(rate)`` draw from the caller's generator.

    ``host_below`` (torch tensors on a GPU): once fewer entries than this are still
    stepping through the inverse CDF, they finish in numpy on the CPU. The few entries of
    the long tail otherwise cost one device synchronisation and a handful of kernel
    launches per step, for hundreds of steps. The arithmetic is the same float64 either
    way, so the draws are too."""
    out = xp.ones_like(mu)  # every draw is at least 1
    small = mu <= _INVERSE_CDF_MAX_MEAN
    where = indices(small)
    if len(where):
        m = mu[where]
        p0 = p_zero[where]
        v = p0 + (1.0 - p0) * uniform(len(where))
        if theta is None:
            ratio_a, ratio_b = xp.zeros_like(m), m  # p(k)/p(k-1) = (k*a + b)/k
        else:
            q = m / (m + theta[where])
            ratio_a, ratio_b = q, (theta[where] - 1.0) * q
        pmf = p0 * (ratio_a + ratio_b)
        state = (where, v, ratio_a, ratio_b, pmf, p0 + pmf)
        k, state = _inverse_cdf_steps(out, 1.0, state, indices, host_below)
        if state is not None:  # the tail, in numpy
            where = state[0]
            tail = out[where].cpu().numpy()
            host = [np.arange(where.numel())] + [a.cpu().numpy() for a in state[1:]]
            _inverse_cdf_steps(tail, k, host, np.flatnonzero)
            out[where] = torch.from_numpy(tail).to(out.device)
    idx = indices(~small)
    while len(idx):
        m = mu[idx]
        rate = m if theta is None else gamma(theta[idx], m / theta[idx])
        draws = poisson(rate)
        out[idx] = draws
        idx = idx[indices(draws == 0)]
    return out


def _inverse_cdf_steps(out, k: float, state, indices, host_below: int = 0):
    """The inverse-CDF steps of :func:`_positive_draws_with` from step ``k``: ``state`` is
    ``(where, v, ratio_a, ratio_b, pmf, cdf)`` of the entries still running (``where``
    their positions in ``out``, which each step writes). Returns ``(k, None)`` when every
    entry has stopped, or ``(k, state)`` of the fewer than ``host_below`` still running."""
    where, v, ratio_a, ratio_b, pmf, cdf = state
    stalled = None
    while True:
        # Stop where the CDF has passed the uniform. Rounding can leave the summed CDF
        # just short of a uniform near 1: once the pmf is past its mode (it only falls
        # from there) and too small to change the CDF, the entry stops at k, which
        # moves at most a rounding error of probability.
        running = cdf <= v
        running &= pmf > 0
        if stalled is not None:
            running &= ~stalled
        keep = indices(running)  # indices, then takes: cheaper than masks
        if not len(keep):
            return k, None
        where, v, ratio_a, ratio_b, pmf, cdf = (
            where[keep], v[keep], ratio_a[keep], ratio_b[keep], pmf[keep], cdf[keep])
        if len(keep) < host_below:
            return k, (where, v, ratio_a, ratio_b, pmf, cdf)
        k += 1.0
        out[where] = k
        factor = (k * ratio_a + ratio_b) / k
        pmf *= factor
        previous = cdf
        cdf = cdf + pmf
        stalled = (cdf == previous) & (factor < 1.0)


def sample_counts(
    likelihood: Likelihood,
    params: dict[str, Tensor],
    library: Tensor,
    rng: np.random.Generator | torch.Generator,
) -> sp.csr_matrix:
    r"""Draw counts from the decoder's likelihood with an explicit random generator.

    Sparse and exact. A count is nonzero with probability :math:`P(X > 0) = (1 - \pi)\,(1 -
    (\theta / (\theta + \mu))^\theta)` (ZINB; NB without :math:`\pi`, Poisson :math:`1 -
    e^{-\mu}`, hurdle NB :math:`p`), decided by one uniform :math:`u` per entry. Since
    :math:`P(X > 0) \le E[X]` (Markov), a pass over the dense ``(n_cells, n_genes)``
    parameters keeps only the entries whose uniform may lie below :math:`E[X]` (the
    hurdle's: :math:`p`), about a seventh of them on PBMC3K; the exact probability, its
    logarithm and power, is computed in float64 for those alone. The nonzero entries, a
    few percent, are then drawn from :math:`X \mid X \ge 1`: means up to
    ``_INVERSE_CDF_MAX_MEAN`` by inverse CDF, stepping :math:`p(k) = p(k-1)\,\frac{k - 1
    + \theta}{k}\,\frac{\mu}{\mu + \theta}` (Poisson: :math:`p(k-1)\,\mu/k`) until the
    CDF passes the level, larger ones as Gamma–Poisson draws redrawn while zero. On the CPU
    the level is :math:`P(0) + (1 - P(0))\,u / P(X > 0)`, since given :math:`u < P(X > 0)`
    that ratio is a fresh uniform.

    On the CPU (a numpy ``rng``), the dense pass is a compiled loop
    (:func:`scldiff.module._kernels.preselect`) that draws each entry's 16-bit integer
    :math:`k` from a counter-based generator keyed by one draw from ``rng``, and keeps
    the entry when :math:`k \le 2^{16} E[X]`; the kept entries' uniforms are completed
    to :math:`u = (k + v)\,2^{-16}` with 53 more bits :math:`v`, so that probabilities far
    below :math:`2^{-16}` are resolved exactly. From the decoder's logits (``scale_logits``)
    the same pass computes the probabilities itself, row by row
    (:func:`~scldiff.module._kernels.preselect_logits`). The decisions and the inverse-CDF
    draws are one more compiled loop (:func:`~scldiff.module._kernels.nonzero_draws`).
    With a ``torch.Generator`` the dense uniforms are 24-bit integers drawn in torch on the
    parameters' device. Pass a few hundred cells at a time
    (:meth:`LapDDPMModule.decode_counts`).

    Parameters
    ----------
    likelihood
        ``"nb"``, ``"zinb"``, ``"hurdle"`` or ``"poisson"``.
    params
        ``scale`` (:math:`\mu / \ell`, ``(n_cells, n_genes)``), ``theta`` (per gene or
        broadcastable to ``scale``; not for Poisson), for the ZINB ``kept``
        (:math:`1 - \pi`) or ``zi_logits``, for the hurdle NB ``detect`` (:math:`P(X > 0)`)
        or ``detect_offset`` (:func:`hurdle_logits`): :meth:`CountDecoder.sampling_params` or
        :meth:`CountDecoder.forward`. Or, in place of ``scale`` and ``kept``, the logits
        ``scale_logits`` of the gene proportions (a softmax over genes) and for the ZINB
        ``zi_logits``, each plus its per-gene ``scale_bias`` and ``zi_bias`` where given, as
        ``CountDecoder.sampling_params(..., logits=True)`` gives them: the ZINB's mean is
        then :math:`\ell\rho_g / \sum_h (1 - \pi_h)\rho_h`, as the decoder has it.
    library
        ``(n_cells, 1)`` library sizes.
    rng
        A numpy ``Generator``: the draws run on the CPU (numba and numpy). A
        ``torch.Generator``: they run in torch on the parameters' device (a GPU's), from
        that generator, and only the nonzero counts come back to the CPU. The two give
        different counts for the same seed, with the same distribution.

    Returns
    -------
    ``(n_cells, n_genes)`` CSR matrix of float32 whole numbers.
    """
    if isinstance(rng, torch.Generator):
        return _sample_counts_torch(likelihood, _with_probabilities(likelihood, params),
                                    library, rng)
    from ._kernels import TICKS, nonzero_draws, preselect, preselect_logits

    key = rng.integers(0, 2**64, dtype=np.uint64)
    hurdle = likelihood == "hurdle"
    with torch.no_grad():
        if "scale" in params or hurdle:
            scale, lib, theta, kept, _ = _dense_bound(
                likelihood, _with_probabilities(likelihood, params), library,
                torch.device("cpu"), 1.0, dense=False)
            n_cells, n_genes = scale.shape
            lib = lib.numpy()
            # the bound in units of 2**-16: E[X] (times 1 - pi), or the hurdle's P(X > 0)
            factor = np.full(n_cells, _BOUND_SLACK * TICKS) if hurdle else lib * (
                _BOUND_SLACK * TICKS)
            has_kept = kept is not None
            selection = preselect(
                np.ascontiguousarray(scale.numpy()),
                np.ascontiguousarray(kept.numpy()) if has_kept else _NO_KEPT,
                lib, factor.astype(np.float32), not hurdle, has_kept, key)
        else:
            products, bias = _logits_on_cpu(params, "scale_logits", "scale_bias")
            n_cells, n_genes = products.shape
            has_kept = likelihood == "zinb"
            zi_products, zi_bias = _logits_on_cpu(params, "zi_logits", "zi_bias") \
                if has_kept else (_NO_KEPT, _NO_KEPT[0])
            lib = library.detach().to("cpu", torch.float64).reshape(-1).numpy()
            theta = None if likelihood == "poisson" else _theta(params, n_genes,
                                                               torch.device("cpu"))
            selection = preselect_logits(products, bias, zi_products, zi_bias, lib,
                                         _BOUND_SLACK * TICKS, has_kept, key)
    rows, cols, mean, kept, u = selection
    if theta is None:  # Poisson: P(0) - 1 = expm1(-mu)
        zero_m1, theta = np.expm1(-mean), _NO_THETA
    else:  # log NB(0) = -theta log(1 + mu / theta), then expm1 of it, in place
        theta = theta.numpy()
        theta = theta[cols] if theta.ndim == 1 else theta[rows, cols]
        zero_m1 = np.divide(mean, theta)
        np.log1p(zero_m1, out=zero_m1)
        zero_m1 *= -theta
        np.expm1(zero_m1, out=zero_m1)
    indptr, indices, values, mu, theta = nonzero_draws(
        rows, cols, mean, kept if has_kept else _NO_THETA, u, zero_m1, theta, has_kept,
        likelihood != "poisson", hurdle, _INVERSE_CDF_MAX_MEAN, n_cells)
    large = np.flatnonzero(mu > _INVERSE_CDF_MAX_MEAN)
    if large.size:
        values[large] = _gamma_poisson_positive(
            mu[large], theta[large] if likelihood != "poisson" else None, rng)
    index_dtype = np.int32 if max(n_genes, values.size) < 2**31 else np.int64
    return sp.csr_matrix((values.astype(np.float32), indices.astype(index_dtype, copy=False),
                          indptr.astype(index_dtype)), shape=(n_cells, n_genes))


def _with_probabilities(likelihood: Likelihood, params: dict[str, Tensor]
                        ) -> dict[str, Tensor]:
    """``params`` with ``scale`` (and for the ZINB ``kept``) in place of the logits of
    ``sampling_params(..., logits=True)``; as they are when they have ``scale``."""
    if "scale" in params:
        return params

    def logits(name: str, bias: str) -> Tensor:
        value = params[name].detach().float()
        return value if params.get(bias) is None else value + params[bias].detach().float()

    scale = torch.softmax(logits("scale_logits", "scale_bias"), dim=-1)
    out = {key: value for key, value in params.items() if key not in _LOGIT_KEYS}
    if likelihood == "zinb":
        kept = torch.sigmoid(torch.neg(logits("zi_logits", "zi_bias")))
        scale.div_(torch.linalg.vecdot(kept, scale)[:, None])
        out["kept"] = kept
    out["scale"] = scale
    return out


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for lower precisions (bf16, float16), else ``dtype`` (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def _with_bias(params: dict[str, Tensor], name: str, bias: str) -> Tensor:
    """``params[name]`` plus its per-gene ``params[bias]`` where given (the biases
    :meth:`CountDecoder.sampling_params` keeps apart with ``logits=True``)."""
    value = params[name]
    return value if params.get(bias) is None else value + params[bias]


def _logits_on_cpu(params: dict[str, Tensor], name: str, bias: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``params[name]`` (float32, or bf16 as its ``uint16`` bit patterns;
    C-contiguous) and their per-gene biases ``params[bias]`` (float32; zeros where absent),
    as numpy arrays for the CPU kernels."""
    value = params[name].detach().to("cpu")
    # bf16 products go in as their bit patterns, which the kernel widens to float32
    value = value.contiguous().view(torch.uint16).numpy() if value.dtype == torch.bfloat16 \
        else value.to(torch.float32).contiguous().numpy()
    offset = params.get(bias)
    offset = np.zeros(value.shape[1], np.float32) if offset is None else \
        offset.detach().to("cpu", torch.float32).contiguous().numpy()
    return value, offset


def _theta(params: dict[str, Tensor], n_genes: int, device: torch.device) -> Tensor:
    """The inverse dispersions in float64 on ``device``: ``(n_genes,)`` when they are one
    per gene (also when given broadcast to every cell), else one row per cell."""
    theta = params["theta"].detach()
    if theta.dim() < 2 or theta.shape[0] == 1 or theta.stride(0) == 0:  # per gene
        theta = theta.reshape(-1, theta.shape[-1])[0].expand(n_genes)
    return theta.to(device, torch.float64)


def _dense_bound(likelihood: Likelihood, params: dict[str, Tensor], library: Tensor,
                 device: torch.device, unit: float, dense: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The sampler's inputs on ``device``: ``scale`` (float32), the libraries (float64),
    ``theta`` (float64, one per gene or one per entry; ``None`` for Poisson), ``kept``
    (float32 ``1 - pi`` of the ZINB, ``P(X > 0)`` of the hurdle NB, otherwise ``None``) and
    the dense bound ``E[X] / unit`` (the hurdle's: ``P(X > 0) / unit``), a little inflated
    against float32 rounding, which :math:`P(X > 0)` never exceeds (``None`` without
    ``dense``: the CPU sampler computes it entry by entry)."""
    scale = params["scale"].detach().to(device, torch.float32)
    lib = library.detach().to(device, torch.float64).reshape(-1)
    bound = None  # the hurdle's is set below, from P(X > 0)
    if likelihood != "hurdle" and dense:
        bound = scale * (lib * (_BOUND_SLACK / unit)).float()[:, None]
    theta = kept = None
    if likelihood != "poisson":
        theta = _theta(params, scale.shape[1], device)
    if likelihood == "zinb":
        kept = params.get("kept")
        if kept is None:
            kept = torch.sigmoid(torch.neg(params["zi_logits"].detach().float()))
        kept = kept.detach().to(device, torch.float32)
        if dense:
            bound.mul_(kept)
    if likelihood == "hurdle":  # P(X > 0) is p itself: the bound is exact
        kept = params.get("detect")
        if kept is None:
            mu = scale * lib.float()[:, None]
            theta32 = theta.float()
            log_nb_zero = -theta32 * torch.log1p(mu / theta32)
            offset = params["detect_offset"].detach().to(device, torch.float32)
            kept = torch.sigmoid(hurdle_logits(log_nb_zero, offset))
        kept = kept.detach().to(device, torch.float32)
        if dense:
            bound = kept * (_BOUND_SLACK / unit)
    return scale, lib, theta, kept, bound


def _exact_nonzero(xp, indices, u, mu, theta, kept, hurdle: bool = False):
    r"""Which pre-selected entries are nonzero, :math:`u < P(X > 0)` in float64, and
    :math:`\log P_{NB}(0)` and :math:`P(X > 0)` of those (numpy or torch arrays; ``xp``
    is the module).
    ``kept``: :math:`1 - \pi` of the ZINB, or with ``hurdle`` :math:`P(X > 0)` itself."""
    log_p0 = -mu if theta is None else -theta * xp.log1p(mu / theta)
    if hurdle:
        p_nonzero = kept
    else:
        p_nonzero = -xp.expm1(log_p0)  # 1 - P(0), without cancellation
        if kept is not None:
            p_nonzero = p_nonzero * kept
    keep = indices(u < p_nonzero)
    return keep, log_p0[keep], p_nonzero[keep]


def _standard_gamma(shape: Tensor, generator: torch.Generator) -> Tensor:
    r"""Gamma(shape, 1) draws from ``generator``, in one device call:
    ``torch._standard_gamma``, the kernel behind :class:`torch.distributions.Gamma`, whose
    ``sample`` takes no generator. Marsaglia and Tsang (2000), boosted to shape
    :math:`a + 1` for :math:`a < 1`; each entry rejects and redraws inside the kernel.
    """
    return torch._standard_gamma(shape, generator=generator)


def _positive_draws_torch(mu: Tensor, theta: Tensor | None, p_zero: Tensor,
                          generator: torch.Generator) -> Tensor:
    """:func:`_positive_draws_with` in torch (float64 tensors on any device), from
    ``generator``."""
    return _positive_draws_with(
        mu, theta, p_zero, torch, lambda mask: torch.nonzero(mask).squeeze(1),
        lambda n: torch.rand(n, generator=generator, device=mu.device, dtype=mu.dtype),
        lambda shape, scale: _standard_gamma(shape, generator) * scale,
        lambda rate: torch.poisson(rate, generator=generator),
        host_below=_HOST_TAIL if mu.device.type != "cpu" else 0)


@torch.no_grad()
def _sample_counts_torch(likelihood: Likelihood, params: dict[str, Tensor], library: Tensor,
                         generator: torch.Generator) -> sp.csr_matrix:
    r""":func:`sample_counts` in torch on the parameters' device.

    The dense uniforms are 24-bit integers :math:`k` (:math:`u = k\,2^{-24}`, as numpy's
    float32 uniforms), so that the completion to float64 resolution is exact whatever the
    device's float32 uniforms look like.
    """
    device = params["scale"].device
    scale, lib, theta, kept, bound = _dense_bound(likelihood, params, library, device,
                                                  _FLOAT32_SPACING)  # in units of 2**-24
    n_cells, n_genes = scale.shape
    ticks = torch.randint(0, 2**24, (n_cells, n_genes), generator=generator, device=device,
                          dtype=torch.int32)
    flat = torch.nonzero((ticks < bound).reshape(-1)).squeeze(1)
    del bound
    rows = torch.div(flat, n_genes, rounding_mode="floor")
    cols = flat - rows * n_genes
    mu = lib[rows] * scale.reshape(-1)[flat].double()
    if theta is not None:
        theta = theta[cols] if theta.dim() == 1 else theta.reshape(-1)[flat]
    u = (ticks.reshape(-1)[flat].double()
         + torch.rand(flat.numel(), generator=generator, device=device, dtype=torch.float64)
         ) * _FLOAT32_SPACING
    keep, log_p0, _ = _exact_nonzero(
        torch, lambda mask: torch.nonzero(mask).squeeze(1), u, mu, theta,
        None if kept is None else kept.reshape(-1)[flat].double(), likelihood == "hurdle")
    rows, cols, mu = rows[keep], cols[keep], mu[keep]
    values = _positive_draws_torch(mu, None if theta is None else theta[keep],
                                   torch.exp(log_p0), generator)
    return _csr_from_tensors(rows, cols, values, n_cells, n_genes)


def _csr_from_tensors(rows: Tensor, cols: Tensor, values: Tensor, n_cells: int,
                      n_genes: int) -> sp.csr_matrix:
    """The CSR matrix of entries given in row-major order, as tensors on any device: the
    row pointers are counted there, and
    only the CSR arrays, in their final dtypes, come to the CPU (:func:`_to_host`)."""
    index_dtype = torch.int32 if max(n_genes, values.numel()) < 2**31 else torch.int64
    indptr = torch.zeros(n_cells + 1, dtype=index_dtype, device=rows.device)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_cells), 0, dtype=index_dtype)
    return sp.csr_matrix((_to_host(values.float()), _to_host(cols.to(index_dtype)),
                          _to_host(indptr)), shape=(n_cells, n_genes))


def _to_host(tensor: Tensor, staging: int = _STAGING_ELEMENTS) -> np.ndarray:
    """A 1-d tensor as a numpy array in ordinary (pageable) memory.

    From a GPU, in pieces through one pinned buffer of ``staging`` elements: a copy from
    a GPU straight into pageable memory is much slower (on an H100 VM, 9M entries of
    counts took 0.13 s that way, in three arrays of 8 bytes per entry). The buffer is
    small and reused (torch caches pinned blocks), and the arrays returned do not hold
    pinned memory.
    """
    if tensor.device.type == "cpu":
        return tensor.numpy()
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    if tensor.numel():
        buffer = torch.empty(min(tensor.numel(), staging), dtype=tensor.dtype,
                             pin_memory=True)
        for start in range(0, tensor.numel(), staging):
            piece = tensor[start : start + staging]
            buffer[: piece.numel()].copy_(piece)
            out[start : start + piece.numel()].copy_(buffer[: piece.numel()])
    return out.numpy()
