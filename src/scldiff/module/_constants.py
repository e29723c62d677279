"""Keys of the tensors a minibatch hands the module (no magic strings elsewhere)."""

from __future__ import annotations

from typing import NamedTuple


class _BATCH_KEYS_NT(NamedTuple):
    """Tensors of one stage-A minibatch: a subgraph of seed cells and their neighbours.

    The seed cells come first among the nodes, so their counts share the first rows of the
    CSR structure ``NODE_CROW``/``NODE_COL`` (log-normalisation keeps the zeros).
    """

    # (n_seed, n_attributes) float: the seed cells' categorical codes, then their
    # standardised continuous covariates
    ATTRIBUTES: str = "attributes"
    NODE_CROW: str = "node_crow"  # (n_node + 1,) CSR row pointer of the nodes' expression
    NODE_COL: str = "node_col"  # (nnz,) gene index of each stored value
    NODE_INPUT: str = "node_input"  # (nnz,) log1p(1e4 * count / library): the encoder input
    SEED_COUNTS: str = "seed_counts"  # (nnz of the seed rows,) raw counts of the seed cells
    SEED_LIBRARY: str = "seed_library"  # (n_seed,) total counts of each seed cell
    LPE: str = "lpe"  # (n_node, n_lpe) Laplacian positional encodings of the nodes
    EDGE_INDEX: str = "edge_index"  # (2, n_edge) local node indices, both directions
    EDGE_WEIGHT: str = "edge_weight"  # (n_edge,) symmetric edge weights
    DEGREE_OUTSIDE: str = "degree_outside"  # (n_node,) weighted degree to cells outside
    NODES: str = "nodes"  # (n_node,) cell index of each node (encoding-only batches)


class _LATENT_KEYS_NT(NamedTuple):
    """Tensors of one stage-B minibatch (posterior parameters of training cells)."""

    QZ_MEAN: str = "qz_mean"
    QZ_LOGVAR: str = "qz_logvar"
    ATTRIBUTES: str = "attributes"  # (n, n_attributes) float, as BATCH_KEYS.ATTRIBUTES


BATCH_KEYS = _BATCH_KEYS_NT()
LATENT_KEYS = _LATENT_KEYS_NT()
