r"""Counterfactual counts that keep a cell's own noise: observed counts carried from one
count distribution to another by their quantiles."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats
from torch import Tensor

from ..distributions import CountParams


def _marginals(params: CountParams, library: Tensor
               ) -> tuple[stats.rv_discrete, np.ndarray, np.ndarray]:
    r"""The per-entry count distribution without zero inflation (scipy, frozen, float64), the
    zero-inflation probabilities :math:`\pi` (zeros for NB and Poisson) and the means of the
    distribution without zero inflation."""
    with torch.no_grad():
        mu = (library.reshape(-1, 1).double()
              * params.log_scale().double().exp()).cpu().numpy()
        if params.likelihood == "poisson":
            base = stats.poisson(mu)
        else:
            theta = params.log_theta.detach().double().exp().cpu().numpy()[None, :]
            base = stats.nbinom(theta, theta / (theta + mu))
        zi = params.with_biases().zi_logits
        pi = np.zeros_like(mu) if zi is None else torch.sigmoid(zi.double()).cpu().numpy()
    return base, pi, mu


def _cdf(base, pi: np.ndarray, x: np.ndarray) -> np.ndarray:
    r""":math:`F(x) = \pi + (1 - \pi) F_{base}(x)` for :math:`x \ge 0`, 0 below."""
    return np.where(x < 0, 0.0, pi + (1.0 - pi) * base.cdf(x))


def transport_counts(counts, source: CountParams, target: CountParams, library: Tensor,
                     generator: np.random.Generator) -> sp.csr_matrix:
    r"""Each observed count carried from its distribution under ``source`` to its
    distribution under ``target`` by the quantile it sits at.

    With :math:`F_s` and :math:`F_t` the two count distributions' CDFs (NB, ZINB or Poisson,
    per cell and gene, with the cells' library sizes ``library``), a count :math:`x` gets a
    uniform level :math:`u \sim U(F_s(x - 1), F_s(x))` and becomes :math:`F_t^{-1}(u)`,
    the smallest :math:`k` with :math:`F_t(k) \ge u`. If :math:`x \sim F_s`, the result is
    distributed as :math:`F_t` exactly, and a count high for its distribution stays high:
    the cell keeps its own noise (the abduction step of a counterfactual, for a likelihood
    monotone in its noise). For equal distributions it returns ``counts`` unchanged.

    Parameters
    ----------
    counts
        ``(n, genes)`` observed counts (sparse or dense).
    source, target
        The decoder's parameters of the same cells before and after the change.
    library
        ``(n,)`` library sizes.
    generator
        Draws the uniform levels.

    Returns
    -------
    ``(n, genes)`` CSR matrix of float32 whole numbers. Dense work: pass a few thousand cells
    at a time.
    """
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    base_s, pi_s, mu_s = _marginals(source, library)
    base_t, pi_t, mu_t = _marginals(target, library)
    low, high = _cdf(base_s, pi_s, x - 1.0), _cdf(base_s, pi_s, x)
    u = low + (high - low) * generator.random(x.shape)
    u = np.clip(u, 1e-300, 1.0 - 1e-12)  # the inverse CDF is finite inside (0, 1)
    zero = pi_t + (1.0 - pi_t) * base_t.cdf(0.0)
    level = np.clip((u - pi_t) / np.maximum(1.0 - pi_t, 1e-300), 0.0, 1.0 - 1e-12)
    out = np.where(u <= zero, 0.0, np.maximum(base_t.ppf(level), 0.0))
    same = (mu_s == mu_t) & (pi_s == pi_t)  # one distribution: the count itself, exactly
    out = np.where(same, x, out)
    return sp.csr_matrix(out.astype(np.float32))
