"""The count decoder: an MLP from the latent (and the categorical attributes) to the parameters
of the count likelihood, :class:`~scldiff.distributions.CountParams`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributions import LIKELIHOODS, CountParams, Likelihood


class CountDecoder(nn.Module):
    r"""MLP :math:`(z, c) \mapsto` logits of the gene proportions :math:`\rho`, and for the
    ZINB of the dropout probabilities :math:`\pi`; one inverse dispersion :math:`\theta_g`
    per gene (NB, ZINB).

    The means follow from the cell's library size :math:`\ell` (an input, as in scVI and
    CFGen), :math:`\ell\rho` (:class:`~scldiff.distributions.CountParams`).

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
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dropout_rate
        Dropout after each hidden layer.
    n_categories
        Number of categories of each categorical attribute the hidden layers read (one-hot)
        beside ``z``, as scVI's decoder reads its categorical covariates, so that effects
        such as a batch's live in the decoder and the latent need not carry them;
        :meth:`forward` then needs their codes. Empty: the decoder reads ``z`` alone.

    Shapes:
        - **input:** ``z`` :math:`(n, \text{n_latent})`, ``categories`` :math:`(n,
          \text{len(n_categories)})` integer codes
        - **output:** :class:`~scldiff.distributions.CountParams` with logits :math:`(n,
          \text{n_output})`
    """

    def __init__(
        self,
        n_latent: int,
        n_output: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        likelihood: Likelihood = "zinb",
        dropout_rate: float = 0.0,
        n_categories: Sequence[int] = (),
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        self.likelihood = likelihood
        self.n_categories = [int(n) for n in n_categories]
        layers: list[nn.Module] = []
        width = n_latent + sum(self.n_categories)
        for _ in range(n_layers):
            layers += [nn.Linear(width, n_hidden), nn.LayerNorm(n_hidden), nn.GELU(),
                       nn.Dropout(dropout_rate)]
            width = n_hidden
        self.hidden = nn.Sequential(*layers)
        self.scale = nn.Linear(width, n_output)  # logits of the gene proportions
        self.dropout_logits = nn.Linear(width, n_output) if likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.zeros(n_output)) if likelihood != "poisson" \
            else None

    def forward(self, z: Tensor, categories: Tensor | None = None, bias_apart: bool = False
                ) -> CountParams:
        """The likelihood's parameters of cells with latents ``z`` and the codes
        ``categories`` of their categorical attributes (needed with ``n_categories``).

        ``bias_apart=True`` leaves the output layers' biases out of the logits, in
        ``logits_bias`` and ``zi_bias``, and keeps the products in bf16 under bf16
        autocast: the CPU sampler adds the biases and widens the products in its own pass
        over each row, without a dense copy of either."""
        if self.n_categories:
            if categories is None:
                raise ValueError("This decoder reads the cells' categorical attributes: pass "
                                 "their codes.")
            categories = categories.reshape(z.shape[0], -1).long()
            z = torch.cat([z, *(F.one_hot(categories[:, a], n).to(z)
                                for a, n in enumerate(self.n_categories))], -1)
        h = self.hidden(z)
        if not bias_apart:
            return CountParams(
                self.likelihood, self.scale(h), self.log_theta,
                None if self.dropout_logits is None else self.dropout_logits(h))
        products = [None if layer is None else _product(h, layer.weight)
                    for layer in (self.scale, self.dropout_logits)]
        return CountParams(self.likelihood, products[0], self.log_theta, products[1],
                           logits_bias=self.scale.bias,
                           zi_bias=None if self.dropout_logits is None
                           else self.dropout_logits.bias)


def _product(h: Tensor, weight: Tensor) -> Tensor:
    """``h @ weight.T`` in float32, or in bf16 where autocast makes it so (the CPU sampler
    widens bf16 exactly as it reads it; other precisions become float32)."""
    out = torch.mm(h, weight.t())
    return out if out.dtype in (torch.float32, torch.bfloat16) else out.float()


class AccessibilityDecoder(nn.Module):
    r"""MLP :math:`z \mapsto` the logits of each peak's accessibility, :math:`p(y_j = 1 \mid
    z) = \sigma(f_j(z))` (a Bernoulli per peak, as PeakVI and MultiVI model binarised
    ATAC), from the same latent as the count decoder, so that a generated cell gets peaks
    that go with its RNA.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_peaks
        Number of peaks.
    n_hidden
        Hidden width.

    Shapes:
        - **input:** ``z`` :math:`(n, \text{n_latent})`
        - **output:** logits :math:`(n, \text{n_peaks})`
    """

    def __init__(self, n_latent: int, n_peaks: int, n_hidden: int = 128):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.LayerNorm(n_hidden),
                                    nn.GELU())
        self.logits = nn.Linear(n_hidden, n_peaks)

    def forward(self, z: Tensor) -> Tensor:
        return self.logits(self.hidden(z))
