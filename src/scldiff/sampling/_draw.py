"""The count sampler's entry point, :func:`draw_counts`: on a CPU through the compiled
kernels, on a GPU in torch."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ..distributions import CountParams
from ._torch import BOUND_SLACK, INVERSE_CDF_MAX_MEAN, draw_counts_torch

# stand in for the ZINB's arrays and theta in the CPU kernels where the likelihood has none
_NO_KEPT = np.zeros((1, 1), np.float32)
_NO_THETA = np.zeros(1)


def draw_counts(params: CountParams, library: Tensor,
                generator: np.random.Generator | torch.Generator) -> sp.csr_matrix:
    r"""Counts drawn from the likelihood ``params`` of cells with library sizes ``library``
    (``(n,)`` or ``(n, 1)``), exactly and sparsely.

    A count is nonzero with probability :math:`P(X > 0) = (1 - \pi)\,(1 - (\theta / (\theta
    + \mu))^\theta)` (ZINB; NB without :math:`\pi`, Poisson :math:`1 - e^{-\mu}`),
    decided by one uniform :math:`u` per entry. Since :math:`P(X > 0) \le E[X]` (Markov), a
    pass over the dense ``(n, genes)`` parameters keeps only the entries whose uniform may
    lie below :math:`E[X]`, about a seventh of them on PBMC3K; for those alone the exact
    probability is computed in float64. The nonzero entries, a few percent, are drawn from
    :math:`X \mid X \ge 1`: means up to 10 by inverse CDF, larger ones as Gamma–Poisson
    draws redrawn while zero. Given :math:`u < P(X > 0)`, the ratio :math:`u / P(X > 0)`
    is a fresh uniform, which sets the inverse CDF's level.

    Parameters
    ----------
    params
        The decoder's output for the cells; on a CPU, its logits may be bf16 and its biases
        given apart (:meth:`~scldiff.module.CountDecoder.forward` with ``bias_apart``).
    library
        The cells' library sizes.
    generator
        A numpy ``Generator``: the draws run on the CPU, in compiled loops
        (:mod:`scldiff.sampling._kernels`): one pass per cell computes the probabilities
        from the logits and the uniforms from a counter-based generator keyed by one draw
        from ``generator``. A ``torch.Generator``: they run in torch on the parameters'
        device (:func:`~scldiff.sampling._torch.draw_counts_torch`), and only the nonzero
        counts come back. The two give different counts for one seed, from the same
        distribution. Pass a few hundred cells at a time on a CPU.

    Returns
    -------
    ``(n, genes)`` CSR matrix of float32 whole numbers.
    """
    if isinstance(generator, torch.Generator):
        return draw_counts_torch(params, library, generator)
    return _draw_counts_cpu(params, library, generator)


def _logits_on_cpu(value: Tensor, bias: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32, or bf16 as their ``uint16`` bit patterns, which the kernel widens
    exactly; C-contiguous) and their per-gene biases (float32; zeros where absent), as
    numpy arrays for the CPU kernels."""
    value = value.detach().to("cpu")
    value = value.contiguous().view(torch.uint16).numpy() if value.dtype == torch.bfloat16 \
        else value.to(torch.float32).contiguous().numpy()
    bias = np.zeros(value.shape[1], np.float32) if bias is None else \
        bias.detach().to("cpu", torch.float32).contiguous().numpy()
    return value, bias


def _draw_counts_cpu(params: CountParams, library: Tensor, rng: np.random.Generator
                     ) -> sp.csr_matrix:
    """:func:`draw_counts` on a CPU: the kernels' pre-selection from the logits, numpy's
    ``log1p`` and ``expm1`` for the exact decisions, the kernels' decisions and inverse-CDF
    draws, numpy's Gamma–Poisson draws for means above ``INVERSE_CDF_MAX_MEAN``."""
    from ._kernels import TICKS, nonzero_draws, preselect_logits

    key = rng.integers(0, 2**64, dtype=np.uint64)
    products, bias = _logits_on_cpu(params.logits, params.logits_bias)
    n_cells, n_genes = products.shape
    has_kept = params.likelihood == "zinb"
    zi_products, zi_bias = _logits_on_cpu(params.zi_logits, params.zi_bias) if has_kept \
        else (_NO_KEPT, _NO_KEPT[0])
    lib = library.detach().to("cpu", torch.float64).reshape(-1).numpy()
    rows, cols, mean, kept, u = preselect_logits(products, bias, zi_products, zi_bias, lib,
                                                 BOUND_SLACK * TICKS, has_kept, key)
    has_theta = params.log_theta is not None
    if has_theta:  # log NB(0) = -theta log(1 + mu / theta), then expm1 of it, in place
        theta = params.log_theta.detach().exp().to("cpu", torch.float64).numpy()[cols]
        zero_m1 = np.divide(mean, theta)
        np.log1p(zero_m1, out=zero_m1)
        zero_m1 *= -theta
        np.expm1(zero_m1, out=zero_m1)
    else:  # Poisson: P(0) - 1 = expm1(-mu)
        zero_m1, theta = np.expm1(-mean), _NO_THETA
    indptr, indices, values, mu, theta = nonzero_draws(
        rows, cols, mean, kept if has_kept else _NO_THETA, u, zero_m1, theta, has_kept,
        has_theta, INVERSE_CDF_MAX_MEAN, n_cells)
    large = np.flatnonzero(mu > INVERSE_CDF_MAX_MEAN)
    if large.size:
        values[large] = _gamma_poisson_positive(mu[large], theta[large] if has_theta else None,
                                                rng)
    index_dtype = np.int32 if max(n_genes, values.size) < 2**31 else np.int64
    return sp.csr_matrix((values.astype(np.float32), indices.astype(index_dtype, copy=False),
                          indptr.astype(index_dtype)), shape=(n_cells, n_genes))


def _gamma_poisson_positive(mu: np.ndarray, theta: np.ndarray | None,
                            rng: np.random.Generator) -> np.ndarray:
    r"""Draws of :math:`X \mid X \ge 1` for :math:`X \sim \mathrm{NB}(\mu, \theta)`
    (Poisson when ``theta`` is ``None``) as Gamma–Poisson draws from ``rng``, redrawn
    while zero (exact). Float64 arrays."""
    out = np.empty_like(mu)
    idx = np.arange(mu.size)
    while len(idx):
        m = mu[idx]
        draws = rng.poisson(m if theta is None else rng.gamma(theta[idx], m / theta[idx]))
        out[idx] = draws
        idx = idx[np.flatnonzero(draws == 0)]
    return out


def compile_kernels() -> None:
    """Compile the CPU sampler's kernels for every likelihood and for float32 and bf16
    logits, by drawing a few cells of each, so that numba's on-disk cache holds them and no
    later process's first :meth:`~scldiff.LapDDPM.generate` compiles (about 7 s on 2
    cores; loading the cache takes a fraction of a second). ``make install`` runs it."""
    from ..module import CountDecoder

    rng = np.random.default_rng(0)
    z = torch.randn(4, 2)
    library = torch.full((4,), 1000.0)
    for likelihood in ("zinb", "nb", "poisson"):
        decoder = CountDecoder(2, 16, n_hidden=8, likelihood=likelihood)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype,
                                                 enabled=dtype is torch.bfloat16):
                params = decoder(z, None, bias_apart=True)
            draw_counts(params, library, rng)
