r"""The starting noise of the reverse diffusion for spots of a tissue, coupled along its
neighbourhood graph so that neighbouring spots start alike (and, through the deterministic
ODE, end alike) while each spot's own noise stays exactly :math:`\mathcal N(0, I)`."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


def smoothing_operator(graph: sp.spmatrix, hops: int = 2) -> sp.csr_matrix:
    r""":math:`M = \mathrm{diag}(1/\lVert m_i\rVert)\, m`, :math:`m = S^{h}`, :math:`S =
    (D + I)^{-1}(W + I)`: the lazy random walk of ``hops`` steps on the graph (weights
    :math:`W`, degrees :math:`D`), each row scaled to unit Euclidean norm, so that
    :math:`M\xi` has unit variance at every spot for :math:`\xi \sim \mathcal N(0, I)`
    and the correlation :math:`m_i \cdot m_j / (\lVert m_i\rVert \lVert m_j\rVert)`
    between spots that share walks."""
    if isinstance(hops, bool) or not isinstance(hops, (int, np.integer)) or hops < 1:
        raise ValueError(f"hops must be a positive integer, got {hops!r}.")
    w = sp.csr_matrix(graph, dtype=np.float64)
    w = w + sp.identity(w.shape[0], format="csr")
    step = sp.diags(1.0 / np.asarray(w.sum(1)).ravel()) @ w
    m = step
    for _ in range(int(hops) - 1):
        m = m @ step
    m = sp.csr_matrix(m)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / norms) @ m)


def coupled_noise(graph: sp.spmatrix, n_dims: int, coupling: float, hops: int = 2,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    r"""``(n_spots, n_dims)`` starting noise :math:`z_i = \sqrt{1-\rho}\,\epsilon_i +
    \sqrt{\rho}\,(M\xi)_i`, :math:`\epsilon, \xi \sim \mathcal N(0, I)` independent,
    :math:`M` of :func:`smoothing_operator`: every :math:`z_i \sim \mathcal N(0, I)`
    exactly, and neighbouring spots correlate by :math:`\rho\, m_i \cdot m_j /
    (\lVert m_i\rVert\lVert m_j\rVert)` in each dimension. ``coupling`` :math:`\rho = 0`
    is independent noise."""
    if isinstance(coupling, bool) or not isinstance(coupling, (int, float, np.floating)) \
            or not 0.0 <= float(coupling) <= 1.0:
        raise ValueError(f"coupling must be a number in [0, 1], got {coupling!r}.")
    n = graph.shape[0]
    eps = torch.randn(n, n_dims, generator=generator, device=device)
    if coupling == 0.0:
        return eps
    xi = torch.randn(n, n_dims, generator=generator, device=device)
    smooth = smoothing_operator(graph, hops) @ xi.double().cpu().numpy()
    smooth = torch.from_numpy(smooth).to(device=device, dtype=eps.dtype)
    return np.sqrt(1.0 - coupling) * eps + np.sqrt(float(coupling)) * smooth
