"""ScoreNet: the conditional network of the latent diffusion (Bini & Marchand-Maillet, 2025,
Sec. 3.2.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style embedding of times ``t`` in [0, 1] (scaled by 1000, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _ResidualBlock(nn.Module):
    r"""Pre-LayerNorm MLP block; the condition enters as a per-feature scale and shift
    (FiLM): :math:`h + \mathrm{MLP}(\mathrm{LN}(h)(1 + s) + b)`, :math:`(s, b) = W c`."""

    def __init__(self, n_hidden: int, dropout_rate: float):
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden, elementwise_affine=False)
        self.film = nn.Linear(n_hidden, 2 * n_hidden)
        self.mlp = nn.Sequential(
            nn.Linear(n_hidden, 2 * n_hidden), nn.GELU(), nn.Dropout(dropout_rate),
            nn.Linear(2 * n_hidden, n_hidden),
        )
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: Tensor, cond: Tensor, index: Tensor | None = None) -> Tensor:
        """``cond``: one condition per row of ``h``, or with ``index`` a table of
        conditions and the row of each of ``h``'s."""
        scale, shift = self.film(cond).chunk(2, dim=-1)
        gain = 1 + scale
        if index is not None:
            gain, shift = gain[index], shift[index]
        return h + self.mlp(torch.addcmul(shift, self.norm(h), gain))


class ScoreNet(nn.Module):
    r"""MLP :math:`(z_t, t, c) \mapsto` the noise :math:`\epsilon` or the velocity
    :math:`v`, whichever the module trains it on.

    The condition of each row is :math:`\mathrm{GELU}(\mathrm{MLP}(\mathrm{emb}(t)) +
    E_c)`, with :math:`E` one embedding per label and one extra row, index ``n_labels``,
    the *null* label of unconditional predictions (classifier-free guidance).

    Parameters
    ----------
    n_latent
        Dimension of the latents.
    n_labels
        Number of labels (the null label is added).
    n_hidden
        Hidden width.
    n_blocks
        Number of residual blocks.
    time_embedding_dim
        Width of the sinusoidal time embedding.
    dropout_rate
        Dropout inside the blocks.

    Shapes:
        - **input:** ``z`` :math:`(n, \text{n_latent})`; ``t`` :math:`(n,)`, or :math:`()`
          for one time shared by all rows (a sampler's step: the conditions are then
          computed once per label, not per row); ``labels`` :math:`(n,)`
        - **output:** :math:`(n, \text{n_latent})`
    """

    def __init__(
        self,
        n_latent: int,
        n_labels: int,
        n_hidden: int = 128,
        n_blocks: int = 3,
        time_embedding_dim: int = 64,
        dropout_rate: float = 0.0,
    ):
        super().__init__()
        self.n_labels = n_labels
        self.time_embedding_dim = time_embedding_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embedding_dim, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_hidden)
        )
        self.label_embedding = nn.Embedding(n_labels + 1, n_hidden)
        self.inp = nn.Linear(n_latent, n_hidden)
        self.blocks = nn.ModuleList([_ResidualBlock(n_hidden, dropout_rate)
                                     for _ in range(n_blocks)])
        self.out_norm = nn.LayerNorm(n_hidden)
        self.out = nn.Linear(n_hidden, n_latent)

    @property
    def null_label(self) -> int:
        return self.n_labels

    def condition(self, t: Tensor, labels: Tensor) -> Tensor:
        """The condition vector of each (time, label) pair."""
        cond = self.time_mlp(sinusoidal_embedding(t, self.time_embedding_dim))
        return F.gelu(cond + self.label_embedding(labels))

    def forward(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        labels = labels.reshape(-1).long()
        index = None
        if t.dim() == 0:  # one time: a table of every label's condition, rows gather theirs
            every = torch.arange(self.n_labels + 1, device=z.device)
            cond, index = self.condition(t.expand(every.shape[0]), every), labels
        else:
            cond = self.condition(t, labels)
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, cond, index)
        return self.out(self.out_norm(h))
