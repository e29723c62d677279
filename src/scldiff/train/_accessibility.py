"""The accessibility decoder's training, after stage A: binarised peaks given the cells'
posterior latents (a multiome model with ``accessibility_decoder=True``)."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from ..module import AccessibilityDecoder


def fit_accessibility(decoder: AccessibilityDecoder, mean: Tensor, logvar: Tensor,
                      peaks: sp.csr_matrix, validation: tuple | None = None,
                      n_steps: int = 1500, batch_size: int = 256, lr: float = 2e-3,
                      generator: torch.Generator | None = None) -> float:
    r"""Train ``decoder`` on cells' posterior draws :math:`z \sim q(z \mid x)` (``mean``,
    ``logvar``: ``(n, n_latent)``) and their binarised peaks (``peaks``, ``(n, n_peaks)``
    CSR 0/1) by the Bernoulli negative log-likelihood (binary cross-entropy) summed over
    peaks, averaged over cells: AdamW, ``n_steps`` steps of ``batch_size`` cells, the output
    bias started at each peak's training log-odds. Draws rather than means, so that the
    decoder reads the latents the diffusion generates, which spread as the posterior does.

    Returns the mean negative log-likelihood per cell of ``validation`` (``(mean, logvar,
    peaks)`` of other cells, at their posterior means), NaN without it.
    """
    device = decoder.logits.weight.device
    peaks = sp.csr_matrix(peaks, dtype=np.float32)
    rate = np.clip(np.asarray(peaks.mean(0)).ravel(), 1e-4, 1 - 1e-4)
    with torch.no_grad():
        decoder.logits.bias.copy_(torch.from_numpy(np.log(rate / (1 - rate))).float())
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    n = mean.shape[0]
    decoder.train()
    for _ in range(n_steps):
        pick = torch.randint(n, (min(batch_size, n),), generator=generator)
        z = mean[pick] + torch.randn(pick.numel(), mean.shape[1], generator=generator) \
            * (0.5 * logvar[pick]).exp()
        target = torch.from_numpy(peaks[pick.numpy()].toarray()).to(device)
        loss = F.binary_cross_entropy_with_logits(decoder(z.to(device)), target,
                                                  reduction="sum") / pick.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    decoder.eval()
    if validation is None or validation[0].shape[0] == 0:
        return math.nan
    val_mean, _, val_peaks = validation
    with torch.no_grad():
        logits = decoder(val_mean.to(device))
        target = torch.from_numpy(sp.csr_matrix(val_peaks, dtype=np.float32).toarray())
        return float(F.binary_cross_entropy_with_logits(
            logits, target.to(device), reduction="sum") / val_mean.shape[0])
