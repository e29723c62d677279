"""Checks of user input that raise errors naming the problem and the fix, before any write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from ..graph._matrix import row_blocks


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


def check_counts(adata: AnnData, layer: str | None) -> None:
    """Raise ``ValueError`` unless the layer holds finite, non-negative whole numbers.

    Also rejects cells and genes without counts.
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    matrix = _layer(adata, layer)
    if matrix is None:
        raise ValueError(f"{where} is empty; pass an AnnData with raw counts.")
    n_obs, n_vars = adata.shape
    if n_obs == 0 or n_vars == 0:
        raise ValueError(f"{where} has shape {adata.shape}; it needs cells and genes.")
    gene_total = np.zeros(n_vars)
    empty_cells = 0
    for block in row_blocks(matrix):  # a dense or backed matrix is never copied whole
        if not (sp.issparse(block) or isinstance(block, np.ndarray)):
            block = np.asarray(block)
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
            f"{empty_cells} cells have no counts in {where}; remove them first, e.g. "
            "sc.pp.filter_cells(adata, min_counts=1)."
        )
    empty_genes = np.flatnonzero(gene_total == 0)
    if empty_genes.size:
        names = list(adata.var_names[empty_genes[:5]])
        raise ValueError(
            f"{empty_genes.size} genes have no counts in {where} (e.g. {names}); the model "
            "cannot learn anything about them. Remove them first, e.g. "
            "sc.pp.filter_genes(adata, min_counts=1)."
        )


def check_labels(adata: AnnData, labels_key: str | None) -> None:
    """Raise ``ValueError`` if the labels column is missing or has missing values."""
    if labels_key is None:
        return
    if labels_key not in adata.obs:
        raise ValueError(
            f"labels_key {labels_key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); pass an existing column or labels_key=None for an "
            "unconditional model."
        )
    missing = int(pd.isna(adata.obs[labels_key]).sum())
    if missing:
        raise ValueError(
            f"adata.obs[{labels_key!r}] has {missing} missing values; drop those cells or "
            "fill in their labels."
        )
    counts = adata.obs[labels_key].value_counts()
    single = [str(label) for label in counts.index[counts == 1]]
    if single:
        raise ValueError(
            f"{len(single)} label{'s' if len(single) > 1 else ''} of adata.obs[{labels_key!r}] "
            f"{'have' if len(single) > 1 else 'has'} a single cell ({single[:5]}); a label "
            "needs at least 2 cells to learn its cells and library sizes from. Merge those "
            "labels into others or drop their cells, e.g. adata = adata[adata.obs"
            f"[{labels_key!r}].map(adata.obs[{labels_key!r}].value_counts()) > 1].copy()."
        )


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


def resolve_generation_labels(
    labels, n_samples: int | None, categories: Sequence[str], proportions: np.ndarray,
    conditional: bool,
) -> np.ndarray:
    """Label codes of the cells to generate, from ``generate``'s ``labels``/``n_samples``.

    ``labels`` may be ``None`` (``n_samples`` cells in the training proportions, by largest
    remainder so the counts are exact and deterministic), a mapping ``{label: count}`` or a
    sequence with one label per cell.
    """
    index = {str(c): i for i, c in enumerate(categories)}

    def code(label) -> int:
        key = str(label)
        if key not in index:
            raise ValueError(
                f"Unknown label {label!r}; the model was trained on: {list(categories)}."
            )
        if conditional and proportions[index[key]] == 0:
            trained = [str(c) for c, p in zip(categories, proportions, strict=True) if p > 0]
            raise ValueError(
                f"Label {label!r} is a category of the labels column but had no training "
                f"cells, so the model knows nothing about it; generate one of {trained}."
            )
        return index[key]

    if labels is None:
        if n_samples is None:
            raise ValueError("Pass labels (a mapping {label: count} or one label per cell) or "
                             "n_samples.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
            raise TypeError(f"n_samples must be a positive integer, got {n_samples!r}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
        quota = proportions * n_samples
        counts = np.floor(quota).astype(np.int64)
        remainder = n_samples - counts.sum()
        counts[np.argsort(-(quota - counts), kind="stable")[:remainder]] += 1
        return np.repeat(np.arange(len(categories)), counts)
    if n_samples is not None:
        raise ValueError("Pass either labels or n_samples, not both: with labels the number "
                         "of cells is given by the labels.")
    if not conditional:
        raise ValueError("This model is unconditional (set up with labels_key=None); pass "
                         "n_samples instead of labels.")
    if isinstance(labels, Mapping):
        codes = []
        for label, count in labels.items():
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
                raise TypeError(f"The count for label {label!r} must be an integer, got "
                                f"{count!r}.")
            if count < 1:
                raise ValueError(f"The count for label {label!r} must be positive, got {count}.")
            codes.append(np.full(int(count), code(label), dtype=np.int64))
        if not codes:
            raise ValueError("labels is an empty mapping; give at least one {label: count}.")
        return np.concatenate(codes)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray,
                                                                   pd.Series, pd.Index)):
        raise TypeError(
            "labels must be a mapping {label: count} or a sequence with one label per cell, "
            f"got {type(labels).__name__}."
        )
    if len(labels) == 0:
        raise ValueError("labels is empty; give at least one label.")
    return np.array([code(label) for label in labels], dtype=np.int64)


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
