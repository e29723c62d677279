"""ScoreNet: the conditional noise predictor of the latent diffusion (paper 001, Sec. 3.2.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._autocast import autocast_dtype


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style embedding of times ``t`` in [0, 1] (scaled by 1000, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _ResidualBlock(nn.Module):
    """Pre-LayerNorm MLP block; the condition enters as a per-feature scale and shift."""

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
        film = self.film(cond)
        if index is not None:  # cond holds one row per distinct condition
            film = film[index]
        scale, shift = film.chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)

    def forward_grouped(self, h: Tensor, cond: Tensor, counts: list[int]) -> Tensor:
        r""":meth:`forward` for rows grouped by condition, without autograd; updates ``h``.

        Row block :math:`u` (``counts[u]`` rows) has condition ``cond[u]``. Its scale and
        shift are folded into the first linear layer, :math:`W(x(1 + s) + b) + c = (W
        \mathrm{diag}(1 + s))\,x + (Wb + c)`, one small matrix per condition, so the
        per-cell scale-and-shift passes and the gather of each cell's condition go away.
        """
        first, second = self.mlp[0], self.mlp[3]
        scale, shift = self.film(cond).chunk(2, dim=-1)
        weight = first.weight[None] * (1 + scale)[:, None, :]  # (conditions, 2H, H)
        bias = torch.addmm(first.bias, shift, first.weight.t())  # (conditions, 2H)
        x = self.norm(h)
        a = x.new_empty(x.shape[0], first.out_features)
        start = 0
        for u, count in enumerate(counts):
            if count:
                torch.addmm(bias[u], x[start : start + count], weight[u].t(),
                            out=a[start : start + count])
                start += count
        # GELU in place: a fresh output the size of ``a`` on every call costs more (memory
        # pages) than the pass itself
        return h.add_(second.bias).addmm_(torch.ops.aten.gelu_(a), second.weight.t())

    def forward_sorted(self, h: Tensor, cond: Tensor, counts: list[int]) -> Tensor:
        """:meth:`forward` for rows grouped by condition as in :meth:`forward_grouped`,
        under autocast: the layers run as in :meth:`forward` (their products in autocast's
        precision), and each row block's scale and shift are applied in place, one pass
        per block, rather than gathered for every row first."""
        scale, shift = self.film(cond).chunk(2, dim=-1)
        x = self.norm(h)
        start = 0
        for u, count in enumerate(counts):
            if count:
                rows = x[start : start + count]
                torch.addcmul(shift[u], rows, 1 + scale[u], out=rows)
                start += count
        return h + self.mlp(x)


class ScoreNet(nn.Module):
    r"""MLP predicting the noise :math:`\epsilon(z_t, t, c)`.

    Labels are embedded with one extra row, index ``n_labels``, the *null* token used for
    unconditional predictions (classifier-free guidance).

    Parameters
    ----------
    n_latent
        Dimension of the latents.
    n_labels
        Number of labels (the null token is added).
    n_hidden
        Hidden width.
    n_blocks
        Number of residual blocks.
    time_embedding_dim
        Width of the sinusoidal time embedding.
    dropout_rate
        Dropout inside the blocks.
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
        index = None
        if z.device.type == "cpu" and t.numel() > 1 and bool((t == t[0]).all()):
            # Sampling: one time for the whole batch, so only the few distinct labels need
            # a condition and a scale-and-shift (about a third of each block's arithmetic).
            # On a CPU only: on a GPU that arithmetic is cheap, and finding the labels
            # would wait for the device several times per evaluation.
            labels, index = torch.unique(labels, return_inverse=True)
            t = t[: labels.numel()]
            if not (self.training or torch.is_grad_enabled()):
                # the float32 path writes its products into preallocated float32 buffers,
                # which autocast's lower precision cannot fill: under autocast the layers
                # run as they are, on the rows in the same order
                autocast = autocast_dtype(z.device.type) is not None
                return self._forward_grouped(z, self.condition(t, labels), index, autocast)
        cond = self.condition(t, labels)
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, cond, index)
        return self.out(self.out_norm(h))

    def _forward_grouped(self, z: Tensor, cond: Tensor, index: Tensor,
                         autocast: bool = False) -> Tensor:
        """Inference with one time: rows sorted by condition, then each block's
        :meth:`~_ResidualBlock.forward_grouped` (under autocast
        :meth:`~_ResidualBlock.forward_sorted`), then back to the input order."""
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=cond.shape[0]).tolist()
        h = self.inp(z[order])
        for block in self.blocks:
            h = block.forward_sorted(h, cond, counts) if autocast \
                else block.forward_grouped(h, cond, counts)
        out = self.out(self.out_norm(h))
        return out.new_empty(out.shape).index_copy_(0, order, out)
