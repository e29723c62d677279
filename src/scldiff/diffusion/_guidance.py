r"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper around the noise predictor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def guided_epsilon(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    r""":math:`\tilde\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u)`.

    ``scale`` :math:`w = 0` is the unconditional model, :math:`w = 1` the conditional one,
    :math:`w > 1` sharpens the condition. SCLD (paper 002, Eq. 13) writes the same as
    :math:`(1 + \omega)\epsilon_c - \omega \epsilon_u` with :math:`\omega = w - 1`.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


class ClassifierFreeGuidance:
    """Noise predictor ``eps(z, t)`` guided towards fixed labels.

    Parameters
    ----------
    network
        ``network(z, t, labels) -> eps`` trained with label dropout to ``null_label``.
    labels
        ``(batch,)`` integer labels, one per sample.
    null_label
        Index of the "no label" token.
    scale
        Guidance scale :math:`w`; for 0 and 1 a single network evaluation is made.
    """

    def __init__(
        self,
        network: Callable[[Tensor, Tensor, Tensor], Tensor],
        labels: Tensor,
        null_label: int,
        scale: float = 1.0,
    ):
        self.network = network
        self.labels = labels
        self.null = torch.full_like(labels, null_label)
        self.scale = float(scale)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.network(z, t, self.labels)
        if self.scale == 0.0:
            return self.network(z, t, self.null)
        eps = self.network(
            torch.cat([z, z]), torch.cat([t, t]), torch.cat([self.labels, self.null])
        )
        eps_cond, eps_uncond = eps.chunk(2)
        return guided_epsilon(eps_cond, eps_uncond, self.scale)
