"""Subgraph minibatches: seed cells plus their graph neighbourhood, cost O(batch * k)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class Subgraph:
    """A batch-local graph. ``nodes[:n_seed]`` are the seed cells, in the order given.

    Attributes
    ----------
    nodes
        ``(n_node,)`` global cell indices.
    edge_index
        ``(2, n_edge)`` local indices; every undirected edge appears in both directions.
    edge_weight
        ``(n_edge,)`` weights of those edges in the full graph.
    degree_outside
        ``(n_node,)`` weighted degree of each node towards cells *not* in the subgraph, so
        that ``degree_outside + (edge weights inside)`` is the node's degree in the full graph.
    """

    nodes: np.ndarray
    n_seed: int
    edge_index: np.ndarray
    edge_weight: np.ndarray
    degree_outside: np.ndarray


class SubgraphSampler:
    """Build the ``n_hops``-neighbourhood subgraph of a set of seed cells.

    A Chebyshev filter of order K on one layer reads the (K-1)-hop neighbourhood, so with
    ``n_hops`` equal to the encoder's receptive field the seed cells' encodings on the
    subgraph equal their encodings on the whole graph (the degrees of the other nodes are
    completed by ``degree_outside``). Work and memory are proportional to the subgraph's
    size, independent of the number of cells in the atlas.

    Parameters
    ----------
    graph
        Symmetric ``(n_cells, n_cells)`` weight matrix.
    n_hops
        Neighbourhood depth.

    Notes
    -----
    A sampler builds one subgraph at a time (it reuses a cell-to-node map of ``n_cells``
    integers); DataLoader workers are processes, each with its own copy.
    """

    def __init__(self, graph: sp.spmatrix, n_hops: int = 1):
        graph = sp.csr_matrix(graph, dtype=np.float32)
        graph.sort_indices()
        self.indptr = graph.indptr.astype(np.int64)
        self.indices = graph.indices.astype(np.int64)
        self.data = graph.data
        self.degree = np.asarray(graph.sum(axis=1), dtype=np.float64).ravel()
        self.n_hops = n_hops

    def _neighbours(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, columns and weights of all edges leaving ``nodes``."""
        starts, ends = self.indptr[nodes], self.indptr[nodes + 1]
        counts = ends - starts
        owner = np.repeat(np.arange(nodes.size), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = np.repeat(starts, counts) + offsets
        return owner, self.indices[pos], self.data[pos]

    def _local_index(self) -> np.ndarray:
        """A reusable map from cell to local node index, ``-1`` for cells outside the
        subgraph being built (O(1) membership tests instead of a search per edge)."""
        if getattr(self, "_local", None) is None:
            self._local = np.full(self.indptr.size - 1, -1, dtype=np.int64)
        return self._local

    def __call__(self, seeds: np.ndarray) -> Subgraph:
        seeds = np.asarray(seeds, dtype=np.int64)
        local = self._local_index()
        nodes, frontier = seeds, seeds
        try:
            # a repeated seed maps to its first position (the last assignment wins)
            local[seeds[::-1]] = np.arange(seeds.size - 1, -1, -1)
            for _ in range(self.n_hops):
                _, cols, _ = self._neighbours(frontier)
                new = np.unique(cols[local[cols] < 0])
                if new.size == 0:
                    break
                nodes, frontier = np.concatenate([nodes, new]), new
                local[new] = np.arange(nodes.size - new.size, nodes.size)
            owner, cols, weights = self._neighbours(nodes)
            src = local[cols]
        finally:
            local[nodes] = -1
        inside = src >= 0
        src_local = src[inside]
        dst_local = owner[inside]
        weight_inside = np.bincount(dst_local, weights=weights[inside], minlength=nodes.size)
        degree_outside = np.maximum(self.degree[nodes] - weight_inside, 0.0)
        return Subgraph(
            nodes=nodes,
            n_seed=seeds.size,
            edge_index=np.stack([src_local, dst_local]),
            edge_weight=weights[inside].astype(np.float32),
            degree_outside=degree_outside.astype(np.float32),
        )
