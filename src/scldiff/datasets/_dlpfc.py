"""Human DLPFC Visium section 151673 (Maynard et al., 2021) with raw counts, layers and spot
positions."""

from __future__ import annotations

from anndata import AnnData

from ._bundled import read_bundled


def dlpfc_151673() -> AnnData:
    """3,639 Visium spots x 5,000 genes of human dorsolateral prefrontal cortex, raw UMI
    counts, cortical layers and spot positions, ready for
    :meth:`~scldiff.LapDDPM.setup_anndata` with ``spatial_key="spatial"``.

    Section 151673 of spatialLIBD (Maynard et al., 2021, *Nat Neurosci* 24:425), the
    standard benchmark of spatial-domain methods: the 5,000 most variable genes (Ensembl ids
    as ``var_names``), ``obs["layer"]`` (Layer1-Layer6 and WM, the manual annotation; 28
    spots unlabelled, NaN), ``obs["array_row"]``/``obs["array_col"]`` (the hexagonal
    array's indices) and ``obsm["spatial"]`` (full-resolution pixel coordinates, scanpy's
    convention). ``X`` and ``layers["counts"]`` are CSR float32 holding whole numbers.

    The file ships inside the package; each call returns a fresh copy. Provenance: see
    ``scldiff/datasets/data/README.md``.

    Returns
    -------
    AnnData of raw counts.

    Examples
    --------
    >>> adata = scldiff.datasets.dlpfc_151673()
    >>> adata.obs["layer"].value_counts()["WM"]
    513
    """
    return read_bundled("visium_dlpfc_151673.h5ad")
