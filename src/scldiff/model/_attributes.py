"""A cell's attributes (labels, categorical and continuous covariates): what the registry
records of them, their rows as the networks read them, and the rows of requested cells."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._constants import ADATA_KEYS, REGISTRY_KEYS


@dataclass(frozen=True)
class Attribute:
    """One attribute of the cells, as registered by ``setup_anndata``.

    Attributes
    ----------
    key
        Its ``adata.obs`` column.
    kind
        ``"categorical"`` or ``"continuous"``.
    categories
        The training categories in the order of their codes (categorical).
    mean, std, low, high
        Mean, standard deviation, smallest and largest training value (continuous); the
        networks read :math:`(x - \\text{mean}) / \\text{std}`.
    """

    key: str
    kind: str
    categories: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0
    low: float = 0.0
    high: float = 0.0


def registered_attributes(registry: dict) -> list[Attribute]:
    """The attributes of a model's registry, in the order of the networks' columns: the
    labels, the categorical covariates, the continuous covariates."""
    setup, fields = registry["setup_args"], registry["field_registries"]
    out = []
    labels_key = label_column(setup)
    if labels_key is not None:
        mapping = fields[REGISTRY_KEYS.LABELS_KEY]["state_registry"]["categorical_mapping"]
        out.append(Attribute(labels_key, "categorical", tuple(str(c) for c in mapping)))
    state = fields.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    for key in state.get("field_keys", []):
        out.append(Attribute(str(key), "categorical",
                             tuple(str(c) for c in state["mappings"][key])))
    state = fields.get(REGISTRY_KEYS.CONT_COVS_KEY, {}).get("state_registry", {})
    for i, key in enumerate(state.get("columns", [])):
        out.append(Attribute(str(key), "continuous", mean=float(state["mean"][i]),
                             std=float(state["std"][i]), low=float(state["min"][i]),
                             high=float(state["max"][i])))
    return out


def label_column(setup_args: dict) -> str | None:
    """The labels' ``adata.obs`` column: ``labels_key``, or the clusters' column when set up
    with ``cluster_labels=True``."""
    if setup_args.get("cluster_labels"):
        return ADATA_KEYS.CLUSTERS
    return setup_args.get("labels_key")


def attribute_rows(manager, attributes: Sequence[Attribute]) -> np.ndarray:
    """``(n_cells, A)`` float32 rows of the registered AnnData: categorical codes, then
    standardised continuous values."""
    n_obs = manager.adata.n_obs
    columns = []
    has_labels = label_column(manager.registry["setup_args"]) is not None
    if has_labels:
        labels = manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)
        columns.append(np.asarray(labels, dtype=np.float32).reshape(n_obs, 1))
    if sum(a.kind == "categorical" for a in attributes) > has_labels:  # covariates too
        codes = manager.get_from_registry(REGISTRY_KEYS.CAT_COVS_KEY)
        columns.append(np.asarray(codes, dtype=np.float32).reshape(n_obs, -1))
    continuous = [a for a in attributes if a.kind == "continuous"]
    if continuous:
        values = np.asarray(manager.get_from_registry(REGISTRY_KEYS.CONT_COVS_KEY),
                            dtype=np.float64).reshape(n_obs, -1)
        mean = np.array([a.mean for a in continuous])
        std = np.array([a.std for a in continuous])
        columns.append(((values - mean) / std).astype(np.float32))
    return np.concatenate(columns, axis=1) if columns else np.zeros((n_obs, 0), np.float32)


def combination_table(rows: np.ndarray, n_categorical: int) -> dict[str, list]:
    """The distinct combinations of categorical codes among ``rows`` and their numbers of
    cells: ``{"codes": [[...], ...], "counts": [...]}`` (one empty combination when there
    are no categorical attributes)."""
    codes = np.asarray(rows[:, :n_categorical], dtype=np.int64)
    if n_categorical == 0:
        return {"codes": [[]], "counts": [int(codes.shape[0])]}
    distinct, counts = np.unique(codes, axis=0, return_counts=True)
    return {"codes": distinct.tolist(), "counts": counts.tolist()}


def combination_index(codes: np.ndarray, table: dict) -> np.ndarray:
    """The row of each combination of ``codes`` (``(n, n_categorical)``) in ``table``;
    ``len(table["codes"])`` for combinations it lacks (the library-size model's group of
    all cells)."""
    trained = np.asarray(table["codes"], dtype=np.int64).reshape(len(table["counts"]), -1)
    codes = np.asarray(codes, dtype=np.int64)
    if trained.shape[1] == 0:
        return np.zeros(codes.shape[0], dtype=np.int64)
    dims = np.maximum(trained.max(0), codes.max(0, initial=0)) + 1
    keys = np.ravel_multi_index(trained.T, dims)  # one integer per combination
    order = np.argsort(keys)
    wanted = np.ravel_multi_index(codes.T, dims)
    at = np.minimum(np.searchsorted(keys[order], wanted), len(keys) - 1)
    return np.where(keys[order][at] == wanted, order[at], len(keys)).astype(np.int64)


@dataclass
class Request:
    """The attribute rows of the cells ``generate`` is asked for.

    Attributes
    ----------
    guide
        ``(n, A)`` rows the diffusion is guided on, NaN where an attribute was not given.
    filled
        ``(n, A)`` the same with every categorical attribute filled in: those not given are
        drawn from the training cells that share the given ones (the decoder and the
        library-size model need them; the obs columns show them).
    given
        Keys of the attributes given for at least one cell.
    unseen
        The combinations of given categorical values no training cell has, as
        ``"key=value, ..."`` strings.
    """

    guide: np.ndarray
    filled: np.ndarray
    given: list[str]
    unseen: list[str]


def request_rows(conditions, labels, n_samples: int | None, attributes: list[Attribute],
                 table: dict, rng: np.random.Generator, labels_key: str | None) -> Request:
    """:class:`Request` of ``generate``'s ``conditions``/``labels``/``n_samples``;
    ``labels`` are values of ``labels_key``, the first attribute."""
    n_cat = sum(a.kind == "categorical" for a in attributes)
    if conditions is not None and (labels is not None or n_samples is not None):
        raise ValueError("Pass conditions alone: with conditions the cells are given by its "
                         "rows, so labels and n_samples must be None.")
    if labels is not None and n_samples is not None:
        raise ValueError("Pass either labels or n_samples, not both: with labels the number "
                         "of cells is given by the labels.")
    if conditions is None and labels is None:
        guide = _proportional_rows(n_samples, attributes, table, n_cat)
        given = [a.key for a in attributes if a.kind == "categorical"]
        return Request(guide, guide.copy(), given, [])
    if labels is not None:
        if labels_key is None:
            raise ValueError("This model has no labels (set up with labels_key=None); pass "
                             "conditions or n_samples instead of labels.")
        conditions = pd.DataFrame({labels_key: _label_list(labels)})
    frame = _conditions_frame(conditions, attributes)
    guide = _encode(frame, attributes, table)
    filled, unseen = _fill(guide, attributes, table, n_cat, rng)
    given = [a.key for a in attributes if a.key in frame.columns
             and frame[a.key].notna().any()]
    return Request(guide, filled, given, unseen)


def obs_request(obs: pd.DataFrame, attributes: list[Attribute], table: dict,
                rng: np.random.Generator, labels_key: str | None) -> Request:
    """:class:`Request` of cells given one per row of ``obs``, guided on the attributes
    among its columns (other columns ignored)."""
    keys = [a.key for a in attributes if a.key in obs.columns]
    frame = obs[keys].reset_index(drop=True) if keys else \
        pd.DataFrame(index=pd.RangeIndex(len(obs)))
    return request_rows(frame, None, None, attributes, table, rng, labels_key)


def _proportional_rows(n_samples, attributes, table, n_cat) -> np.ndarray:
    """``n_samples`` rows in the training proportions of the categorical combinations (by
    largest remainder, so that the numbers are exact and deterministic); continuous
    covariates not given."""
    if n_samples is None:
        raise ValueError("Pass conditions, labels or n_samples.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
        raise TypeError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
    counts = np.asarray(table["counts"], dtype=np.float64)
    quota = counts / counts.sum() * n_samples
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: n_samples - take.sum()]] += 1
    codes = np.asarray(table["codes"], dtype=np.float32).reshape(len(counts), n_cat)
    rows = np.full((n_samples, len(attributes)), np.nan, dtype=np.float32)
    rows[:, :n_cat] = np.repeat(codes, take, axis=0)
    return rows


def _label_list(labels) -> list:
    """``generate``'s ``labels`` (a mapping ``{label: count}`` or one label per cell) as one
    label per cell."""
    if isinstance(labels, Mapping):
        out = []
        for label, count in labels.items():
            _check_count(label, count)
            out += [label] * int(count)
        if not out:
            raise ValueError("labels is an empty mapping; give at least one {label: count}.")
        return out
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray,
                                                                   pd.Series, pd.Index)):
        raise TypeError("labels must be a mapping {label: count} or a sequence with one label "
                        f"per cell, got {type(labels).__name__}.")
    if len(labels) == 0:
        raise ValueError("labels is empty; give at least one label.")
    return list(labels)


def _check_count(key, count) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"The count for {key!r} must be an integer, got {count!r}.")
    if count < 1:
        raise ValueError(f"The count for {key!r} must be positive, got {count}.")


def _conditions_frame(conditions, attributes: list[Attribute]) -> pd.DataFrame:
    """``conditions`` (a DataFrame, one row per cell, or a mapping from tuples of attribute
    values, in the model's attribute order, to numbers of cells) as a DataFrame whose
    columns are attribute keys."""
    keys = [a.key for a in attributes]
    if isinstance(conditions, Mapping):
        rows = []
        for values, count in conditions.items():
            _check_count(values, count)
            values = values if isinstance(values, tuple) else (values,)
            if len(values) != len(keys):
                raise ValueError(f"The key {values!r} of conditions has {len(values)} values; "
                                 f"give one per attribute, in the order {keys} (None for "
                                 "an attribute left unconditioned).")
            rows += [values] * int(count)
        if not rows:
            raise ValueError("conditions is an empty mapping; give at least one "
                             "{(values, ...): count}.")
        return pd.DataFrame(rows, columns=keys)
    if not isinstance(conditions, pd.DataFrame):
        raise TypeError("conditions must be a pandas DataFrame (one row per cell, a column per "
                        "attribute) or a mapping {(value, ...): count}, got "
                        f"{type(conditions).__name__}.")
    unknown = [c for c in conditions.columns if c not in keys]
    if unknown:
        raise ValueError(f"conditions has columns that are not attributes of the model: "
                         f"{unknown}; its attributes are {keys}.")
    if len(conditions) == 0:
        raise ValueError("conditions has no rows; give one row per cell to generate.")
    return conditions


def _encode(frame: pd.DataFrame, attributes: list[Attribute], table: dict) -> np.ndarray:
    """The guide rows of a conditions frame: codes and standardised values, NaN where not
    given; ``ValueError`` for unknown categories or ones without training cells."""
    rows = np.full((len(frame), len(attributes)), np.nan, dtype=np.float32)
    trained = np.asarray(table["codes"], dtype=np.int64)
    for a, attribute in enumerate(attributes):
        if attribute.key not in frame.columns:
            continue
        column = frame[attribute.key]
        given = column.notna().to_numpy()
        if attribute.kind == "continuous":
            rows[:, a] = _continuous(column, given, attribute)
            continue
        values = column[given].astype(str).to_numpy()
        codes = pd.Categorical(values, categories=list(attribute.categories)).codes
        if (codes < 0).any():
            unknown = sorted(set(values[codes < 0]))
            raise ValueError(f"Unknown {attribute.key!r} value(s) {unknown[:5]}; the model was "
                             f"trained on: {list(attribute.categories)}.")
        empty = sorted(attribute.categories[c] for c in np.setdiff1d(codes, trained[:, a]))
        if empty:
            raise ValueError(f"{attribute.key!r} value(s) {empty} had no training cells, so "
                             "the model knows nothing about them; generate one of "
                             f"{sorted({attribute.categories[c] for c in trained[:, a]})}.")
        rows[given, a] = codes
    return rows


def _continuous(column: pd.Series, given: np.ndarray, attribute: Attribute) -> np.ndarray:
    try:
        values = pd.to_numeric(column, errors="raise").to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"conditions[{attribute.key!r}] must hold numbers (NaN: not "
                         "conditioned).") from None
    if np.isinf(values).any():
        raise ValueError(f"conditions[{attribute.key!r}] holds infinite values.")
    outside = given & ((values < attribute.low) | (values > attribute.high))
    if outside.any():
        warnings.warn(f"{int(outside.sum())} requested {attribute.key!r} values lie outside "
                      f"the training range [{attribute.low:g}, {attribute.high:g}]: the model "
                      "extrapolates there.", UserWarning, stacklevel=4)
    return ((values - attribute.mean) / attribute.std).astype(np.float32)


def _fill(guide: np.ndarray, attributes: list[Attribute], table: dict, n_cat: int,
          rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Guide rows with each missing categorical value drawn from the training combinations
    that share the row's given categorical values (weighted by their cells; from all
    combinations where none does), and the given combinations no training cell has."""
    filled = guide.copy()
    if n_cat == 0:
        return filled, []
    trained = np.asarray(table["codes"], dtype=np.float32).reshape(-1, n_cat)
    weights = np.asarray(table["counts"], dtype=np.float64)
    pattern = np.nan_to_num(guide[:, :n_cat], nan=-1.0)
    distinct, inverse = np.unique(pattern, axis=0, return_inverse=True)
    unseen = []
    for p, values in enumerate(distinct):
        given = values >= 0
        match = (trained[:, given] == values[given]).all(axis=1)
        if not match.any():
            match = np.ones(len(trained), dtype=bool)
            unseen.append(", ".join(f"{attributes[a].key}={attributes[a].categories[int(v)]}"
                                    for a, v in enumerate(values) if v >= 0))
        rows = np.flatnonzero(inverse.ravel() == p)
        if given.all():
            continue
        w = weights * match
        pick = rng.choice(len(trained), size=rows.size, p=w / w.sum())
        filled[np.ix_(rows, np.flatnonzero(~given))] = trained[pick][:, ~given]
    return filled, unseen


def guidance_scales(guidance_scale, attributes: list[Attribute], blocks: Sequence[str] = ()
                    ) -> float | list[float]:
    """``generate``'s ``guidance_scale``: one finite number >= 0 (joint guidance) or a
    mapping ``{key: scale}`` (compositional; attributes it leaves out get 1), as a float or
    a list with one scale per attribute, and one more per block after them (``blocks``: a
    spatial model's position, named by its ``spatial_key``; a multiome model's chromatin,
    ``"atac"``)."""

    def check(name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(
                value, (int, float, np.integer, np.floating)) or not np.isfinite(value) \
                or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        return float(value)

    if not isinstance(guidance_scale, Mapping):
        return check("guidance_scale", guidance_scale)
    keys = [a.key for a in attributes] + list(blocks)
    unknown = [k for k in guidance_scale if k not in keys]
    if unknown:
        raise ValueError(f"guidance_scale names {unknown}, which are not attributes of the "
                         f"model; its attributes are {keys}.")
    return [check(f"guidance_scale[{k!r}]", guidance_scale.get(k, 1.0)) for k in keys]
