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


# ------------------------------------------------------------ islands, extension, noise
def test_join_isolated_links_a_lone_spot_to_its_nearest():
    from scldiff.graph import join_isolated

    xy, _ = visium_lattice(4, 8)
    xy = np.vstack([xy, [xy[:, 0].max() + 160.0, 0.0]])  # beyond the grid's radius
    connectivities, _ = spatial_graph(xy, kind="grid")
    lone = xy.shape[0] - 1
    assert connectivities[lone].nnz == 0
    joined, n_joined = join_isolated(connectivities, xy)
    nearest = int(np.argmin(np.linalg.norm(xy[:-1] - xy[lone], axis=1)))
    assert n_joined == 1
    assert joined[lone].indices.tolist() == [nearest] and joined[nearest, lone] == 1
    assert (joined != joined.T).nnz == 0
    assert (joined - connectivities).nnz == 2  # nothing else changed


def test_extend_encoding_is_exact_on_spots_and_averages_between_them():
    from scldiff.graph import extend_encoding

    xy = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    encoding = np.array([[1.0, -1.0], [3.0, 1.0], [50.0, 7.0]])
    new = np.array([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    out, distance, nearest = extend_encoding(xy, encoding, new, n_neighbors=2)
    np.testing.assert_allclose(out[0], encoding[1])  # a spot's own position
    np.testing.assert_allclose(out[1], encoding[:2].mean(0))  # halfway: equal weights
    # 1/d weights 1/0.5 and 1/1.5: (2 * e0 + 2/3 * e1) / (8/3)
    np.testing.assert_allclose(out[2], (2 * encoding[0] + 2 / 3 * encoding[1]) / (8 / 3),
                               rtol=1e-6)
    np.testing.assert_allclose(distance, [0.0, 1.0, 0.5])
    assert nearest[[0, 2]].tolist() == [1, 0]  # (the midpoint is a tie)
    with pytest.raises(ValueError, match="finite"):
        extend_encoding(xy, encoding, np.array([[np.nan, 0.0]]))


def test_smoothing_operator_rows_have_unit_norm_and_follow_the_walk():
    import scipy.sparse as sp

    from scldiff.diffusion import smoothing_operator

    path = sp.diags([np.ones(4), np.ones(4)], [-1, 1], shape=(5, 5)).tocsr()  # 0-1-2-3-4
    m = smoothing_operator(path, hops=1).toarray()
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0)
    # one lazy step from an end spot: 1/2 itself, 1/2 its neighbour, then unit norm
    np.testing.assert_allclose(m[0], [1 / np.sqrt(2), 1 / np.sqrt(2), 0, 0, 0])
    np.testing.assert_allclose(m[2], [0, 1, 1, 1, 0] / np.sqrt(3))
    with pytest.raises(ValueError, match="hops"):
        smoothing_operator(path, hops=0)


def test_coupled_noise_has_unit_marginals_and_the_stated_correlation():
    import scipy.sparse as sp
    import torch

    from scldiff.diffusion import coupled_noise, smoothing_operator

    path = sp.diags([np.ones(5), np.ones(5)], [-1, 1], shape=(6, 6)).tocsr()
    rho = 0.8
    z = coupled_noise(path, 100_000, rho, generator=torch.Generator().manual_seed(0)).numpy()
    m = smoothing_operator(path).toarray()
    expected = (1 - rho) * np.eye(6) + rho * m @ m.T  # unit diagonal by construction
    np.testing.assert_allclose(np.diag(expected), 1.0)
    np.testing.assert_allclose(np.cov(z), expected, atol=0.02)
    # no coupling: exactly the independent draws of the same generator
    independent = coupled_noise(path, 3, 0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(independent, torch.randn(6, 3, generator=torch.Generator(
    ).manual_seed(1)))
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="coupling"):
            coupled_noise(path, 3, bad)


# ------------------------------------------------------------------ spatial metrics
def test_morans_i_matches_the_formula_by_hand():
    import scipy.sparse as sp

    from scldiff.metrics import morans_i

    rng = np.random.default_rng(0)
    counts = rng.poisson(5.0, size=(12, 4)).astype(float)
    counts[:, 2] = 0.0  # a gene without counts: constant, NaN
    graph = sp.random(12, 12, density=0.3, random_state=1, format="csr")
    graph = graph + graph.T
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    w = graph.toarray()
    expected = []
    for g in range(4):
        d = x[:, g] - x[:, g].mean()
        expected.append(12 / w.sum() * d @ w @ d / (d @ d) if (d != 0).any() else np.nan)
    np.testing.assert_allclose(morans_i(counts, graph), expected, rtol=1e-5)


def test_moran_agreement_ranks_genes_by_the_real_section():
    from scldiff.metrics import moran_agreement

    xy, _ = visium_lattice(10, 20)
    graph, _ = spatial_graph(xy)
    rng = np.random.default_rng(0)
    smooth = 5.0 * np.exp(np.sin(xy[:, :1] / 200.0 * np.arange(1, 4)))  # 3 patterned genes
    real = rng.poisson(np.hstack([smooth, np.full((xy.shape[0], 3), 5.0)]))
    same = moran_agreement(real, real, graph, n_genes=3)
    assert same["Moran's I correlation"] == pytest.approx(1.0)
    assert same["Moran's I MAD"] == 0.0 and same["Moran's I (real)"] > 0.3
    shuffled = moran_agreement(real, real[rng.permutation(xy.shape[0])], graph, n_genes=3)
    assert abs(shuffled["Moran's I (generated)"]) < 0.1  # no structure left
    assert shuffled["Moran's I MAD"] > 0.8 * same["Moran's I (real)"]


def test_domain_ari_is_one_for_separated_domains():
    from scldiff.metrics import domain_ari

    rng = np.random.default_rng(0)
    domains = np.repeat(["a", "b", "c"], 30).astype(object)
    means = np.array([[50, 1, 1], [1, 50, 1], [1, 1, 50]], float)[np.repeat([0, 1, 2], 30)]
    counts = rng.poisson(np.hstack([means, np.full((90, 5), 10.0)]))
    domains[0] = np.nan  # left out
    assert domain_ari(counts, domains) == pytest.approx(1.0)


def test_graph_fourier_spectrum_of_an_eigenvector_and_the_mismatch():
    import scipy.sparse as sp

    from scldiff.graph import laplacian_positional_encoding
    from scldiff.metrics import graph_fourier_spectrum, spectral_mismatch

    xy, _ = visium_lattice(8, 16)
    graph, _ = spatial_graph(xy)
    modes, _ = laplacian_positional_encoding(graph, n_lpe=5)
    # counts whose log-normalised expression is an eigenvector (plus a constant): a second
    # gene takes the rest of each spot's library so that the normalisation is the identity
    target = np.log1p(1.0) + 0.1 * modes[:, 2].astype(np.float64)
    gene = np.expm1(target)
    counts = sp.csr_matrix(np.stack([gene, 1e4 - gene], 1))
    spectrum = graph_fourier_spectrum(counts, graph, n_modes=10, genes=[0])
    assert spectrum.sum() == pytest.approx(1.0)
    # mode 0 is the trivial one, the eigenvector is mode 3 (up to the centring's leakage)
    assert spectrum[3] > 0.99
    assert spectral_mismatch(counts, counts, graph, n_modes=10, genes=[0]) == 0.0
    other = np.expm1(np.log1p(1.0) + 0.1 * modes[:, 4].astype(np.float64))
    flipped = sp.csr_matrix(np.stack([other, 1e4 - other], 1))
    assert spectral_mismatch(counts, flipped, graph, n_modes=10, genes=[0]) > 0.98
