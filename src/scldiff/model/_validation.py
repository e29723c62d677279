"""Checks of user input that raise errors naming the problem and the fix, before any write."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from ..graph._matrix import is_in_memory, row_blocks


def _layer(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise ValueError(
            f"layer {layer!r} is not in adata.layers (available: {list(adata.layers)}); pass "
            "the layer that holds raw counts, or layer=None for adata.X."
        )
    return adata.layers[layer]


def _values(block) -> np.ndarray:
    if sp.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block).ravel()


def check_counts(adata: AnnData, layer: str | None, n_genes: int | None = None) -> None:
    """Raise ``ValueError`` unless the layer holds finite, non-negative whole numbers.

    Also rejects cells and genes without counts. ``n_genes``: only the first ``n_genes``
    columns are genes (paired data, whose peaks :func:`check_modality` checks).
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    matrix = _layer(adata, layer)
    if matrix is None:
        raise ValueError(f"{where} is empty; pass an AnnData with raw counts.")
    n_obs, n_vars = adata.n_obs, adata.n_vars if n_genes is None else n_genes
    if n_obs == 0 or n_vars == 0:
        raise ValueError(f"{where} has shape {adata.shape}; it needs cells and genes.")
    gene_total = np.zeros(n_vars)
    empty_cells = 0
    for block in row_blocks(matrix):  # a dense or backed matrix is never copied whole
        if not (sp.issparse(block) or isinstance(block, np.ndarray)):
            block = np.asarray(block)
        if n_genes is not None:
            block = block[:, :n_genes]
        values = _values(block)
        if values.dtype.kind not in "biuf":
            raise ValueError(f"{where} has dtype {values.dtype}; it must hold numeric counts.")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(
                f"{where} holds NaN or infinite values; pass raw UMI counts without missing "
                "values."
            )
        if values.size and values.min() < 0:
            raise ValueError(
                f"{where} holds negative values (minimum {values.min():g}); it looks scaled or "
                "centred. Pass raw counts, e.g. layer='counts'."
            )
        if values.dtype.kind == "f":
            fractional = values != np.round(values)
            if fractional.any():
                example = values[fractional][0]
                raise ValueError(
                    f"{where} holds non-integer values (e.g. {example:g}); it looks normalised "
                    "or log-transformed. Pass raw counts, e.g. layer='counts' or "
                    "adata.raw.to_adata()."
                )
        cell_total = np.asarray(block.sum(axis=1)).ravel()
        empty_cells += int((cell_total == 0).sum())
        gene_total += np.asarray(block.sum(axis=0)).ravel()
    if empty_cells:
        raise ValueError(
            f"{empty_cells} cells have no {'gene ' if n_genes is not None else ''}counts in "
            f"{where}; remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )
    empty_genes = np.flatnonzero(gene_total == 0)
    if empty_genes.size:
        names = list(adata.var_names[empty_genes[:5]])
        raise ValueError(
            f"{empty_genes.size} genes have no counts in {where} (e.g. {names}); the model "
            "cannot learn anything about them. Remove them first, e.g. "
            "sc.pp.filter_genes(adata, min_counts=1)."
        )


def check_attributes(adata: AnnData, labels_key: str | None,
                     categorical_keys: Sequence[str] | None,
                     continuous_keys: Sequence[str] | None) -> None:
    """Raise ``ValueError`` naming the problem unless every attribute column exists once,
    a categorical one has no missing values and at least 2 cells per category, and a
    continuous one holds finite numbers that are not all equal."""
    lists = {}
    for name, keys in (("categorical_covariate_keys", categorical_keys),
                       ("continuous_covariate_keys", continuous_keys)):
        if keys is not None and (isinstance(keys, str) or not isinstance(keys, Sequence)
                                 or not all(isinstance(k, str) for k in keys)):
            raise TypeError(f"{name} must be a list of adata.obs column names, got "
                            f"{keys!r}.")
        lists[name] = list(keys or [])
    every = ([labels_key] if labels_key is not None else []) + \
        lists["categorical_covariate_keys"] + lists["continuous_covariate_keys"]
    repeated = sorted({k for k in every if every.count(k) > 1})
    if repeated:
        raise ValueError(f"The columns {repeated} are given more than once among labels_key "
                         "and the covariate keys; give each column once.")
    for key in every:
        if key not in adata.obs:
            raise ValueError(
                f"{key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}); "
                "pass existing columns, or None.")
    for key in ([labels_key] if labels_key is not None else []) + \
            lists["categorical_covariate_keys"]:
        _check_categorical(adata, key)
    for key in lists["continuous_covariate_keys"]:
        _check_continuous(adata, key)


def check_clustering(labels_key: str | None, cluster_labels: bool, resolution) -> None:
    """Raise ``ValueError`` for ``cluster_labels`` with labels, or a resolution that is not
    a positive number."""
    if cluster_labels and labels_key is not None:
        raise ValueError("cluster_labels=True makes labels from clusters of the cell graph; "
                         f"with labels_key={labels_key!r} pass cluster_labels=False.")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) \
            or not resolution > 0:
        raise ValueError(f"cluster_resolution must be a number > 0, got {resolution!r}.")


def _check_categorical(adata: AnnData, key: str) -> None:
    missing = int(pd.isna(adata.obs[key]).sum())
    if missing:
        raise ValueError(
            f"adata.obs[{key!r}] has {missing} missing values; drop those cells or fill in "
            "their values.")
    counts = adata.obs[key].value_counts()
    single = [str(label) for label in counts.index[counts == 1]]
    if single:
        raise ValueError(
            f"{len(single)} categor{'ies' if len(single) > 1 else 'y'} of adata.obs[{key!r}] "
            f"{'have' if len(single) > 1 else 'has'} a single cell ({single[:5]}); a category "
            "needs at least 2 cells to learn its cells and library sizes from. Merge those "
            "categories into others or drop their cells, e.g. adata = adata[adata.obs"
            f"[{key!r}].map(adata.obs[{key!r}].value_counts()) > 1].copy().")


def _check_continuous(adata: AnnData, key: str) -> None:
    column = adata.obs[key]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise ValueError(f"adata.obs[{key!r}] has dtype {column.dtype}; a continuous "
                         "covariate must be numeric (a categorical one goes in "
                         "categorical_covariate_keys).")
    values = column.to_numpy(dtype=np.float64)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise ValueError(f"adata.obs[{key!r}] has {bad} missing or infinite values; drop "
                         "those cells or fill in their values.")
    if values.size and values.min() == values.max():
        raise ValueError(f"adata.obs[{key!r}] has the same value in every cell; it carries "
                         "nothing to condition on. Leave it out.")


def check_graph_parameters(n_obs: int, n_neighbors: int, n_pcs: int, n_lpe: int) -> None:
    """Raise ``ValueError`` for graph sizes the data cannot support."""
    for name, value, low in (("n_neighbors", n_neighbors, 1), ("n_pcs", n_pcs, 1),
                             ("n_lpe", n_lpe, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if n_obs <= n_neighbors:
        raise ValueError(
            f"The AnnData has {n_obs} cells, too few for a {n_neighbors}-nearest-neighbour "
            f"graph; pass n_neighbors < {n_obs} or more cells."
        )
    if n_lpe >= n_obs - 1:
        raise ValueError(
            f"n_lpe={n_lpe} positional encodings need more than {n_lpe + 1} cells (have "
            f"{n_obs}); pass a smaller n_lpe."
        )


def check_genes(adata: AnnData, var_names: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``adata`` has exactly the model's genes, in order."""
    given = np.asarray(adata.var_names, dtype=str)
    if np.array_equal(given, var_names):
        return
    missing = [g for g in var_names if g not in set(given)]
    extra = [g for g in given if g not in set(var_names)]
    raise ValueError(
        "The AnnData's genes differ from the model's: "
        f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]})"
        + ("" if missing or extra else ", same genes in another order")
        + ". Subset and order them as in training: adata[:, model_var_names].")


def check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(
            value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def resolve_seed(seed: int | None) -> int:
    """``seed``, or for ``None`` one draw from torch's global generator, which
    ``scvi.settings.seed`` sets: a run is reproducible from the global seed, as training is,
    and records the seed it used."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}.")
    return int(seed)


def gene_columns(var_names: np.ndarray, gene_list) -> np.ndarray:
    """Positions of ``gene_list``'s genes among the model's ``var_names``, in the model's
    order as scvi-tools returns them (all genes for ``None``)."""
    if gene_list is None:
        return np.arange(len(var_names))
    columns = np.flatnonzero(np.isin(np.asarray(var_names), np.asarray(gene_list)))
    if not columns.size:
        raise ValueError("None of the genes in gene_list are the model's genes; pass names "
                         "from model.adata.var_names.")
    return columns


def check_spatial(adata: AnnData, spatial_key: str | None, kind: str, n_neighbors: int,
                  expression_edges: bool) -> None:
    """Raise ``ValueError`` for spatial settings the AnnData cannot support: a missing
    ``obsm`` key, coordinates that are not a finite ``(n_spots, 2 or 3)`` array or repeat a
    position, an unknown graph kind."""
    from ..graph._spatial import SPATIAL_GRAPHS, _check_coordinates

    if spatial_key is None:
        if expression_edges:
            raise ValueError("expression_edges=True adds expression edges to a spatial graph; "
                             "pass spatial_key too.")
        return
    if not isinstance(spatial_key, str) or spatial_key not in adata.obsm:
        raise ValueError(f"spatial_key={spatial_key!r} is not in adata.obsm (keys: "
                         f"{list(adata.obsm.keys())}); store the spots' coordinates there, "
                         "as scanpy and squidpy read them (adata.obsm['spatial']).")
    if kind not in SPATIAL_GRAPHS:
        raise ValueError(f"spatial_graph must be one of {SPATIAL_GRAPHS}, got {kind!r}.")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) \
            or not 1 <= n_neighbors < adata.n_obs:
        raise ValueError(f"spatial_neighbors must be an integer in [1, {adata.n_obs - 1}], "
                         f"got {n_neighbors!r}.")
    if not isinstance(expression_edges, bool):
        raise ValueError(f"expression_edges must be True or False, got {expression_edges!r}.")
    try:
        _check_coordinates(np.asarray(adata.obsm[spatial_key]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"adata.obsm[{spatial_key!r}]: {err}") from err


# var[modality_key] values of the two modalities (lower-cased): scldiff's and muon's names,
# and 10x's feature types as MultiVI reads them
RNA_MODALITY = ("rna", "gene expression")
ATAC_MODALITY = ("atac", "peaks")
GRAPH_MODALITIES = ("rna", "atac", "both")


def modality_split(adata: AnnData, modality_key: str) -> int:
    """The number of genes of a paired RNA + ATAC AnnData whose ``var[modality_key]``
    marks each feature ``"rna"`` or ``"atac"``, genes first, then peaks; ``ValueError``
    naming the fix otherwise."""
    if not isinstance(modality_key, str) or modality_key not in adata.var:
        raise ValueError(f"modality_key={modality_key!r} is not a column of adata.var "
                         f"(columns: {list(adata.var.columns)}); mark each feature 'rna' or "
                         "'atac' there (genes first, then peaks), as MultiVI reads them.")
    values = adata.var[modality_key].astype(str).str.lower().to_numpy()
    rna, atac = np.isin(values, RNA_MODALITY), np.isin(values, ATAC_MODALITY)
    if not (rna | atac).all():
        other = sorted(set(values[~(rna | atac)]))[:5]
        raise ValueError(f"adata.var[{modality_key!r}] holds {other}; each feature must be "
                         "'rna' (a gene) or 'atac' (a peak).")
    n_genes = int(rna.sum())
    if not n_genes or not atac.any():
        raise ValueError(f"adata.var[{modality_key!r}] marks {n_genes} genes and "
                         f"{int(atac.sum())} peaks; paired data need both.")
    if not rna[:n_genes].all():
        raise ValueError(f"The features of adata.var[{modality_key!r}] must be the genes first, "
                         "then the peaks (MultiVI's layout); reorder them, e.g. adata = "
                         f"adata[:, np.argsort(~adata.var[{modality_key!r}].isin(['rna']), "
                         "kind='stable')].copy().")
    return n_genes


def check_modality(adata: AnnData, layer: str | None, modality_key: str | None,
                   graph_modality: str, lsi_components: int, spatial_key: str | None) -> None:
    """Raise ``ValueError`` for multiome settings the AnnData cannot support: a missing or
    malformed modality column, peaks that are neither counts nor 0/1, cells without an
    accessible peak, a backed matrix, a bad graph modality or LSI width."""
    if modality_key is None:
        if graph_modality != "rna":
            raise ValueError("graph_modality chooses between RNA and ATAC; pass modality_key "
                             "too.")
        return
    if graph_modality not in GRAPH_MODALITIES:
        raise ValueError(f"graph_modality must be one of {GRAPH_MODALITIES}, got "
                         f"{graph_modality!r}.")
    if spatial_key is not None:
        raise ValueError("spatial_key and modality_key cannot be combined yet; set up either "
                         "the tissue or the paired modalities.")
    n_genes = modality_split(adata, modality_key)
    matrix = _layer(adata, layer)
    if not is_in_memory(matrix):
        raise ValueError("Paired RNA + ATAC data must be in memory; load it with "
                         "anndata.read_h5ad(path) (or adata = adata.to_memory()).")
    from ..graph import binarize_peaks

    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    try:
        peaks = binarize_peaks(matrix[:, n_genes:])
    except ValueError as err:
        raise ValueError(f"The peaks of {where}: {err}") from None
    closed = np.flatnonzero(np.asarray(peaks.sum(1)).ravel() == 0)
    if closed.size:
        raise ValueError(f"{closed.size} cell(s) have no accessible peak (e.g. "
                         f"{list(adata.obs_names[closed[:3]])}); their chromatin tells "
                         "nothing. Remove them first, e.g. adata = adata[np.asarray(adata[:, "
                         f"adata.var[{modality_key!r}] == 'atac'].X.sum(1)).ravel() > 0].copy().")
    n_peaks = adata.n_vars - n_genes
    if isinstance(lsi_components, bool) or not isinstance(lsi_components, (int, np.integer)) \
            or not 1 <= lsi_components < min(adata.n_obs, n_peaks) - 1:
        raise ValueError(f"lsi_components must be an integer in [1, "
                         f"{min(adata.n_obs, n_peaks) - 2}] for {adata.n_obs} cells and "
                         f"{n_peaks} peaks, got {lsi_components!r}.")


def check_keep_fraction(value) -> float:
    """``generate``'s ``keep_fraction`` as a float in (0, 1]; ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"keep_fraction must be a number in (0, 1], got {value!r}.")
    return float(value)
