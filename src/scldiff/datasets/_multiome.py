"""10x Multiome PBMCs (muon's test subset): paired RNA and ATAC counts of the same cells."""

from __future__ import annotations

from anndata import AnnData

from ._bundled import read_bundled


def pbmc_multiome_subset() -> AnnData:
    """1,000 PBMCs x (45 genes + 174 peaks) of 10x Multiome, raw counts in both modalities,
    in the layout :meth:`~scldiff.LapDDPM.setup_anndata` reads with
    ``modality_key="modality"``: the genes first, then the peaks, ``var["modality"]``
    ``"rna"`` or ``"atac"``.

    muon's test subset of 10x Genomics' "PBMC_rep1" (the 45 marker genes and the peaks
    within 5 kb of them): few features, real cell-type variation, a small example of
    cross-modal generation. 19 cells have no accessible peak; drop them before set-up.

    The file ships inside the package; each call returns a fresh copy. Provenance: see
    ``scldiff/datasets/data/README.md``.

    Returns
    -------
    AnnData of raw counts (CSR float32).

    Examples
    --------
    >>> adata = scldiff.datasets.pbmc_multiome_subset()
    >>> adata.var["modality"].value_counts()["atac"]
    174
    """
    return read_bundled("pbmc_multiome_subset.h5ad")
