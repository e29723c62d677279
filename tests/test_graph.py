"""k-NN graph, Laplacian positional encodings, power iteration, perturbation, subgraphs."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import eigsh
from torch_geometric.nn import ChebConv

from scldiff.graph import (
    SubgraphSampler,
    knn_graph,
    laplacian_positional_encoding,
    normalized_laplacian,
    pca_embedding,
    perturb_edge_weights,
    principal_eigenvector,
    random_direction,
    spectral_direction,
)
from scldiff.module import FullGraphChebConv


def blobs(n=300, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=6.0, size=(3, dim))
    return (centers[rng.integers(0, 3, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def edge_list(graph):
    coo = sp.coo_matrix(graph)
    return (torch.from_numpy(np.stack([coo.col, coo.row]).astype(np.int64)),
            torch.from_numpy(coo.data.astype(np.float64)))


@pytest.mark.parametrize("method", ["exact", "pynndescent"])
def test_knn_graph_is_symmetric_weighted_and_finds_the_true_neighbours(method):
    x = blobs()
    k = 10
    graph = knn_graph(x, n_neighbors=k, method=method)
    assert graph.shape == (300, 300)
    assert abs(graph - graph.T).max() == 0
    assert graph.diagonal().max() == 0
    assert graph.data.min() > 0 and graph.data.max() <= 1
    assert (np.diff(graph.indptr) >= k).all()  # union of the two directions
    # exact neighbours by brute force: pynndescent should recover nearly all of them
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    exact = np.argsort(d, axis=1)[:, :k]
    recall = np.mean([np.isin(exact[i], graph[i].indices).mean() for i in range(300)])
    assert recall > 0.99 if method == "pynndescent" else recall == 1.0
    # self-tuning weights: w_ij = exp(-d^2 / (s_i s_j)), s = distance to the k-th neighbour
    sigma = np.sqrt(np.sort(d, axis=1)[:, k - 1])
    i, j = 5, graph[5].indices[0]
    assert graph[i, j] == pytest.approx(np.exp(-d[i, j] / (sigma[i] * sigma[j])), rel=1e-4)


def test_knn_graph_refuses_too_few_cells():
    with pytest.raises(ValueError, match="more than 15 cells"):
        knn_graph(blobs(n=10), n_neighbors=15)


def test_pca_embedding_shape_and_determinism():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(200, 300)).astype(np.float32))
    a = pca_embedding(counts, n_pcs=20, n_top_genes=100, random_state=0)
    b = pca_embedding(counts, n_pcs=20, n_top_genes=100, random_state=0)
    assert a.shape == (200, 20)
    np.testing.assert_allclose(a, b)


@pytest.mark.parametrize("shape", [(5, 1), (2, 1)])  # found by the property-based test
def test_pca_embedding_of_a_single_gene_is_the_centred_data(shape):
    counts = sp.csr_matrix(np.arange(1, shape[0] * shape[1] + 1, dtype=np.float32)
                           .reshape(shape))
    embedding = pca_embedding(counts, n_pcs=50)
    assert embedding.shape == shape
    np.testing.assert_allclose(embedding.mean(0), 0.0, atol=1e-6)
    lognorm = np.log1p(counts.toarray() / counts.toarray().sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(embedding, lognorm - lognorm.mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [300, 900])  # dense eigendecomposition and ARPACK paths
def test_lpe_are_orthonormal_laplacian_eigenvectors(n):
    graph = knn_graph(blobs(n=n, seed=1), n_neighbors=10)
    lpe, values = laplacian_positional_encoding(graph, n_lpe=8)
    assert lpe.shape == (n, 8)
    np.testing.assert_allclose(lpe.T @ lpe, np.eye(8), atol=1e-5)
    lap = normalized_laplacian(graph)
    residual = lap @ lpe - lpe * values[None, :]
    assert np.abs(residual).max() < 1e-4
    assert np.all(np.diff(values) >= -1e-6) and values[0] > 1e-8  # trivial vector dropped
    dense = np.linalg.eigvalsh(lap.toarray())
    n_comp = int((dense < 1e-8).sum())
    np.testing.assert_allclose(values, dense[n_comp : n_comp + 8], atol=1e-5)
    # deterministic sign: the largest entry of each vector is positive
    assert (lpe[np.abs(lpe).argmax(0), np.arange(8)] > 0).all()


def test_lpe_of_a_disconnected_graph_drops_one_trivial_vector_per_component():
    a = knn_graph(blobs(n=100, seed=2), n_neighbors=5)
    graph = sp.block_diag([a, a]).tocsr()
    lpe, values = laplacian_positional_encoding(graph, n_lpe=4)
    assert values.min() > 1e-8
    np.testing.assert_allclose(lpe.T @ lpe, np.eye(4), atol=1e-5)


def test_lpe_refuses_too_many_encodings():
    graph = knn_graph(blobs(n=30), n_neighbors=5)
    with pytest.raises(ValueError, match="smaller n_lpe"):
        laplacian_positional_encoding(graph, n_lpe=40)


def test_power_iteration_matches_scipy_principal_eigenvector():
    graph = knn_graph(blobs(n=200, seed=3), n_neighbors=8)
    edge_index, weight = edge_list(graph)
    v = principal_eigenvector(edge_index, weight, 200, n_iter=3000).numpy()
    _, ref = eigsh(graph.astype(np.float64), k=1, which="LA")
    assert abs(v @ ref[:, 0]) > 1 - 1e-6
    assert v.sum() > 0 and np.linalg.norm(v) == pytest.approx(1.0)


def test_power_iteration_does_not_oscillate_on_a_bipartite_graph():
    # A path graph is bipartite: +lambda and -lambda have equal magnitude. Plain power
    # iteration on W would oscillate; the shifted iteration converges to the Perron vector.
    n = 6
    path = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1]).tocsr()
    edge_index, weight = edge_list(path)
    v = principal_eigenvector(edge_index, weight, n, n_iter=2000).numpy()
    values, vectors = np.linalg.eigh(path.toarray())
    assert abs(v @ vectors[:, -1]) > 1 - 1e-8


def test_spectral_direction_is_unit_symmetric_and_on_edges_only():
    graph = knn_graph(blobs(n=100, seed=4), n_neighbors=6)
    edge_index, weight = edge_list(graph)
    v = principal_eigenvector(edge_index, weight, 100, n_iter=5)
    d = spectral_direction(edge_index, v)
    assert d.shape == weight.shape and d.norm().item() == pytest.approx(1.0)
    np.testing.assert_allclose(d.numpy(), (v[edge_index[0]] * v[edge_index[1]] / (
        v[edge_index[0]] * v[edge_index[1]]).norm()).numpy())
    as_matrix = sp.coo_matrix((d.numpy(), (edge_index[1].numpy(), edge_index[0].numpy())),
                              shape=(100, 100)).tocsr()
    assert abs(as_matrix - as_matrix.T).max() < 1e-12
    r = random_direction(edge_index, 100, torch.Generator().manual_seed(0))
    r_matrix = sp.coo_matrix((r.numpy(), (edge_index[1].numpy(), edge_index[0].numpy())),
                             shape=(100, 100)).tocsr()
    assert r.norm().item() == pytest.approx(1.0) and abs(r_matrix - r_matrix.T).max() < 1e-7


@pytest.mark.parametrize("eps,sign", [(0.01, 1.0), (0.05, -1.0), (0.2, 1.0)])
def test_perturbation_has_exactly_the_requested_radius(eps, sign):
    graph = knn_graph(blobs(n=150, seed=5), n_neighbors=8)
    edge_index, weight = edge_list(graph)
    d = spectral_direction(edge_index, principal_eigenvector(edge_index, weight, 150, 3))
    new, change = perturb_edge_weights(weight, d, eps, sign)
    delta = new - weight
    assert delta.norm().item() == pytest.approx(eps * weight.norm().item(), rel=1e-9)
    assert change.item() == pytest.approx(eps, rel=1e-9)
    assert torch.sign(delta).unique().tolist() == [sign]  # v1 v1^T > 0 on every edge
    assert (new > 0).all()


def test_perturbation_keeps_weights_positive_and_reports_the_applied_radius():
    weight = torch.tensor([1.0, 1.0, 0.01, 0.01], dtype=torch.float64)
    d = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64) / np.sqrt(2)
    new, change = perturb_edge_weights(weight, d, epsilon=0.5, sign=-1.0)
    assert (new > 0).all()
    assert new[2].item() == pytest.approx(1e-5)
    assert change.item() == pytest.approx((new - weight).norm().item() / weight.norm().item())
    assert change.item() < 0.5


def test_subgraph_keeps_full_degrees_and_puts_seeds_first():
    graph = knn_graph(blobs(n=200, seed=6), n_neighbors=8)
    degree = np.asarray(graph.sum(1)).ravel()
    seeds = np.array([17, 3, 150])
    for hops in (1, 2):
        sub = SubgraphSampler(graph, n_hops=hops)(seeds)
        np.testing.assert_array_equal(sub.nodes[:3], seeds)
        assert len(np.unique(sub.nodes)) == len(sub.nodes)
        inside = np.zeros(len(sub.nodes))
        np.add.at(inside, sub.edge_index[1], sub.edge_weight)
        np.testing.assert_allclose(inside + sub.degree_outside, degree[sub.nodes], rtol=1e-5)
        # the edges are exactly the induced subgraph, in both directions, with its weights
        induced = graph[sub.nodes][:, sub.nodes].toarray()
        built = sp.coo_matrix((sub.edge_weight, (sub.edge_index[1], sub.edge_index[0])),
                              shape=induced.shape).toarray()
        assert np.count_nonzero(induced) == sub.edge_index.shape[1]
        np.testing.assert_allclose(built, induced, rtol=1e-6)
        # every neighbour of a seed is in a 1-hop subgraph; a 2-hop one is the closure
        for s in seeds:
            assert np.isin(graph[s].indices, sub.nodes).all()
        reach = sp.csr_matrix((np.ones(3), (np.zeros(3), seeds)), shape=(1, 200))
        for _ in range(hops):
            reach = reach + reach @ graph
        assert set(sub.nodes) == set(reach.indices)
    # the sampler reuses one cell-to-node map: it must leave no trace between calls, and a
    # repeated seed keeps its place
    sampler = SubgraphSampler(graph, n_hops=1)
    first = sampler(seeds)
    again = sampler(np.array([17, 17, 3]))
    np.testing.assert_array_equal(again.nodes[:3], [17, 17, 3])
    assert (sampler._local == -1).all()
    np.testing.assert_array_equal(sampler(seeds).edge_index, first.edge_index)


def _reference_subgraph(graph: sp.csr_matrix, seeds: np.ndarray, hops: int):
    """The documented subgraph, written plainly: the seeds as given, then each hop's newly
    reached cells in ascending order; for each node in that order, each edge from a
    neighbour inside (in column order), with the first position of a repeated seed."""
    nodes = list(seeds)
    position = {}
    for i, s in enumerate(seeds):
        position.setdefault(int(s), i)
    frontier = list(seeds)
    for _ in range(hops):
        new = sorted({int(c) for v in frontier for c in graph[v].indices} - set(position))
        if not new:
            break
        for c in new:
            position[c] = len(nodes)
            nodes.append(c)
        frontier = new
    src, dst, weight, outside = [], [], [], []
    for p, v in enumerate(nodes):
        row = graph[v]
        inside = 0.0
        for c, w in zip(row.indices, row.data, strict=True):
            if int(c) in position:
                src.append(position[int(c)])
                dst.append(p)
                weight.append(w)
                inside += float(w)
        outside.append(max(float(row.data.astype(np.float64).sum()) - inside, 0.0))
    return (np.array(nodes, dtype=np.int64), np.array([src, dst], dtype=np.int64).reshape(2, -1),
            np.array(weight, dtype=np.float32), np.array(outside))


@pytest.mark.parametrize("hops", [0, 1, 2, 3])
def test_subgraph_equals_a_plain_reference_on_random_graphs(hops):
    rng = np.random.default_rng(hops)
    for trial in range(40):
        n, k = int(rng.integers(1, 120)), int(rng.integers(0, 6))
        rows, cols = np.repeat(np.arange(n), k), rng.integers(0, n, n * k)
        graph = sp.csr_matrix((rng.random(n * k).astype(np.float32) + 0.01, (rows, cols)),
                              shape=(n, n))
        graph = graph.maximum(graph.T).tocsr()
        graph.sort_indices()
        sampler = SubgraphSampler(graph, n_hops=hops)
        for _ in range(3):
            m = int(rng.integers(0, min(n, 20) + 1))
            seeds = (rng.integers(0, n, m) if trial % 2  # with repeated seeds
                     else rng.choice(n, m, replace=False))
            sub = sampler(seeds)
            nodes, edge_index, weight, outside = _reference_subgraph(graph, seeds, hops)
            np.testing.assert_array_equal(sub.nodes, nodes)
            np.testing.assert_array_equal(sub.edge_index, edge_index)
            np.testing.assert_array_equal(sub.edge_weight, weight)
            # the degrees are float32 row sums: exact up to their rounding
            np.testing.assert_allclose(sub.degree_outside, outside, rtol=1e-5, atol=1e-5)
            assert sub.nodes.dtype == sub.edge_index.dtype == np.int64
            assert sub.edge_weight.dtype == sub.degree_outside.dtype == np.float32
            assert (sampler._local == -1).all()
    # the compiled loop does not check its indices: the sampler refuses foreign cells
    for bad in ([n], [-1], [0, n + 5]):
        with pytest.raises(IndexError, match="seed cells must lie in"):
            sampler(np.array(bad))
    assert (sampler._local == -1).all()


@pytest.mark.parametrize("cheb_k,hops", [(2, 1), (3, 2)])
def test_chebconv_on_a_subgraph_equals_the_full_graph_for_seed_cells(cheb_k, hops):
    torch.manual_seed(0)
    graph = knn_graph(blobs(n=250, seed=7), n_neighbors=8)
    x = torch.randn(250, 6)
    conv = FullGraphChebConv(6, 4, K=cheb_k)
    # on the full graph it is PyG's ChebConv with the symmetric normalisation
    reference = ChebConv(6, 4, K=cheb_k, normalization="sym")
    reference.load_state_dict(conv.state_dict())
    edge_index, weight = edge_list(graph)
    full = conv(x, edge_index, weight.float(), torch.zeros(250))
    torch.testing.assert_close(full, reference(x, edge_index, weight.float(), lambda_max=2.0),
                               atol=1e-5, rtol=1e-5)
    seeds = np.array([0, 100, 249, 42])
    sub = SubgraphSampler(graph, n_hops=hops)(seeds)
    out = conv(x[sub.nodes], torch.from_numpy(sub.edge_index), torch.from_numpy(sub.edge_weight),
               torch.from_numpy(sub.degree_outside))
    torch.testing.assert_close(out[:4], full[seeds], atol=1e-5, rtol=1e-5)
    # the seeds' outputs alone (n_out): the same values, and the same gradients with
    # respect to every edge weight (the perturbation's direction depends on them)
    weight = torch.from_numpy(sub.edge_weight).requires_grad_()
    args = (x[sub.nodes], torch.from_numpy(sub.edge_index), weight,
            torch.from_numpy(sub.degree_outside))
    seeds_only = conv(*args, n_out=4)
    assert seeds_only.shape == (4, 4)
    torch.testing.assert_close(seeds_only, full[seeds], atol=1e-5, rtol=1e-5)
    (grad_seeds,) = torch.autograd.grad(seeds_only.square().sum(), weight)
    (grad_all,) = torch.autograd.grad(conv(*args)[:4].square().sum(), weight)
    torch.testing.assert_close(grad_seeds, grad_all, atol=1e-6, rtol=1e-5)
    assert grad_all.abs().sum() > 0
    # without the outside degrees the border cells would be normalised wrongly
    wrong = conv(x[sub.nodes], torch.from_numpy(sub.edge_index),
                 torch.from_numpy(sub.edge_weight), torch.zeros(len(sub.nodes)))
    assert (wrong[:4] - full[seeds]).abs().max() > 1e-3
