"""Paired RNA + ATAC: the genes and peaks of a multiome AnnData, the cells' chromatin as the
diffusion reads it (their standardised LSI embedding), and ``generate(conditions=atac)``:
RNA for given chromatin states, one generated cell per row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..graph import LSI
from ._attributes import Request
from ._constants import ADATA_KEYS, CHROMATIN, REGISTRY_KEYS


def paired_anndata(mdata, rna: str = "rna", atac: str = "atac",
                   modality_key: str = "modality") -> AnnData:
    """One AnnData of a MuData's paired modalities, as
    :meth:`~scldiff.LapDDPM.setup_anndata` ``(adata, modality_key="modality")`` reads
    them: the cells both modalities have (in the RNA's order), the genes, then the peaks,
    ``var[modality_key]`` ``"rna"`` or ``"atac"``, the RNA's ``obs``; ``X`` holds each
    modality's ``X`` (raw counts expected). The MuData is not changed.

    Parameters
    ----------
    mdata
        :class:`mudata.MuData` with an RNA and an ATAC modality.
    rna, atac
        Their names in ``mdata.mod``.
    modality_key
        The ``var`` column to write.
    """
    import anndata as ad

    for name in (rna, atac):
        if name not in mdata.mod:
            raise ValueError(f"The MuData has no modality {name!r} (modalities: "
                             f"{list(mdata.mod)}); pass rna= and atac= with their names.")
    genes, peaks = mdata.mod[rna], mdata.mod[atac]
    cells = genes.obs_names[genes.obs_names.isin(peaks.obs_names)]
    if cells.empty:
        raise ValueError("The RNA and ATAC modalities share no cell (obs name).")
    genes, peaks = genes[cells], peaks[cells]
    x = sp.hstack([sp.csr_matrix(genes.X), sp.csr_matrix(peaks.X)], format="csr")
    var = pd.concat([pd.DataFrame({modality_key: "rna"}, index=genes.var_names),
                     pd.DataFrame({modality_key: "atac"}, index=peaks.var_names)])
    return ad.AnnData(X=x, obs=genes.obs.copy(), var=var)


def lsi_state(adata: AnnData) -> dict:
    """The fitted LSI that ``setup_anndata`` stored in ``adata.uns["scldiff_lsi"]``, as
    plain lists and numbers (:meth:`~scldiff.graph.LSI.to_dict` plus the embedding's
    ``mean`` and ``std``), saved with the model in its ``model.json``."""
    fit = adata.uns[ADATA_KEYS.LSI_FIT]
    lsi = LSI.from_dict({k: fit[k] for k in ("idf", "components", "scale_factor")})
    return {**lsi.to_dict(), "mean": np.asarray(fit["mean"], dtype=np.float64).tolist(),
            "std": np.asarray(fit["std"], dtype=np.float64).tolist()}


def chromatin_of(state: dict) -> tuple[LSI, np.ndarray, np.ndarray]:
    """The LSI, mean and standard deviation of :func:`lsi_state`'s dict; ``ValueError`` for
    a damaged one."""
    lsi = LSI.from_dict(state)
    mean = np.asarray(state.get("mean"), dtype=np.float64)
    std = np.asarray(state.get("std"), dtype=np.float64)
    k = lsi.components.shape[1]
    if mean.shape != (k,) or std.shape != (k,) or not (np.isfinite(mean).all()
                                                        and (std > 0).all()):
        raise ValueError("the LSI's mean and standard deviation are missing or mis-shaped")
    return lsi, mean, std


class MultiomeMixin:
    """The genes and peaks of a multiome model and ``generate(conditions=atac)`` of
    :class:`~scldiff.LapDDPM`."""

    @property
    def modality_key(self) -> str | None:
        """The ``adata.var`` column marking genes and peaks (``None``: RNA alone)."""
        return self.registry_["setup_args"].get("modality_key")

    @property
    def n_genes(self) -> int:
        """Number of genes the model generates (the features before the peaks)."""
        return int(self.summary_stats.get("n_genes", self.summary_stats["n_vars"]))

    @property
    def gene_names(self) -> np.ndarray:
        """The genes the model generates, in order."""
        return np.asarray(self.get_var_names(), dtype=str)[: self.n_genes]

    @property
    def peak_names(self) -> np.ndarray:
        """The peaks a multiome model reads the chromatin from (empty without them)."""
        return np.asarray(self.get_var_names(), dtype=str)[self.n_genes :]

    def _block_keys(self) -> list[str]:
        """The names of the blocks after the attributes in the diffusion's rows, as
        ``guidance_scale`` takes them: the position (``spatial_key``), the chromatin
        (``"atac"``)."""
        return ([self.spatial_key] if self.module.n_position else []) + \
            ([CHROMATIN] if self.module.n_chromatin else [])

    def _chromatin(self, embedding: np.ndarray) -> np.ndarray:
        """Cells' chromatin as the diffusion reads it: their LSI embedding standardised by
        the training cells' mean and standard deviation, float32."""
        mean = np.asarray(self.lsi_["mean"], dtype=np.float64)  # checked at set-up and load
        std = np.asarray(self.lsi_["std"], dtype=np.float64)
        return ((np.asarray(embedding, dtype=np.float64) - mean) / std).astype(np.float32)

    def _gene_counts(self, counts):
        """The genes' columns of registered counts (all of them without peaks)."""
        return counts if not self.modality_key else counts[:, : self.n_genes]

    def _peaks(self, cells: np.ndarray) -> sp.csr_matrix:
        """The binarised peaks of training-AnnData ``cells`` (CSR float32 0/1)."""
        from ..graph import binarize_peaks

        manager = self.get_anndata_manager(self.adata, required=True)
        return binarize_peaks(manager.get_from_registry(REGISTRY_KEYS.X_KEY)[
            np.asarray(cells), self.n_genes :])

    def _fit_accessibility(self, collator, posterior: tuple, train_idx: np.ndarray,
                           val_idx: np.ndarray, seed: int) -> None:
        """The accessibility decoder on the training cells' posteriors and peaks
        (:func:`~scldiff.train.fit_accessibility`); its validation negative log-likelihood
        per cell goes to :attr:`history` as ``accessibility_nll_validation``."""
        import torch

        from ..train import fit_accessibility

        validation = None
        if len(val_idx):
            mean, logvar = self._posterior(collator, val_idx)
            validation = (mean, logvar, self._peaks(val_idx))
        nll = fit_accessibility(self.module.accessibility, posterior[0], posterior[1],
                                self._peaks(train_idx), validation,
                                generator=torch.Generator().manual_seed(seed))
        history = dict(self.history_ or {})
        history["accessibility_nll_validation"] = pd.DataFrame(
            {"accessibility_nll_validation": [nll]})
        self.history_ = history

    def _chromatin_request(self, atac: AnnData, seed: np.random.SeedSequence
                           ) -> tuple[Request, np.ndarray, np.ndarray]:
        """The attribute rows of ``generate(conditions=atac)``'s cells, their LSI embedding
        and their chromatin rows (the embedding standardised): the peaks of ``atac`` (the
        training peak names, counts or 0/1) embedded with the saved LSI; the attributes in
        ``atac.obs`` guide them too, and categorical ones not given are those of the
        training cell nearest in chromatin (for the decoder and the library sizes, not
        guided on)."""
        if not self.modality_key:
            raise ValueError("conditions as an AnnData of peaks needs a multiome model: set "
                             "up paired data with modality_key.")
        if atac.n_obs == 0:
            raise ValueError("conditions has no cells (0 rows); give one row per cell to "
                             "generate.")
        peaks = self.peak_names
        missing = np.setdiff1d(peaks, np.asarray(atac.var_names, dtype=str))
        if missing.size:
            raise ValueError(f"conditions lacks {missing.size} of the model's "
                             f"{peaks.size} peaks (e.g. {list(missing[:3])}); give the "
                             "training peaks (model.peak_names), as counts or 0/1.")
        layer = self.registry_["setup_args"].get("layer")
        matrix = atac.layers[layer] if layer is not None and layer in atac.layers else atac.X
        columns = atac.var_names.get_indexer(peaks)
        lsi, _, _ = chromatin_of(self.lsi_)
        try:
            embedding = lsi.transform(sp.csr_matrix(matrix)[:, columns])
        except ValueError as err:
            raise ValueError(f"conditions: {err}") from None
        chromatin = self._chromatin(embedding)
        nearest = None
        if self.adata is not None and self.module.n_categorical:
            from sklearn.neighbors import NearestNeighbors

            manager = self.get_anndata_manager(self.adata, required=True)
            training = self._chromatin(manager.get_from_registry(REGISTRY_KEYS.LSI_KEY))
            nearest = NearestNeighbors(n_neighbors=1).fit(training).kneighbors(
                chromatin, return_distance=False).ravel()
        return self._request_from_obs(atac.obs, nearest, seed), embedding, chromatin

    def _generate_from_chromatin(self, atac: AnnData, labels, n_samples, keep_fraction: float,
                                 sampling: dict, library_size: str, batch_size: int, seed: int,
                                 precision: str, progress_bar: bool) -> AnnData:
        """``generate(conditions=atac)`` once its common arguments are checked: one cell per
        row of ``atac``, guided on its chromatin and the attributes in ``atac.obs``."""
        if labels is not None or n_samples is not None:
            raise ValueError("Pass conditions alone: with an AnnData of peaks the cells are "
                             "its rows, so labels and n_samples must be None.")
        if keep_fraction < 1.0:
            raise ValueError("keep_fraction < 1 is not available with chromatin: the "
                             "post-guidance scorer knows no chromatin.")
        draw_seed, fill_seed = np.random.SeedSequence(seed).spawn(2)
        request, embedding, chromatin = self._chromatin_request(atac, fill_seed)
        blocks, computed_in = self._draw_in_precision(
            precision, request, batch_size, draw_seed, progress_bar, library_size, sampling,
            1.0, chromatin)
        provenance = self._provenance(
            sampling, seed=seed, batch_size=int(batch_size), library_size=library_size,
            precision=computed_in, conditioned_on=[*request.given, CHROMATIN],
            unseen_combinations=request.unseen)
        synth = self._counts_anndata(blocks, request.filled, "synthetic", provenance)
        synth.obs_names = atac.obs_names.copy()
        synth.obsm[ADATA_KEYS.LSI] = embedding
        return synth
