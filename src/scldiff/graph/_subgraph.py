"""Subgraph minibatches: seed cells plus their graph neighbourhood, cost O(batch * k)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit


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

    Why not torch_geometric's samplers: its ``NeighborSampler`` needs the compiled
    ``pyg-lib`` or ``torch-sparse``, which PyPI does not carry as wheels, and its pure-torch
    ``k_hop_subgraph`` marks nodes over every edge of the graph for each batch, so a batch's
    cost grows with the atlas (docs "Performance"). Neither returns ``degree_outside``.
    """

    def __init__(self, graph: sp.spmatrix, n_hops: int = 1):
        graph = sp.csr_matrix(graph, dtype=np.float32)
        graph.sort_indices()
        self.indptr = graph.indptr.astype(np.int64)
        # cell indices fit in 32 bits (as scipy stores them below 2**31 entries): half the
        # memory and the memory traffic of int64 in the random row reads of a minibatch
        self.indices = graph.indices.astype(np.int32, copy=False)
        self.data = graph.data
        self.degree = np.asarray(graph.sum(axis=1), dtype=np.float64).ravel()
        self.n_hops = n_hops

    def _local_index(self) -> np.ndarray:
        """A reusable map from cell to local node index, ``-1`` for cells outside the
        subgraph being built (O(1) membership tests instead of a search per edge)."""
        if getattr(self, "_local", None) is None:
            self._local = np.full(self.indptr.size - 1, -1, dtype=np.int32)
        return self._local

    def __call__(self, seeds: np.ndarray) -> Subgraph:
        seeds = np.ascontiguousarray(seeds, dtype=np.int64)
        n_cells = self.indptr.size - 1
        if seeds.size and (seeds.min() < 0 or seeds.max() >= n_cells):  # the loop trusts them
            raise IndexError(f"seed cells must lie in 0..{n_cells - 1}, got "
                             f"{seeds.min()}..{seeds.max()}.")
        nodes, src_local, dst_local, weights, degree_outside = _build_subgraph(
            self.indptr, self.indices, self.data, self.degree, seeds, self._local_index(),
            self.n_hops)
        return Subgraph(
            nodes=nodes,
            n_seed=seeds.size,
            edge_index=np.stack([src_local, dst_local]),
            edge_weight=weights,
            degree_outside=degree_outside,
        )


@njit(cache=True, nogil=True)
def _build_subgraph(indptr, indices, data, degree, seeds, local, n_hops):
    """The subgraph of :class:`SubgraphSampler` (compiled: one pass over the rows of its
    nodes, no temporary arrays per edge).

    ``local`` maps cells to node positions and is ``-1`` everywhere on entry and on return.
    Each hop appends the cells it reaches, in ascending order. The edges are listed node by
    node in the nodes' order, each node's in the graph's (sorted) column order: every edge
    ``(neighbour -> node)`` whose neighbour is in the subgraph, so each undirected edge
    appears in both directions. Returns the nodes, the edges' source and destination
    positions, their weights, and each node's degree towards cells outside the subgraph.
    """
    n_seed = seeds.size
    nodes = np.empty(max(64, 32 * n_seed), np.int64)
    nodes[:n_seed] = seeds
    for i in range(n_seed - 1, -1, -1):  # a repeated seed maps to its first position
        local[seeds[i]] = i
    n_nodes, frontier = n_seed, 0
    for _ in range(n_hops):
        reached = n_nodes
        for f in range(frontier, reached):
            v = nodes[f]
            for e in range(indptr[v], indptr[v + 1]):
                c = indices[e]
                if local[c] == -1:
                    local[c] = -2  # reached in this hop; its position is set below
                    if n_nodes == nodes.size:
                        grown = np.empty(2 * nodes.size, np.int64)
                        grown[:n_nodes] = nodes
                        nodes = grown
                    nodes[n_nodes] = c
                    n_nodes += 1
        if n_nodes == reached:
            break
        nodes[reached:n_nodes].sort()
        for p in range(reached, n_nodes):
            local[nodes[p]] = p
        frontier = reached
    n_edges = 0
    for p in range(n_nodes):
        n_edges += indptr[nodes[p] + 1] - indptr[nodes[p]]
    src = np.empty(n_edges, np.int64)
    dst = np.empty(n_edges, np.int64)
    weight = np.empty(n_edges, np.float32)
    outside = np.empty(n_nodes, np.float32)
    m = 0
    for p in range(n_nodes):
        v = nodes[p]
        inside = 0.0  # float64, as the degrees
        for e in range(indptr[v], indptr[v + 1]):
            q = local[indices[e]]
            if q >= 0:
                src[m] = q
                dst[m] = p
                weight[m] = data[e]
                inside += data[e]
                m += 1
        outside[p] = max(degree[v] - inside, 0.0)
    for p in range(n_nodes):
        local[nodes[p]] = -1
    return nodes[:n_nodes].copy(), src[:m], dst[:m], weight[:m], outside
