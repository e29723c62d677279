r"""Normalised Laplacian and Laplacian positional encodings (Bini & Marchand-Maillet, 2025,
Sec. 3.1)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh

_DENSE_LIMIT = 600  # below this many cells a dense eigendecomposition is faster and exact


def normalized_adjacency(graph: sp.spmatrix) -> sp.csr_matrix:
    r""":math:`D^{-1/2} W D^{-1/2}` of a symmetric weight matrix (isolated nodes stay zero)."""
    graph = sp.csr_matrix(graph, dtype=np.float64)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    inv_sqrt = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    d = sp.diags(inv_sqrt)
    return (d @ graph @ d).tocsr()


def normalized_laplacian(graph: sp.spmatrix) -> sp.csr_matrix:
    r""":math:`L = I - D^{-1/2} W D^{-1/2}`."""
    n = graph.shape[0]
    return (sp.identity(n, format="csr") - normalized_adjacency(graph)).tocsr()


def laplacian_positional_encoding(
    graph: sp.spmatrix, n_lpe: int = 16, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""First ``n_lpe`` non-trivial eigenvectors of the normalised Laplacian.

    Computes the smallest eigenpairs of :math:`L = I - D^{-1/2} W D^{-1/2}` as the largest
    of :math:`S = D^{-1/2} W D^{-1/2}` (the same eigenvectors, :math:`\lambda_L = 1 -
    \lambda_S`), which ARPACK finds quickly. The trivial eigenvectors (eigenvalue 0, one per
    connected component) are dropped. Each eigenvector's sign is fixed so that its entry of
    largest magnitude is positive, which makes the encoding deterministic.

    Returns
    -------
    lpe
        ``(n_cells, n_lpe)`` orthonormal columns, ordered by increasing eigenvalue.
    eigenvalues
        The matching eigenvalues of :math:`L`.
    """
    n = graph.shape[0]
    n_components, _ = connected_components(graph, directed=False)
    k = n_lpe + n_components
    if k >= n:
        raise ValueError(
            f"n_lpe={n_lpe} needs more than {k} cells (the graph has {n_components} connected "
            f"component(s) and {n} cells); pass a smaller n_lpe."
        )
    s = normalized_adjacency(graph)
    if n <= _DENSE_LIMIT:
        values, vectors = np.linalg.eigh(s.toarray())
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    else:
        v0 = np.random.default_rng(random_state).uniform(0.5, 1.5, size=n)
        values, vectors = eigsh(s, k=k, which="LA", v0=v0, tol=1e-8, maxiter=20 * n)
        order = np.argsort(-values, kind="stable")
        values, vectors = values[order], vectors[:, order]
    values, vectors = values[n_components:], vectors[:, n_components:]
    anchor = np.abs(vectors).argmax(axis=0)
    vectors = vectors * np.sign(vectors[anchor, np.arange(vectors.shape[1])])
    return vectors.astype(np.float32), (1.0 - values).astype(np.float32)
