"""An scvi-tools field for a cell-by-cell graph in ``adata.obsp``."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scvi.data.fields import BaseAnnDataField, NumericalJointObsField, ObsmField


class ObspField(BaseAnnDataField):
    """Registers ``adata.obsp[obsp_key]``, a square ``(n_obs, n_obs)`` matrix.

    Parameters
    ----------
    registry_key
        Key under which the model finds the graph.
    obsp_key
        Key of the graph in ``adata.obsp``.
    """

    N_EDGES_KEY = "n_edges"

    def __init__(self, registry_key: str, obsp_key: str):
        super().__init__()
        self._registry_key = registry_key
        self._attr_key = obsp_key

    @property
    def registry_key(self) -> str:
        return self._registry_key

    @property
    def attr_name(self) -> str:
        return "obsp"

    @property
    def attr_key(self) -> str:
        return self._attr_key

    @property
    def is_empty(self) -> bool:
        return False

    def validate_field(self, adata: AnnData) -> None:
        if self.attr_key not in adata.obsp:
            raise ValueError(f"adata.obsp[{self.attr_key!r}] (the cell graph) is missing; run "
                             "LapDDPM.setup_anndata on this AnnData first.")
        shape = adata.obsp[self.attr_key].shape
        if shape != (adata.n_obs, adata.n_obs):
            raise ValueError(f"adata.obsp[{self.attr_key!r}] has shape {shape}, expected "
                             f"{(adata.n_obs, adata.n_obs)}.")

    def register_field(self, adata: AnnData) -> dict:
        self.validate_field(adata)
        graph = adata.obsp[self.attr_key]
        n_edges = graph.nnz if hasattr(graph, "nnz") else np.count_nonzero(graph)
        return {self.N_EDGES_KEY: int(n_edges)}

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        return self.register_field(adata_target)

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {}

    def view_state_registry(self, state_registry: dict) -> None:
        return None


class PositionalEncodingField(ObsmField):
    """``adata.obsm`` array of the Laplacian positional encodings, its columns numbered
    ``0 .. k-1`` as scvi-tools numbers those of any array, without its log line about it."""

    def _setup_column_names(self, adata: AnnData) -> np.ndarray:
        return np.arange(self.get_field_data(adata).shape[1])


class ChromatinField(PositionalEncodingField):
    """``adata.obsm`` array of the cells' ATAC LSI embedding of paired data; empty (not
    registered) with ``obsm_key=None``."""

    @property
    def is_empty(self) -> bool:
        return self.attr_key is None

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {} if self.is_empty else super().get_summary_stats(state_registry)


class ModalityField(BaseAnnDataField):
    """The ``adata.var`` column that marks each feature of paired data as a gene
    (``"rna"``) or a peak (``"atac"``), genes first; records the numbers of genes and peaks
    (summary statistics ``n_genes``, ``n_peaks``). Empty with ``var_key=None``.

    A transfer (a saved model loaded with data) requires the same numbers."""

    def __init__(self, registry_key: str, var_key: str | None):
        super().__init__()
        self._registry_key, self._attr_key = registry_key, var_key

    @property
    def registry_key(self) -> str:
        return self._registry_key

    @property
    def attr_name(self) -> str:
        return "var"

    @property
    def attr_key(self) -> str | None:
        return self._attr_key

    @property
    def is_empty(self) -> bool:
        return self._attr_key is None

    def validate_field(self, adata: AnnData) -> None:
        from ._validation import modality_split

        modality_split(adata, self.attr_key)

    def register_field(self, adata: AnnData) -> dict:
        from ._validation import modality_split

        n_genes = modality_split(adata, self.attr_key)
        return {"n_genes": n_genes, "n_peaks": int(adata.n_vars - n_genes)}

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        state = self.register_field(adata_target)
        if state != {k: state_registry[k] for k in ("n_genes", "n_peaks")}:
            raise ValueError(f"The AnnData has {state['n_genes']} genes and {state['n_peaks']} "
                             f"peaks; the model has {state_registry['n_genes']} and "
                             f"{state_registry['n_peaks']}.")
        return state

    def get_summary_stats(self, state_registry: dict) -> dict:
        return dict(state_registry)

    def view_state_registry(self, state_registry: dict) -> None:
        return None


class ContinuousCovariatesField(NumericalJointObsField):
    """scvi-tools' field of continuous ``adata.obs`` covariates, which also records each
    one's training mean, standard deviation, minimum and maximum (the networks read
    standardised values; generation warns outside the range). A transfer keeps the
    source's statistics."""

    STATS = ("mean", "std", "min", "max")

    def register_field(self, adata: AnnData) -> dict:
        state = super().register_field(adata)
        if self.is_empty:
            return {**state, **{name: [] for name in self.STATS}}
        values = adata.obs[self.attr_keys].to_numpy(dtype=np.float64)
        return {**state, "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                "min": values.min(0).tolist(), "max": values.max(0).tolist()}

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        state = super().transfer_field(state_registry, adata_target, **kwargs)
        return {**state, **{name: list(state_registry[name]) for name in self.STATS}}
