"""The count sampler in torch, on the parameters' device (a GPU's): dense uniforms from a
torch generator, and only the CSR arrays of the nonzero counts back to the host."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ..distributions import CountParams

# P(X > 0) <= E[X]: the dense selection's bound is E[X] times this, so that float32
# rounding cannot push it below the exact probability
BOUND_SLACK = 1.0 + 1e-5
# means up to this are drawn by inverse CDF (a few steps each), larger ones as Gamma-Poisson
INVERSE_CDF_MAX_MEAN = 10.0
# spacing of the dense uniforms (24-bit integers, multiples of 2**-24)
_FLOAT32_SPACING = 2.0**-24
# elements of the pinned buffer through which counts come back from a GPU (16 MiB)
_STAGING_ELEMENTS = 4 * 2**20


def _indices(mask: Tensor) -> Tensor:
    return torch.nonzero(mask).squeeze(1)


def positive_draws(mu: Tensor, theta: Tensor | None, p_zero: Tensor,
                   generator: torch.Generator) -> Tensor:
    r"""Draws of :math:`X \mid X \ge 1` for :math:`X \sim \mathrm{NB}(\mu, \theta)`
    (Poisson when ``theta`` is ``None``; ``p_zero`` is :math:`P(X = 0)`), float64 tensors
    on any device, from ``generator``: means up to ``INVERSE_CDF_MAX_MEAN`` by inverse CDF
    (:func:`inverse_cdf_draws`) from a uniform level on :math:`(P(0), 1)`, larger means as
    Gamma–Poisson draws, redrawn while zero (exact)."""
    out = torch.ones_like(mu)  # every draw is at least 1
    small = _indices(mu <= INVERSE_CDF_MAX_MEAN)
    if len(small):
        p0 = p_zero[small]
        level = p0 + (1.0 - p0) * torch.rand(len(small), generator=generator,
                                             device=mu.device, dtype=mu.dtype)
        out[small] = inverse_cdf_draws(mu[small], None if theta is None else theta[small],
                                       p0, level)
    idx = _indices(mu > INVERSE_CDF_MAX_MEAN)
    while len(idx):
        m = mu[idx]
        rate = m if theta is None else torch._standard_gamma(
            theta[idx], generator=generator) * (m / theta[idx])
        draws = torch.poisson(rate, generator=generator)
        out[idx] = draws
        idx = idx[_indices(draws == 0)]
    return out


def inverse_cdf_draws(mu: Tensor, theta: Tensor | None, p_zero: Tensor, level: Tensor
                      ) -> Tensor:
    r"""The smallest :math:`k \ge 1` whose CDF reaches ``level`` (on :math:`(P(0), 1)`),
    for :math:`\mathrm{NB}(\mu, \theta)` (Poisson when ``theta`` is ``None``), stepping
    all entries at once: :math:`p(k) = p(k-1)\,(k a + b)/k` with :math:`a = \mu / (\mu +
    \theta)`, :math:`b = (\theta - 1) a` (Poisson: :math:`a = 0`, :math:`b = \mu`). The
    CPU kernel :func:`~scldiff.sampling._kernels.inverse_cdf` does the same float64
    arithmetic entry by entry, so the draws are the same."""
    if theta is None:
        ratio_a, ratio_b = torch.zeros_like(mu), mu
    else:
        ratio_a = mu / (mu + theta)
        ratio_b = (theta - 1.0) * ratio_a
    pmf = p_zero * (ratio_a + ratio_b)
    out = torch.ones_like(mu)
    where = torch.arange(mu.numel(), device=mu.device)
    _inverse_cdf_steps(out, (where, level, ratio_a, ratio_b, pmf, p_zero + pmf))
    return out


def _inverse_cdf_steps(out: Tensor, state: tuple[Tensor, ...]) -> None:
    """The steps of :func:`inverse_cdf_draws` from ``k = 1``: ``state`` is
    ``(where, level, ratio_a, ratio_b, pmf, cdf)`` of the entries still running (``where``
    their positions in ``out``, which each step writes)."""
    where, level, ratio_a, ratio_b, pmf, cdf = state
    k, stalled = 1.0, None
    while True:
        # Stop where the CDF has passed the level. Rounding can leave the summed CDF just
        # short of a level near 1: once the pmf is past its mode (it only falls from there)
        # and too small to change the CDF, the entry stops at k, which moves at most a
        # rounding error of probability.
        running = (cdf <= level) & (pmf > 0)
        if stalled is not None:
            running &= ~stalled
        keep = _indices(running)  # indices, then takes: cheaper than masks
        if not len(keep):
            return
        where, level, ratio_a, ratio_b, pmf, cdf = (
            where[keep], level[keep], ratio_a[keep], ratio_b[keep], pmf[keep], cdf[keep])
        k += 1.0
        out[where] = k
        factor = (k * ratio_a + ratio_b) / k
        pmf *= factor
        previous = cdf
        cdf = cdf + pmf
        stalled = (cdf == previous) & (factor < 1.0)


@torch.no_grad()
def draw_counts_torch(params: CountParams, library: Tensor, generator: torch.Generator
                      ) -> sp.csr_matrix:
    r""":func:`~scldiff.sampling.draw_counts` in torch on the parameters' device.

    The dense uniforms are 24-bit integers :math:`k` (:math:`u = k\,2^{-24}`), kept where
    :math:`k < 2^{24} E[X]`, and completed with a float64 uniform for those entries, so
    the comparison with :math:`P(X > 0)` is exact whatever the device's float32 uniforms
    look like.
    """
    scale, kept = params.scale_and_kept()
    device = scale.device
    n_cells, n_genes = scale.shape
    lib = library.detach().to(device, torch.float64).reshape(-1)
    bound = scale * (lib * (BOUND_SLACK / _FLOAT32_SPACING)).float()[:, None]
    if kept is not None:
        bound.mul_(kept)
    ticks = torch.randint(0, 2**24, (n_cells, n_genes), generator=generator, device=device,
                          dtype=torch.int32)
    flat = _indices((ticks < bound).reshape(-1))
    del bound
    rows = torch.div(flat, n_genes, rounding_mode="floor")
    cols = flat - rows * n_genes
    mu = lib[rows] * scale.reshape(-1)[flat].double()
    theta = None
    if params.log_theta is not None:
        theta = params.log_theta.detach().exp().to(device, torch.float64)[cols]
    u = (ticks.reshape(-1)[flat].double()
         + torch.rand(flat.numel(), generator=generator, device=device, dtype=torch.float64)
         ) * _FLOAT32_SPACING
    # exactly: a count when u < P(X > 0) = (1 - pi)(1 - P_NB(0)), in float64
    log_p0 = -mu if theta is None else -theta * torch.log1p(mu / theta)
    p_nonzero = -torch.expm1(log_p0)
    if kept is not None:
        p_nonzero = p_nonzero * kept.reshape(-1)[flat].double()
    keep = _indices(u < p_nonzero)
    values = positive_draws(mu[keep], None if theta is None else theta[keep],
                            torch.exp(log_p0[keep]), generator)
    return csr_from_tensors(rows[keep], cols[keep], values, n_cells, n_genes)


def csr_from_tensors(rows: Tensor, cols: Tensor, values: Tensor, n_cells: int,
                     n_genes: int) -> sp.csr_matrix:
    """The CSR matrix of entries given in row-major order, as tensors on any device: the
    row pointers are counted there, and only the CSR arrays, in their final dtypes, come to
    the host (:func:`to_host`)."""
    index_dtype = torch.int32 if max(n_genes, values.numel()) < 2**31 else torch.int64
    indptr = torch.zeros(n_cells + 1, dtype=index_dtype, device=rows.device)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_cells), 0, dtype=index_dtype)
    return sp.csr_matrix((to_host(values.float()), to_host(cols.to(index_dtype)),
                          to_host(indptr)), shape=(n_cells, n_genes))


def to_host(tensor: Tensor, staging: int = _STAGING_ELEMENTS) -> np.ndarray:
    """A 1-d tensor as a numpy array in ordinary (pageable) memory; from a GPU in pieces
    through one small pinned buffer, reused, since a copy from a GPU straight into pageable
    memory is much slower (docs "Performance")."""
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
