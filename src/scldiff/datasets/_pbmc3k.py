"""PBMC 3k (10x Genomics, CC BY 4.0) with raw counts and cell-type labels."""

from __future__ import annotations

from anndata import AnnData

from ._bundled import read_bundled


def pbmc3k() -> AnnData:
    """2,638 peripheral blood mononuclear cells x 13,713 genes, raw UMI counts, ready for
    :meth:`~scldiff.LapDDPM.setup_anndata`.

    The cells and labels of the standard scanpy/Seurat tutorial: 10x Genomics "3k PBMCs from
    a Healthy Donor" after QC (200 < genes < 2500, < 5% mitochondrial counts); genes seen in
    at least 3 of the 2,700 unfiltered cells and in at least one of these. ``X`` and
    ``layers["counts"]`` are CSR float32 holding whole numbers (two copies, so that
    normalising ``X`` keeps the counts); ``obs["cell_type"]`` (categorical, 8 types, = the
    scanpy tutorial's ``louvain``) and ``obs["seurat_annotation"]`` hold labels.

    The file ships inside the package; each call returns a fresh copy. Provenance: see
    ``scldiff/datasets/data/README.md``.

    Returns
    -------
    AnnData of raw counts.

    Examples
    --------
    >>> adata = scldiff.datasets.pbmc3k()
    >>> adata.obs["cell_type"].value_counts()["B cells"]
    342
    """
    return read_bundled("pbmc3k.h5ad")
