"""Keys shared by the model, module and training plan (no magic strings elsewhere)."""

from __future__ import annotations

from typing import NamedTuple


class _REGISTRY_KEYS_NT(NamedTuple):
    """Keys of the fields registered by :meth:`scldiff.LapDDPM.setup_anndata`."""

    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    LPE_KEY: str = "lpe"
    GRAPH_KEY: str = "graph"


class _ADATA_KEYS_NT(NamedTuple):
    """Where ``setup_anndata`` stores the cell graph in the user's AnnData."""

    GRAPH: str = "scldiff_connectivities"  # adata.obsp
    LPE: str = "X_scldiff_lpe"  # adata.obsm
    GRAPH_PARAMS: str = "scldiff_graph"  # adata.uns


class _BATCH_KEYS_NT(NamedTuple):
    """Tensors of one subgraph minibatch.

    The seed cells come first among the nodes, so their counts share the first rows of the
    CSR structure ``NODE_CROW``/``NODE_COL`` (log-normalisation keeps the zeros).
    """

    LABELS: str = "labels"  # (n_seed, 1) label codes of the seed cells
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
    # a Python int, not a tensor: the number of edges into the seed cells, which come first
    # (edges are listed by destination in node order), known on the host
    SEED_EDGES: str = "n_seed_edges"


class _LATENT_KEYS_NT(NamedTuple):
    """Tensors of one stage-B minibatch (posterior parameters of training cells)."""

    QZ_MEAN: str = "qz_mean"
    QZ_LOGVAR: str = "qz_logvar"
    LABELS: str = "labels"


REGISTRY_KEYS = _REGISTRY_KEYS_NT()
ADATA_KEYS = _ADATA_KEYS_NT()
BATCH_KEYS = _BATCH_KEYS_NT()
LATENT_KEYS = _LATENT_KEYS_NT()
