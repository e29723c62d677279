"""ScoreNet: the conditional network of the latent diffusion (Bini & Marchand-Maillet, 2025,
Sec. 3.2.2), conditioned on any subset of a cell's attributes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# angular frequencies of the Fourier features of a standardised continuous covariate:
# periods from 16 standard deviations down to 2, so that the embedding is smooth between
# training values (finer periods let it take arbitrary values at a dose between two doses)
FOURIER_FREQUENCIES = tuple(math.pi / 8 * 2.0**k for k in range(4))


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style embedding of times ``t`` in [0, 1] (scaled by 1000, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def fourier_features(x: Tensor, frequencies: Sequence[float] = FOURIER_FREQUENCIES) -> Tensor:
    r"""``(n,) -> (n, 1 + 2K)``: :math:`[x, \sin(\omega_1 x), \ldots, \sin(\omega_K x),
    \cos(\omega_1 x), \ldots, \cos(\omega_K x)]` of standardised values ``x``, so that a
    small network represents both smooth trends and sharper changes of a covariate."""
    omega = torch.tensor(frequencies, dtype=torch.float32, device=x.device)
    angles = x.float()[:, None] * omega[None, :]
    return torch.cat([x.float()[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)


def drop_attributes(attributes: Tensor, p: float, generator: torch.Generator | None = None,
                    blocks: Sequence[int] = ()) -> Tensor:
    """``attributes`` (``(n, A + sum(blocks))``) with each attribute set to NaN (null)
    independently with probability ``p``: the per-cell, per-attribute dropout of
    classifier-free guidance. The last columns are the ``blocks`` (a spot's position, a
    cell's chromatin), each one attribute of several columns, dropped together."""
    if p <= 0.0 or attributes.numel() == 0:
        return attributes
    n, width = attributes.shape
    n_single = width - sum(blocks)
    draws = torch.rand((n, n_single + len(blocks)), generator=generator,
                       device=attributes.device) < p
    widths = torch.tensor([1] * n_single + [int(w) for w in blocks], device=attributes.device)
    drop = torch.repeat_interleave(draws, widths, dim=1)
    return attributes.masked_fill(drop, float("nan"))


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

    A cell's attributes :math:`c = (c_1, \ldots, c_A)` are its categorical attributes'
    codes followed by its standardised continuous covariates, NaN where an attribute is
    *null* (not conditioned on). The condition of a row is :math:`\mathrm{GELU}(
    \mathrm{MLP}(\mathrm{emb}(t)) + \sum_a e_a(c_a))`: for a categorical attribute
    :math:`e_a` is an embedding with one row per category and one more, index
    ``n_categories[a]``, its null token; for a continuous one an MLP of
    :func:`fourier_features`, or a learned null vector. Trained with each attribute
    dropped to null independently (classifier-free guidance), one network gives the score
    of any subset of attributes. The rows may end with *blocks*, attributes of several
    columns (a spot's position in its tissue, :math:`P` columns of its spatial Laplacian
    positional encoding; a cell's chromatin, :math:`K` columns of its standardised ATAC
    LSI): each is embedded by its own MLP and is null as a whole (a learned vector) when
    its first column is NaN.

    Parameters
    ----------
    n_latent
        Dimension of the latents.
    n_categories
        Number of categories of each categorical attribute.
    n_continuous
        Number of continuous covariates.
    blocks
        Widths of the blocks at the end of each row, in order (empty: none).
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
          computed once per distinct row of ``attributes``); ``attributes`` :math:`(n,
          A + \sum` ``blocks``:math:`)` float, NaN for null
        - **output:** :math:`(n, \text{n_latent})`
    """

    def __init__(
        self,
        n_latent: int,
        n_categories: Sequence[int] = (),
        n_continuous: int = 0,
        blocks: Sequence[int] = (),
        n_hidden: int = 128,
        n_blocks: int = 3,
        time_embedding_dim: int = 64,
        dropout_rate: float = 0.0,
    ):
        super().__init__()
        self.n_categories = [int(n) for n in n_categories]
        self.n_continuous = int(n_continuous)
        self.block_widths = [int(w) for w in blocks]
        if any(w < 1 for w in self.block_widths):
            raise ValueError(f"Every block needs at least one column, got {self.block_widths}.")
        self.time_embedding_dim = time_embedding_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embedding_dim, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_hidden)
        )
        self.category_embeddings = nn.ModuleList(
            [nn.Embedding(n + 1, n_hidden) for n in self.n_categories])
        n_fourier = 1 + 2 * len(FOURIER_FREQUENCIES)
        self.continuous_mlps = nn.ModuleList([
            nn.Sequential(nn.Linear(n_fourier, n_hidden), nn.GELU(),
                          nn.Linear(n_hidden, n_hidden)) for _ in range(self.n_continuous)])
        # learned null vectors (registered only with continuous covariates: a parameter no
        # loss uses would stop a distributed run)
        self.continuous_null = nn.Parameter(torch.zeros(self.n_continuous, n_hidden)) \
            if self.n_continuous else None
        self.block_mlps = nn.ModuleList([
            nn.Sequential(nn.Linear(w, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_hidden))
            for w in self.block_widths])
        self.block_null = nn.Parameter(torch.zeros(len(self.block_widths), n_hidden)) \
            if self.block_widths else None
        self.inp = nn.Linear(n_latent, n_hidden)
        self.blocks = nn.ModuleList([_ResidualBlock(n_hidden, dropout_rate)
                                     for _ in range(n_blocks)])
        self.out_norm = nn.LayerNorm(n_hidden)
        self.out = nn.Linear(n_hidden, n_latent)

    @property
    def n_attributes(self) -> int:
        return len(self.n_categories) + self.n_continuous

    @property
    def n_columns(self) -> int:
        """Columns of an attribute row: the attributes, then the blocks."""
        return self.n_attributes + sum(self.block_widths)

    def block_columns(self) -> list[list[int]]:
        """The columns of each block in an attribute row."""
        start, out = self.n_attributes, []
        for width in self.block_widths:
            out.append(list(range(start, start + width)))
            start += width
        return out

    def attribute_embedding(self, attributes: Tensor) -> Tensor:
        r""":math:`\sum_a e_a(c_a)`, ``(n, n_hidden)`` (zeros without attributes)."""
        out = attributes.new_zeros(attributes.shape[0], self.time_mlp[-1].out_features)
        for a, (n, embedding) in enumerate(zip(self.n_categories, self.category_embeddings,
                                               strict=True)):
            value = attributes[:, a]
            codes = torch.where(torch.isnan(value), torch.full_like(value, n), value)
            out = out + embedding(codes.long())
        n_cat = len(self.n_categories)
        for j, mlp in enumerate(self.continuous_mlps):
            value = attributes[:, n_cat + j]
            null = torch.isnan(value)
            embedded = mlp(fourier_features(torch.where(null, torch.zeros_like(value), value)))
            out = out + torch.where(null[:, None], self.continuous_null[j], embedded)
        for b, (columns, mlp) in enumerate(zip(self.block_columns(), self.block_mlps,
                                               strict=True)):
            block = attributes[:, columns[0] : columns[-1] + 1]
            null = torch.isnan(block[:, :1])
            embedded = mlp(torch.where(null, torch.zeros_like(block), block))
            out = out + torch.where(null, self.block_null[b], embedded)
        return out

    def condition(self, t: Tensor, attributes: Tensor) -> Tensor:
        """The condition vector of each (time, attributes) row."""
        cond = self.time_mlp(sinusoidal_embedding(t, self.time_embedding_dim))
        return F.gelu(cond + self.attribute_embedding(attributes))

    def forward(self, z: Tensor, t: Tensor, attributes: Tensor) -> Tensor:
        attributes = attributes.reshape(z.shape[0], self.n_columns).float()
        index = None
        if t.dim() == 0 and not self.n_columns:  # one condition for all rows
            cond = self.condition(t.reshape(1), attributes[:1].new_zeros(1, 0))
            index = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        elif t.dim() == 0 and self.n_columns == 1 and self.n_categories:  # one label
            n = self.n_categories[0]  # the table: every category and the null token
            every = torch.arange(n + 1, device=z.device, dtype=attributes.dtype)[:, None]
            cond = self.condition(t.expand(n + 1), every.masked_fill(every == n, math.nan))
            index = torch.nan_to_num(attributes[:, 0], nan=float(n)).long()
        elif t.dim() == 0:  # one time: a table of the distinct rows' conditions
            key = torch.nan_to_num(attributes, nan=math.inf)  # NaN rows compare equal
            distinct, index = torch.unique(key, dim=0, return_inverse=True)
            distinct = distinct.masked_fill(torch.isinf(distinct), math.nan)
            cond = self.condition(t.expand(distinct.shape[0]), distinct)
        else:
            cond = self.condition(t, attributes)
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, cond, index)
        return self.out(self.out_norm(h))
