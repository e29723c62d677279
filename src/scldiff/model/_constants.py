"""Keys of what :meth:`~scldiff.LapDDPM.setup_anndata` registers and stores in an AnnData."""

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


REGISTRY_KEYS = _REGISTRY_KEYS_NT()
ADATA_KEYS = _ADATA_KEYS_NT()
