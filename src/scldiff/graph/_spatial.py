"""Neighbourhood graphs of spots or cells in a tissue, from their coordinates, in squidpy's
layout (``obsp["spatial_connectivities"]``, ``obsp["spatial_distances"]``).

Written here rather than taken from ``squidpy.gr.spatial_neighbors``: squidpy would bring
55 further packages (geopandas, pyarrow, dask, spatialdata among them) for these few lines.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.spatial import Delaunay, QhullError, cKDTree

SPATIAL_GRAPHS: tuple[str, ...] = ("grid", "knn", "delaunay")


def _check_coordinates(coordinates) -> np.ndarray:
    """``(n, 2)`` or ``(n, 3)`` finite float64 coordinates without repeated positions; a
    ``ValueError`` naming the problem otherwise."""
    xy = np.asarray(coordinates, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] not in (2, 3) or xy.shape[0] < 2:
        raise ValueError(f"Spatial coordinates must be an (n_spots, 2) or (n_spots, 3) array "
                         f"with at least 2 spots, got shape {xy.shape}.")
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} spots have missing or infinite coordinates (e.g. "
                         f"row {int(np.flatnonzero(bad)[0])}); drop them or fix their "
                         "positions.")
    _, first, counts = np.unique(xy, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{int((counts > 1).sum())} positions are held by more than one spot "
                         f"(e.g. row {int(first[counts > 1][0])}); merge or drop the "
                         "duplicates, a spot's neighbours are defined by its position.")
    return xy


def _symmetric(rows: np.ndarray, cols: np.ndarray, xy: np.ndarray
               ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Connectivities (1 on each edge) and Euclidean distances of the undirected edges
    ``rows``–``cols`` (each once or twice, no loops), both ways, as CSR."""
    n = xy.shape[0]
    pairs = np.unique(np.sort(np.stack([rows, cols], 1), axis=1), axis=0).reshape(-1, 2)
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    distances = sp.csr_matrix((np.linalg.norm(xy[i] - xy[j], axis=1), (i, j)), shape=(n, n))
    connectivities = sp.csr_matrix((np.ones(i.size), (i, j)), shape=(n, n))
    return connectivities, distances


def spatial_graph(
    coordinates,
    kind: Literal["grid", "knn", "delaunay"] = "grid",
    n_neighbors: int = 6,
    tolerance: float = 0.25,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    r"""The neighbourhood graph of spots with the given coordinates.

    Parameters
    ----------
    coordinates
        ``(n_spots, 2)`` (or 3) positions, as in ``adata.obsm["spatial"]``.
    kind
        ``"grid"``: a regular lattice such as Visium's hexagonal array; a spot's neighbours
        are the spots within :math:`(1 + \text{tolerance})\,d` of it, :math:`d` the lattice
        spacing (the median distance of a spot to its nearest one): 6 inside a hexagonal
        array, 4 in a square one, fewer at the tissue's edge. ``"knn"``: each spot's
        ``n_neighbors`` nearest, the edges made undirected. ``"delaunay"``: the edges of the
        Delaunay triangulation (cell-resolved data of irregular positions).
    n_neighbors
        Neighbours per spot of ``"knn"``.
    tolerance
        Slack of ``"grid"``'s radius over the spacing, for positions measured with noise.

    Returns
    -------
    ``(connectivities, distances)``: symmetric ``(n_spots, n_spots)`` CSR matrices, 1 on each
    edge and the Euclidean length of each edge, as squidpy stores them.
    """
    xy = _check_coordinates(coordinates)
    if kind not in SPATIAL_GRAPHS:
        raise ValueError(f"kind must be one of {SPATIAL_GRAPHS}, got {kind!r}.")
    tree = cKDTree(xy)
    if kind == "grid":
        if not 0.0 <= tolerance < 0.5:
            raise ValueError(f"tolerance must be in [0, 0.5) (beyond, the next ring of the "
                             f"lattice joins), got {tolerance!r}.")
        spacing = lattice_spacing(xy)
        pairs = tree.query_pairs((1.0 + tolerance) * spacing, output_type="ndarray")
        return _symmetric(pairs[:, 0], pairs[:, 1], xy)
    if kind == "knn":
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) \
                or not 1 <= n_neighbors < xy.shape[0]:
            raise ValueError(f"n_neighbors must be an integer in [1, {xy.shape[0] - 1}], got "
                             f"{n_neighbors!r}.")
        _, index = tree.query(xy, k=int(n_neighbors) + 1)
        rows = np.repeat(np.arange(xy.shape[0]), n_neighbors)
        return _symmetric(rows, index[:, 1:].ravel(), xy)
    try:
        triangles = Delaunay(xy).simplices
    except QhullError as error:
        raise ValueError("The Delaunay triangulation failed: the spots are too few or lie on "
                         "one line; use kind='knn'.") from error
    edges = np.concatenate([triangles[:, [a, b]] for a in range(triangles.shape[1])
                            for b in range(a + 1, triangles.shape[1])])
    return _symmetric(edges[:, 0], edges[:, 1], xy)


def join_isolated(connectivities: sp.spmatrix, coordinates) -> tuple[sp.csr_matrix, int]:
    """``connectivities`` with each spot that has no neighbour joined (weight 1, both ways)
    to its nearest spot, and how many spots were joined.

    A spot alone in the graph has no neighbourhood for the encoder to read and is a
    component of its own in the Laplacian; its nearest spot is the tissue it most likely
    belongs to."""
    graph = sp.csr_matrix(connectivities, dtype=np.float64)
    xy = np.asarray(coordinates, dtype=np.float64)
    alone = np.flatnonzero(np.diff(graph.indptr) == 0)
    if alone.size == 0:
        return graph, 0
    _, nearest = cKDTree(xy).query(xy[alone], k=2)
    edges = sp.csr_matrix((np.ones(alone.size), (alone, nearest[:, 1])), shape=graph.shape)
    joined = graph.maximum(edges).maximum(edges.T).tocsr()
    joined.sort_indices()
    return joined, int(alone.size)


def extend_encoding(coordinates, encoding: np.ndarray, new_coordinates,
                    n_neighbors: int = 6) -> tuple[np.ndarray, np.ndarray]:
    r"""A per-spot encoding (e.g. Laplacian positional encodings) at new positions of the
    same tissue: :math:`\hat e(p) = \sum_j w_j e_j / \sum_j w_j` over the ``n_neighbors``
    spots nearest to :math:`p`, :math:`w_j = 1 / d(p, p_j)`; a position held by a spot
    gets that spot's encoding exactly.

    The low eigenvectors of a graph Laplacian vary slowly between neighbours (each is close
    to the mean of its neighbours' values), so that averaging the nearest spots is the
    harmonic extension of the encoding to a spot that was not in the graph.

    Returns
    -------
    ``(new_encoding, distance, nearest)``: ``(n_new, d)`` float32 encodings, each new
    position's distance to its nearest spot (``0`` where it holds one) and that spot's
    index.
    """
    xy = np.asarray(coordinates, dtype=np.float64)
    new = np.asarray(new_coordinates, dtype=np.float64)
    if new.ndim != 2 or new.shape[1] != xy.shape[1] or not np.isfinite(new).all():
        raise ValueError(f"The new positions must be a finite (n_spots, {xy.shape[1]}) array "
                         f"in the training coordinates' frame, got shape {new.shape}.")
    k = int(min(n_neighbors, xy.shape[0]))
    distance, index = cKDTree(xy).query(new, k=k)
    distance, index = distance.reshape(new.shape[0], k), index.reshape(new.shape[0], k)
    exact = distance[:, 0] <= 1e-9 * max(1.0, float(np.abs(xy).max()))
    weight = 1.0 / np.maximum(distance, 1e-12)
    weight[exact] = 0.0
    weight[exact, 0] = 1.0
    values = np.asarray(encoding, dtype=np.float64)[index]  # (n_new, k, d)
    out = (weight[:, :, None] * values).sum(1) / weight.sum(1, keepdims=True)
    return out.astype(np.float32), np.where(exact, 0.0, distance[:, 0]), index[:, 0]


def lattice_spacing(coordinates) -> float:
    """The median distance of a spot to its nearest one: a grid's spacing."""
    xy = np.asarray(coordinates, dtype=np.float64)
    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
