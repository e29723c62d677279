"""Cell graph (from expression, or from a tissue's coordinates) and the embeddings it is built
from (PCA of expression, LSI of chromatin accessibility), Laplacian positional encodings,
spectral perturbation, subgraph batching."""

from ._knn import knn_graph, log_normalize, nearest_neighbors, pca_embedding
from ._laplacian import laplacian_positional_encoding, normalized_adjacency, normalized_laplacian
from ._lsi import LSI, binarize_peaks
from ._spatial import (
    SPATIAL_GRAPHS,
    extend_encoding,
    join_isolated,
    lattice_spacing,
    spatial_graph,
)
from ._spectral import (
    perturb_edge_weights,
    principal_eigenvector,
    random_direction,
    spectral_direction,
)
from ._subgraph import Subgraph, SubgraphSampler

__all__ = [
    "LSI",
    "SPATIAL_GRAPHS",
    "Subgraph",
    "SubgraphSampler",
    "binarize_peaks",
    "extend_encoding",
    "join_isolated",
    "knn_graph",
    "lattice_spacing",
    "laplacian_positional_encoding",
    "log_normalize",
    "nearest_neighbors",
    "normalized_adjacency",
    "normalized_laplacian",
    "pca_embedding",
    "perturb_edge_weights",
    "principal_eigenvector",
    "random_direction",
    "spatial_graph",
    "spectral_direction",
]
