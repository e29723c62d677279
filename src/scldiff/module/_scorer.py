"""The post-guidance scorer (SCLD, Wang et al., 2023, Sec. 3.2.3): a small classifier of real
against generated latents, which ranks generated cells by how real they look."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RealnessScorer(nn.Module):
    r"""MLP :math:`(z, c) \mapsto` the logit that latent :math:`z` of a cell with
    attributes :math:`c` comes from a real cell's posterior rather than from the diffusion.

    Its input is the standardised latent, the one-hot codes of the categorical attributes
    (with a null slot each) and the standardised continuous covariates with a 0/1 column
    each saying whether the value is given (NaN: not given). It judges latents, not counts:
    scoring a candidate costs no decoding, so oversampling costs only the diffusion.

    Parameters
    ----------
    n_latent
        Dimension of the latents.
    n_categories
        Number of categories of each categorical attribute.
    n_continuous
        Number of continuous covariates.
    n_hidden
        Hidden width (two hidden layers).

    Shapes:
        - **input:** ``z`` :math:`(n, \text{n_latent})` standardised, ``attributes``
          :math:`(n, A)` float, NaN where not given
        - **output:** :math:`(n,)` logits
    """

    def __init__(self, n_latent: int, n_categories: Sequence[int] = (), n_continuous: int = 0,
                 n_hidden: int = 64):
        super().__init__()
        self.n_categories = [int(n) for n in n_categories]
        self.n_continuous = int(n_continuous)
        width = n_latent + sum(n + 1 for n in self.n_categories) + 2 * self.n_continuous
        self.net = nn.Sequential(nn.Linear(width, n_hidden), nn.GELU(),
                                 nn.Linear(n_hidden, n_hidden), nn.GELU(),
                                 nn.Linear(n_hidden, 1))

    def features(self, z: Tensor, attributes: Tensor) -> Tensor:
        """The network's input, ``(n, width)``."""
        attributes = attributes.reshape(z.shape[0], -1).float()
        parts = [z.float()]
        for a, n in enumerate(self.n_categories):
            value = attributes[:, a]
            codes = torch.where(torch.isnan(value), torch.full_like(value, n), value).long()
            parts.append(F.one_hot(codes, n + 1).float())
        continuous = attributes[:, len(self.n_categories):]
        given = ~torch.isnan(continuous)
        parts += [torch.where(given, continuous, torch.zeros_like(continuous)), given.float()]
        return torch.cat(parts, dim=-1)

    def forward(self, z: Tensor, attributes: Tensor) -> Tensor:
        return self.net(self.features(z, attributes)).squeeze(-1)
