"""What :meth:`~scldiff.LapDDPM.setup_anndata` writes into the AnnData: the cell graph and its
Laplacian positional encodings, built once and reused while their parameters match."""

from __future__ import annotations

import logging
import warnings

import numpy as np
from anndata import AnnData
from scvi import settings

from ..graph import knn_graph, laplacian_positional_encoding, pca_embedding
from ..graph._matrix import is_in_memory
from ._constants import ADATA_KEYS

logger = logging.getLogger(__name__)

_GRAPH_VERSION = 1


def graph_params(layer: str | None, n_obs: int, n_neighbors: int, n_pcs: int, n_lpe: int
                 ) -> dict:
    """What the stored graph was built from, recorded in ``adata.uns``."""
    return {"version": _GRAPH_VERSION, "source": "X" if layer is None else f"layers/{layer}",
            "n_obs": n_obs, "n_neighbors": n_neighbors, "n_pcs": n_pcs, "n_lpe": n_lpe}


def ensure_graph(adata: AnnData, layer: str | None, n_neighbors: int, n_pcs: int,
                 n_lpe: int) -> None:
    """Build the k-NN graph and LPE in ``adata`` unless a matching one is already there:
    ``obsp["scldiff_connectivities"]``, ``obsm["X_scldiff_lpe"]`` and their parameters in
    ``uns["scldiff_graph"]``."""
    params = graph_params(layer, adata.n_obs, n_neighbors, n_pcs, n_lpe)
    stored = adata.uns.get(ADATA_KEYS.GRAPH_PARAMS)
    if (
        isinstance(stored, dict)
        and {k: (v.item() if isinstance(v, np.generic) else v) for k, v in stored.items()}
        == params
        and ADATA_KEYS.GRAPH in adata.obsp
        and ADATA_KEYS.LPE in adata.obsm
        and adata.obsm[ADATA_KEYS.LPE].shape == (adata.n_obs, n_lpe)
    ):
        logger.info("Reusing the cell graph stored in the AnnData.")
        return
    counts = adata.X if layer is None else adata.layers[layer]  # may be backed: read in blocks
    seed = settings.seed if settings.seed is not None else 0
    embedding = pca_embedding(counts, n_pcs=n_pcs, random_state=seed)
    graph = knn_graph(embedding, n_neighbors=n_neighbors, random_state=seed)
    if n_lpe > 0:
        lpe, _ = laplacian_positional_encoding(graph, n_lpe=n_lpe, random_state=seed)
    else:
        lpe = np.zeros((adata.n_obs, 0), dtype=np.float32)
    adata.obsp[ADATA_KEYS.GRAPH] = graph
    adata.obsm[ADATA_KEYS.LPE] = lpe
    adata.uns[ADATA_KEYS.GRAPH_PARAMS] = params


def warn_backed_csc(adata: AnnData, layer: str | None) -> None:
    """Warn where the counts are a backed CSC matrix, whose rows are slow to read."""
    matrix = adata.X if layer is None else adata.layers[layer]
    if not is_in_memory(matrix) and getattr(matrix, "format", None) == "csc":
        warnings.warn(
            "The counts are a backed CSC matrix: every block of rows that setup and training "
            "read touches all of its columns, which is slow on a large file. Store them as "
            "CSR (adata.X = adata.X.tocsr() before write_h5ad) to read rows directly.",
            UserWarning, stacklevel=3)
