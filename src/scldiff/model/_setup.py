"""What :meth:`~scldiff.LapDDPM.setup_anndata` writes into the AnnData: the cell graph, its
Laplacian positional encodings and (``cluster_labels=True``) its clusters, built once and
reused while their parameters match."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scvi import settings

from ..graph import (
    join_isolated,
    knn_graph,
    laplacian_positional_encoding,
    pca_embedding,
    spatial_graph,
)
from ..graph._matrix import is_in_memory
from ._constants import ADATA_KEYS

logger = logging.getLogger(__name__)

_GRAPH_VERSION = 3


def graph_params(layer: str | None, n_obs: int, n_neighbors: int, n_pcs: int, n_lpe: int,
                 spatial: dict | None = None, multiome: dict | None = None) -> dict:
    """What the stored graph was built from, recorded in ``adata.uns``; ``spatial``: the
    spatial graph's settings (:func:`spatial_settings`), ``multiome``: the paired
    modalities' (:func:`multiome_settings`), ``{}`` without."""
    return {"version": _GRAPH_VERSION, "source": "X" if layer is None else f"layers/{layer}",
            "n_obs": n_obs, "n_neighbors": n_neighbors, "n_pcs": n_pcs, "n_lpe": n_lpe,
            "spatial": dict(spatial or {}), "multiome": dict(multiome or {})}


def multiome_settings(modality_key: str | None, n_genes: int, graph_modality: str,
                      lsi_components: int) -> dict:
    """The paired modalities' settings as ``uns["scldiff_graph"]["multiome"]`` records them:
    the modality column, the number of genes (the features before the peaks), which
    modality the graph comes from and the LSI's width."""
    if modality_key is None:
        return {}
    return {"key": modality_key, "n_genes": int(n_genes), "graph": graph_modality,
            "lsi_components": int(lsi_components)}


def ensure_lsi(adata: AnnData, layer: str | None, multiome: dict) -> None:
    """Fit the LSI of the peaks (:class:`~scldiff.graph.LSI`: binarised, TF-IDF, truncated
    SVD without its first component) unless a matching fit is stored: the cells' embedding
    in ``obsm["X_scldiff_lsi"]``, and in ``uns["scldiff_lsi"]`` the fit (``idf``,
    ``components``, ``scale_factor``), the embedding's per-dimension ``mean`` and ``std``
    (the diffusion reads it standardised) and what it was fitted on (``params``)."""
    from ..graph import LSI

    matrix = adata.X if layer is None else adata.layers[layer]
    params = {"source": "X" if layer is None else f"layers/{layer}", "n_obs": adata.n_obs,
              "n_genes": multiome["n_genes"], "n_components": multiome["lsi_components"]}
    stored = adata.uns.get(ADATA_KEYS.LSI_FIT)
    if isinstance(stored, dict) and isinstance(stored.get("params"), dict) \
            and _plain(stored["params"]) == params and ADATA_KEYS.LSI in adata.obsm:
        logger.info("Reusing the LSI stored in the AnnData.")
        return
    seed = settings.seed if settings.seed is not None else 0
    peaks = matrix[:, multiome["n_genes"]:]
    lsi = LSI.fit(peaks, n_components=multiome["lsi_components"], random_state=seed)
    embedding = lsi.transform(peaks)
    std = embedding.std(0, dtype=np.float64)
    adata.obsm[ADATA_KEYS.LSI] = embedding
    adata.uns[ADATA_KEYS.LSI_FIT] = {
        "idf": lsi.idf, "components": lsi.components, "scale_factor": lsi.scale_factor,
        "mean": embedding.mean(0, dtype=np.float64), "std": np.where(std > 0, std, 1.0),
        "params": params}


def spatial_settings(spatial_key: str | None, kind: str, n_neighbors: int,
                     expression_edges: bool) -> dict:
    """The spatial graph's settings as ``uns["scldiff_graph"]["spatial"]`` records them."""
    if spatial_key is None:
        return {}
    return {"key": spatial_key, "graph": kind, "n_neighbors": int(n_neighbors),
            "expression_edges": bool(expression_edges)}


def ensure_graph(adata: AnnData, layer: str | None, n_neighbors: int, n_pcs: int,
                 n_lpe: int, spatial: dict | None = None, multiome: dict | None = None
                 ) -> None:
    """Build the cell graph and LPE in ``adata`` unless a matching one is already there:
    ``obsp["scldiff_connectivities"]``, ``obsm["X_scldiff_lpe"]`` and their parameters in
    ``uns["scldiff_graph"]``.

    Without ``spatial``, the graph is the expression k-NN graph. With it
    (:func:`spatial_settings`), the tissue's neighbourhood graph of the coordinates in
    ``obsm[spatial["key"]]`` (:func:`~scldiff.graph.spatial_graph`, written in squidpy's
    layout too), spots without a neighbour joined to their nearest spot (warned), and the
    LPE are its eigenvectors, the tissue's smooth coordinates; ``expression_edges`` adds
    the expression graph's edges to the encoder's graph.

    With ``multiome`` (:func:`multiome_settings`), the expression graph is the genes' alone,
    ``multiome["graph"]="atac"`` the k-NN graph of the cells' LSI embedding
    (``obsm["X_scldiff_lsi"]``, :func:`ensure_lsi` first), ``"both"`` the union of the two
    (the larger weight of an edge in both)."""
    params = graph_params(layer, adata.n_obs, n_neighbors, n_pcs, n_lpe, spatial, multiome)
    stored = adata.uns.get(ADATA_KEYS.GRAPH_PARAMS)
    if (
        isinstance(stored, dict)
        and _plain(stored) == params
        and ADATA_KEYS.GRAPH in adata.obsp
        and ADATA_KEYS.LPE in adata.obsm
        and adata.obsm[ADATA_KEYS.LPE].shape == (adata.n_obs, n_lpe)
    ):
        logger.info("Reusing the cell graph stored in the AnnData.")
        return
    seed = settings.seed if settings.seed is not None else 0
    tissue = _tissue_graph(adata, spatial) if spatial else None
    graph = tissue
    if multiome:
        graph = _multiome_graph(adata, layer, n_neighbors, n_pcs, multiome, seed)
    elif not spatial or spatial["expression_edges"]:
        counts = adata.X if layer is None else adata.layers[layer]  # backed: read in blocks
        embedding = pca_embedding(counts, n_pcs=n_pcs, random_state=seed)
        expression = knn_graph(embedding, n_neighbors=n_neighbors, random_state=seed)
        graph = expression if not spatial else \
            sp.csr_matrix(graph.maximum(expression), dtype=np.float32)
    if n_lpe > 0:  # a tissue's LPE are its own, whatever edges expression adds
        lpe, _ = laplacian_positional_encoding(graph if tissue is None else tissue,
                                               n_lpe=n_lpe, random_state=seed)
    else:
        lpe = np.zeros((adata.n_obs, 0), dtype=np.float32)
    adata.obsp[ADATA_KEYS.GRAPH] = graph
    adata.obsm[ADATA_KEYS.LPE] = lpe
    adata.uns[ADATA_KEYS.GRAPH_PARAMS] = params


def _multiome_graph(adata: AnnData, layer: str | None, n_neighbors: int, n_pcs: int,
                    multiome: dict, seed: int) -> sp.csr_matrix:
    """The cell graph of paired data: of the genes' PCA, the peaks' LSI, or both."""
    graphs = []
    if multiome["graph"] in ("rna", "both"):
        counts = (adata.X if layer is None else adata.layers[layer])[:, :multiome["n_genes"]]
        embedding = pca_embedding(counts, n_pcs=min(n_pcs, multiome["n_genes"] - 1),
                                  random_state=seed)
        graphs.append(knn_graph(embedding, n_neighbors=n_neighbors, random_state=seed))
    if multiome["graph"] in ("atac", "both"):
        graphs.append(knn_graph(np.asarray(adata.obsm[ADATA_KEYS.LSI]),
                                n_neighbors=n_neighbors, random_state=seed))
    graph = graphs[0] if len(graphs) == 1 else graphs[0].maximum(graphs[1])
    return sp.csr_matrix(graph, dtype=np.float32)


def write_spatial_graph(adata: AnnData, connectivities, distances, kind: str,
                        n_neighbors: int) -> None:
    """``obsp["spatial_connectivities"]``, ``obsp["spatial_distances"]`` and
    ``uns["spatial_neighbors"]``, where squidpy and scanpy read a spatial graph."""
    adata.obsp["spatial_connectivities"] = connectivities
    adata.obsp["spatial_distances"] = distances
    adata.uns["spatial_neighbors"] = {
        "connectivities_key": "spatial_connectivities", "distances_key": "spatial_distances",
        "params": {"method": kind, "n_neighbors": int(n_neighbors), "library": "scldiff"}}


def _tissue_graph(adata: AnnData, spatial: dict) -> sp.csr_matrix:
    """Write the spatial graph in squidpy's layout (``obsp["spatial_connectivities"]``,
    ``obsp["spatial_distances"]``, ``uns["spatial_neighbors"]``) and return the tissue graph
    the model uses: those connectivities with isolated spots joined to their nearest spot,
    float32."""
    coordinates = np.asarray(adata.obsm[spatial["key"]], dtype=np.float64)
    connectivities, distances = spatial_graph(coordinates, kind=spatial["graph"],
                                              n_neighbors=spatial["n_neighbors"])
    write_spatial_graph(adata, connectivities, distances, spatial["graph"],
                        spatial["n_neighbors"])
    joined, n_joined = join_isolated(connectivities, coordinates)
    if n_joined:
        warnings.warn(f"{n_joined} spot(s) have no neighbour in the {spatial['graph']!r} "
                      "spatial graph (islands of one spot); each was joined to its nearest "
                      "spot in the model's graph (obsp['scldiff_connectivities']). Drop them "
                      "first to leave them out.", UserWarning, stacklevel=4)
    return sp.csr_matrix(joined, dtype=np.float32)


def warn_backed_csc(adata: AnnData, layer: str | None) -> None:
    """Warn where the counts are a backed CSC matrix, whose rows are slow to read."""
    matrix = adata.X if layer is None else adata.layers[layer]
    if not is_in_memory(matrix) and getattr(matrix, "format", None) == "csc":
        warnings.warn(
            "The counts are a backed CSC matrix: every block of rows that setup and training "
            "read touches all of its columns, which is slow on a large file. Store them as "
            "CSR (adata.X = adata.X.tocsr() before write_h5ad) to read rows directly.",
            UserWarning, stacklevel=3)


def ensure_clusters(adata: AnnData, resolution: float) -> None:
    """Leiden clusters of the cell graph (``obsp["scldiff_connectivities"]``), the labels of
    ``cluster_labels=True``, in ``obs["scldiff_cluster"]`` (categories ``"0"``, ``"1"``,
    ... by decreasing size) with their parameters in ``uns["scldiff_clusters"]``; reused
    when already there with the same graph and resolution.

    Scanpy's Leiden (igraph's implementation, modularity with the edge weights, seeded
    from ``scvi.settings.seed``) on a stand-in AnnData, so that nothing else is written into
    the user's. A cluster of one cell joins the cluster it has the most edge weight to: a
    label needs two cells."""
    import scanpy as sc

    params = {"resolution": float(resolution), "graph": dict(adata.uns[ADATA_KEYS.GRAPH_PARAMS])}
    stored = adata.uns.get(ADATA_KEYS.CLUSTER_PARAMS)
    if ADATA_KEYS.CLUSTERS in adata.obs and isinstance(stored, dict) \
            and _plain(stored) == _plain(params):
        logger.info("Reusing the clusters stored in the AnnData.")
        return
    graph = adata.obsp[ADATA_KEYS.GRAPH].tocsr()
    stand_in = AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    seed = settings.seed if settings.seed is not None else 0
    sc.tl.leiden(stand_in, adjacency=graph, resolution=resolution, flavor="igraph",
                 n_iterations=2, directed=False, random_state=seed, key_added="clusters")
    codes = merge_singletons(stand_in.obs["clusters"].cat.codes.to_numpy(), graph)
    _, codes, sizes = np.unique(codes, return_inverse=True, return_counts=True)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(sizes.size)
    adata.obs[ADATA_KEYS.CLUSTERS] = pd.Categorical.from_codes(
        rank[codes], categories=[str(i) for i in range(sizes.size)])
    adata.uns[ADATA_KEYS.CLUSTER_PARAMS] = params


def merge_singletons(codes: np.ndarray, graph) -> np.ndarray:
    """Cluster codes with each cluster of one cell merged into the cluster it has the most
    edge weight to in ``graph`` (CSR), sizes kept current so that two neighbouring
    singletons end up together."""
    codes = np.asarray(codes, dtype=np.int64).copy()
    sizes = np.bincount(codes)
    for cell in np.flatnonzero(sizes[codes] == 1):
        if sizes[codes[cell]] != 1:  # another singleton joined it meanwhile
            continue
        row = graph[cell]
        weight = np.bincount(codes[row.indices], weights=row.data, minlength=sizes.size)
        weight[codes[cell]] = -1.0
        sizes[codes[cell]] -= 1
        codes[cell] = int(np.argmax(weight))
        sizes[codes[cell]] += 1
    return codes


def _plain(values: dict) -> dict:
    """A dict read back from h5ad with numpy scalars as Python ones, for comparison."""
    return {k: _plain(v) if isinstance(v, dict) else v.item() if isinstance(v, np.generic)
            else v for k, v in values.items()}
