"""Cell graph: log-normalised PCA embedding and a symmetric weighted k-NN graph."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

from ._matrix import as_csr, is_in_memory, row_chunks

# Up to this many cells an exact search is faster than pynndescent, whose numba functions
# are compiled afresh in every process (~40 s on 2 cores, whatever the data size).
EXACT_KNN_LIMIT = 50_000


def log_normalize(counts: sp.spmatrix | np.ndarray, target_sum: float = 1e4) -> sp.csr_matrix:
    """Library-size normalise to ``target_sum`` and apply ``log1p`` (returns a new CSR matrix)."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    x.sort_indices()
    library = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    np.log1p(x.data, out=x.data)
    return x


def pca_embedding(
    counts,
    n_pcs: int = 50,
    n_top_genes: int = 2000,
    random_state: int = 0,
) -> np.ndarray:
    """PCA of log-normalised counts restricted to the most variable genes.

    The genes are ranked by the variance of their log-normalised expression; PCA is the
    implicitly centred sparse PCA of :func:`scanpy.pp.pca` (ARPACK), so the count matrix is
    never densified. ``counts`` may be a backed matrix (``read_h5ad(..., backed="r")``):
    it is then read twice in blocks of rows, and only the log-normalised selected genes are
    held in memory.
    """
    import scanpy as sc

    n_obs, n_vars = counts.shape
    # an in-memory matrix is normalised once; a backed one block by block on each pass
    cache = [log_normalize(as_csr(counts))] if is_in_memory(counts) else None

    def normalised_blocks():
        if cache is not None:
            yield from cache
        else:
            for block in row_chunks(counts):
                yield log_normalize(block)

    if n_vars > n_top_genes:
        total, total_sq = np.zeros(n_vars), np.zeros(n_vars)
        for x in normalised_blocks():
            total += np.asarray(x.sum(axis=0, dtype=np.float64)).ravel()
            total_sq += np.asarray(x.multiply(x).sum(axis=0, dtype=np.float64)).ravel()
        mean = total / n_obs
        variance = total_sq / n_obs - mean**2
        top = np.sort(np.argsort(-variance, kind="stable")[:n_top_genes])
        blocks = [x[:, top] for x in normalised_blocks()]
    else:
        blocks = list(normalised_blocks())
    cache = None
    x = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
    del blocks
    n_comps = int(min(n_pcs, min(x.shape) - 1))
    if n_comps < 1:  # a single gene (or cell): nothing for ARPACK; the centred data will do
        dense = x.toarray()
        return (dense - dense.mean(axis=0)).astype(np.float32)
    return np.asarray(sc.pp.pca(x, n_comps=n_comps, random_state=random_state), dtype=np.float32)


def nearest_neighbors(
    embedding: np.ndarray,
    n_neighbors: int,
    method: Literal["auto", "exact", "pynndescent"] = "auto",
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and Euclidean distances of each cell's ``n_neighbors + 1`` nearest cells.

    ``"exact"`` is a brute-force search (:class:`sklearn.neighbors.NearestNeighbors`),
    ``"pynndescent"`` the approximate :class:`pynndescent.NNDescent`; ``"auto"`` picks the
    exact search up to ``EXACT_KNN_LIMIT`` cells. The lists include the cell itself.
    """
    if method == "auto":
        method = "exact" if embedding.shape[0] <= EXACT_KNN_LIMIT else "pynndescent"
    if method == "exact":
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=n_neighbors + 1, algorithm="brute")
        distances, neighbors = search.fit(embedding).kneighbors(embedding)
        return neighbors, distances
    if method == "pynndescent":
        from pynndescent import NNDescent

        index = NNDescent(embedding, n_neighbors=n_neighbors + 1, metric="euclidean",
                          random_state=random_state, low_memory=True, verbose=False)
        return index.neighbor_graph
    raise ValueError(f"method must be 'auto', 'exact' or 'pynndescent', got {method!r}.")


def knn_graph(
    embedding: np.ndarray,
    n_neighbors: int = 15,
    random_state: int = 0,
    method: Literal["auto", "exact", "pynndescent"] = "auto",
) -> sp.csr_matrix:
    r"""Symmetric k-nearest-neighbour graph with self-tuning Gaussian weights.

    Neighbours come from :func:`nearest_neighbors` (Euclidean; pynndescent for large
    data, an exact search for small data). An edge joins *i* and
    *j* when either is among the other's ``n_neighbors`` nearest cells, with weight

    .. math::
        w_{ij} = \exp\left(-\frac{d_{ij}^2}{\sigma_i \sigma_j}\right),

    :math:`\sigma_i` being the distance from cell *i* to its ``n_neighbors``-th neighbour
    (Zelnik-Manor & Perona, 2004). The formula is symmetric in *i* and *j*, so the union of
    the two directed graphs is a symmetric matrix with weights in (0, 1] and no self-loops.

    Returns
    -------
    ``(n_cells, n_cells)`` CSR matrix, sorted indices.
    """
    n_obs = embedding.shape[0]
    if n_obs <= n_neighbors:
        raise ValueError(
            f"A {n_neighbors}-nearest-neighbour graph needs more than {n_neighbors} cells; "
            f"got {n_obs}. Pass a smaller n_neighbors or more cells."
        )
    neighbors, distances = nearest_neighbors(embedding, n_neighbors, method, random_state)
    # Drop each cell itself; duplicated cells may appear at any position, so mask by identity.
    rows = np.repeat(np.arange(n_obs), neighbors.shape[1])
    cols = neighbors.ravel()
    dist = distances.ravel().astype(np.float64)
    keep = (cols != rows) & (cols >= 0)
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    sigma = distances[:, -1].astype(np.float64)
    positive = sigma[sigma > 0]
    sigma = np.maximum(sigma, positive.min() if positive.size else 1.0)
    weight = np.exp(-(dist**2) / (sigma[rows] * sigma[cols]))
    directed = sp.csr_matrix((weight, (rows, cols)), shape=(n_obs, n_obs))
    graph = directed.maximum(directed.T).tocsr()
    graph.sort_indices()
    return graph.astype(np.float32)
