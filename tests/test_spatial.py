"""The tissue's neighbourhood graph from spot coordinates, against lattices and
triangulations whose neighbours are known."""

from __future__ import annotations

import numpy as np
import pytest

from scldiff.graph import spatial_graph


def visium_lattice(n_rows: int = 8, n_cols: int = 16, spacing: float = 100.0,
                   jitter: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spot positions of a hexagonal Visium-like array (``array_row + array_col`` even,
    neighbours at (r, c ± 2) and (r ± 1, c ± 1)) and its (row, col) indices."""
    rows, cols = np.nonzero((np.add.outer(np.arange(n_rows), np.arange(n_cols)) % 2) == 0)
    xy = np.stack([cols * spacing / 2, rows * spacing * np.sqrt(3) / 2], 1)
    xy += np.random.default_rng(seed).uniform(-jitter, jitter, xy.shape) * spacing
    return xy, np.stack([rows, cols], 1)


def lattice_edges(index: np.ndarray) -> set[tuple[int, int]]:
    where = {tuple(p): k for k, p in enumerate(index.tolist())}
    edges = set()
    for k, (r, c) in enumerate(index.tolist()):
        for dr, dc in ((0, 2), (1, 1), (1, -1)):
            other = where.get((r + dr, c + dc))
            if other is not None:
                edges.add((min(k, other), max(k, other)))
    return edges


def edge_set(matrix) -> set[tuple[int, int]]:
    coo = matrix.tocoo()
    return {(int(i), int(j)) for i, j in zip(coo.row, coo.col, strict=True) if i < j}


@pytest.mark.parametrize("jitter", [0.0, 0.04])
def test_hexagonal_grid_finds_the_six_lattice_neighbours(jitter):
    xy, index = visium_lattice(jitter=jitter)
    connectivities, distances = spatial_graph(xy, kind="grid")
    assert edge_set(connectivities) == lattice_edges(index)
    degree = np.asarray(connectivities.sum(1)).ravel()
    assert degree.max() == 6 and (degree == 6).sum() > 0.5 * len(xy)
    assert (connectivities != connectivities.T).nnz == 0
    assert (distances != distances.T).nnz == 0
    coo = distances.tocoo()
    np.testing.assert_allclose(coo.data, np.linalg.norm(xy[coo.row] - xy[coo.col], axis=1))
    assert set(np.unique(connectivities.data)) == {1.0}


def test_square_grid_has_four_neighbours_inside():
    xy = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0)), -1).reshape(-1, 2)
    connectivities, _ = spatial_graph(xy, kind="grid")
    degree = np.asarray(connectivities.sum(1)).ravel().reshape(5, 6)
    assert (degree[1:-1, 1:-1] == 4).all() and degree[0, 0] == 2 and degree[0, 2] == 3


def test_knn_graph_is_symmetric_with_every_spots_nearest():
    xy = np.random.default_rng(1).normal(size=(60, 2))
    connectivities, distances = spatial_graph(xy, kind="knn", n_neighbors=4)
    assert (connectivities != connectivities.T).nnz == 0
    dense = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(dense, np.inf)
    nearest = np.argsort(dense, axis=1)[:, :4]
    assert all(connectivities[i, j] == 1 for i in range(60) for j in nearest[i])
    assert np.asarray(connectivities.sum(1)).min() >= 4 and connectivities.diagonal().sum() == 0


def test_delaunay_of_a_square_and_its_centre():
    # four corners and the centre: the 4 sides and the 4 spokes
    xy = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], dtype=float)
    connectivities, _ = spatial_graph(xy, kind="delaunay")
    assert edge_set(connectivities) == {(0, 1), (0, 2), (1, 3), (2, 3),
                                        (0, 4), (1, 4), (2, 4), (3, 4)}


BAD = {
    "NaN": (np.array([[0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]]), {}, "missing or infinite"),
    "duplicates": (np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]), {},
                   "held by more than one spot"),
    "one column": (np.arange(5.0).reshape(-1, 1), {}, r"\(n_spots, 2\)"),
    "unknown kind": (np.eye(3, 2), {"kind": "voronoi"}, "kind must be one of"),
    "too many neighbours": (np.eye(3, 2), {"kind": "knn", "n_neighbors": 3}, "n_neighbors"),
    "a line for Delaunay": (np.stack([np.arange(4.0), np.zeros(4)], 1), {"kind": "delaunay"},
                            "one line"),
    "wide tolerance": (np.eye(3, 2), {"tolerance": 0.6}, "tolerance"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_coordinates_are_refused(case):
    xy, kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        spatial_graph(xy, **kwargs)
