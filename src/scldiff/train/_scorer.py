"""The post-guidance scorer's training, after stage B: real against generated latents (SCLD,
Wang et al., 2023, Sec. 3.2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..module import RealnessScorer


def fit_scorer(scorer: RealnessScorer, real: Tensor, fake: Tensor, attributes: Tensor,
               n_steps: int = 600, batch_size: int = 256, lr: float = 2e-3,
               held_out: float = 0.2, generator: torch.Generator | None = None) -> float:
    r"""Train ``scorer`` to tell real latents (label 1) from generated ones (label 0) by
    binary cross-entropy, and return its accuracy on a held-out fifth of the cells.

    ``real`` and ``fake`` are ``(n, n_latent)`` standardised latents of the same ``n``
    cells' attribute rows ``attributes`` (``(n, A)``): a real cell's posterior draw and a
    latent generated for its attributes, so that the classifier sees the same conditions in
    both classes and learns realism, not the mix of conditions. Continuous covariates are
    hidden (NaN) at random for half the rows, so it also scores requests that leave them
    out. AdamW, ``n_steps`` steps of ``batch_size`` cells of each class.
    """
    n = real.shape[0]
    order = torch.randperm(n, generator=generator)
    n_val = int(round(held_out * n)) if n >= 10 else 0
    val, fit = order[:n_val], order[n_val:]
    n_cat = len(scorer.n_categories)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    scorer.train()
    for _ in range(n_steps):
        pick = fit[torch.randint(fit.numel(), (min(batch_size, fit.numel()),),
                                 generator=generator)]
        rows = attributes[pick].clone()
        hide = torch.rand(rows.shape[0], generator=generator) < 0.5
        rows[hide, n_cat:] = float("nan")
        z = torch.cat([real[pick], fake[pick]])
        target = torch.cat([torch.ones(pick.numel()), torch.zeros(pick.numel())])
        loss = F.binary_cross_entropy_with_logits(scorer(z, torch.cat([rows, rows])), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scorer.eval()
    if not n_val:
        return float("nan")
    with torch.no_grad():
        logits = scorer(torch.cat([real[val], fake[val]]),
                        torch.cat([attributes[val], attributes[val]]))
    target = torch.cat([torch.ones(n_val), torch.zeros(n_val)])
    return float(((logits > 0).float() == target).float().mean())
