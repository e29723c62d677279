r"""Spectral adversarial perturbation of edge weights (Bini & Marchand-Maillet, 2025,
Sec. 3.3, Eqs. 1-2).

The adversary perturbs the weights of the existing edges of a (batch-local) graph along

.. math::
    \delta_{ij} \propto v_1[i]\, v_1[j] = \tfrac12 \nabla_{w_{ij}} \lambda_{\max}(W),

the direction in which the graph's dominant spectral mode changes fastest, with
:math:`v_1` the principal eigenvector of the weight matrix found by a few power
iterations. The perturbation has Frobenius norm :math:`\epsilon \lVert W \rVert_F` and
the sign that increases the training loss (one extra gradient, as in FGSM).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _spmv(edge_index: Tensor, edge_weight: Tensor, x: Tensor, num_nodes: int) -> Tensor:
    """``W @ x`` for a weight matrix given as an edge list (messages flow src -> dst)."""
    src, dst = edge_index
    return torch.zeros(num_nodes, dtype=x.dtype, device=x.device).index_add_(
        0, dst, edge_weight * x[src]
    )


def principal_eigenvector(
    edge_index: Tensor, edge_weight: Tensor, num_nodes: int, n_iter: int = 3
) -> Tensor:
    r"""Principal (Perron) eigenvector of a symmetric non-negative weight matrix.

    Power iteration on :math:`I + W/\rho`, with :math:`\rho` the largest weighted degree
    (an upper bound on :math:`\lambda_{\max}(W)`): the shift maps the spectrum into
    :math:`[0, 2]` so the iteration cannot oscillate on bipartite-like graphs, and the
    principal eigenvector is unchanged. Starts from the uniform vector; returns a unit
    vector with non-negative sum.
    """
    edge_weight = edge_weight.detach()
    degree = torch.zeros(num_nodes, dtype=edge_weight.dtype, device=edge_weight.device)
    degree = degree.index_add_(0, edge_index[1], edge_weight)
    rho = degree.max().clamp_min(torch.finfo(edge_weight.dtype).tiny)
    v = torch.full((num_nodes,), num_nodes**-0.5, dtype=edge_weight.dtype,
                   device=edge_weight.device)
    for _ in range(n_iter):
        v = v + _spmv(edge_index, edge_weight, v, num_nodes) / rho
        v = v / v.norm()
    return torch.where(v.sum() >= 0, v, -v)  # on the device: no host synchronisation


def spectral_direction(edge_index: Tensor, eigenvector: Tensor) -> Tensor:
    r"""Unit-norm perturbation direction :math:`v_1[i] v_1[j]` on the existing edges (Eq. 2)."""
    direction = eigenvector[edge_index[0]] * eigenvector[edge_index[1]]
    return direction / direction.norm().clamp_min(torch.finfo(direction.dtype).tiny)


def random_direction(
    edge_index: Tensor, num_nodes: int, generator: torch.Generator | None = None
) -> Tensor:
    """Unit-norm symmetric Gaussian direction on the existing edges (the ablation's adversary).

    Each undirected edge gets one value, shared by its two directed copies, so the perturbed
    weight matrix stays symmetric.
    """
    src, dst = edge_index
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    undirected, inverse = torch.unique(lo * num_nodes + hi, return_inverse=True)
    values = torch.randn(undirected.numel(), generator=generator, dtype=torch.float32)
    direction = values.to(edge_index.device)[inverse]
    return direction / direction.norm().clamp_min(torch.finfo(direction.dtype).tiny)


def perturb_edge_weights(
    edge_weight: Tensor,
    direction: Tensor,
    epsilon: float,
    sign: float = 1.0,
    min_weight_fraction: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    r"""Move the edge weights by :math:`\delta = s\,\epsilon \lVert w \rVert\, d`.

    Parameters
    ----------
    edge_weight
        ``(n_edges,)`` positive weights of the existing edges.
    direction
        ``(n_edges,)`` unit-norm direction :math:`d` (:func:`spectral_direction`).
    epsilon
        Radius relative to the weights: :math:`\lVert\delta\rVert = \epsilon \lVert w
        \rVert` (Frobenius norms of the weight matrices).
    sign
        +1 or -1, chosen by the caller to increase the loss.
    min_weight_fraction
        Weights stay positive: each is kept at least this fraction of its original value.
        Only when this floor bites is the applied radius smaller than ``epsilon``.

    Returns
    -------
    perturbed
        The perturbed weights (detached from ``edge_weight``'s graph).
    relative_change
        :math:`\lVert w' - w \rVert / \lVert w \rVert` actually applied.
    """
    weight = edge_weight.detach()
    delta = sign * epsilon * weight.norm() * direction
    perturbed = torch.maximum(weight + delta, min_weight_fraction * weight)
    relative_change = (perturbed - weight).norm() / weight.norm().clamp_min(
        torch.finfo(weight.dtype).tiny
    )
    return perturbed, relative_change
