"""Reading a data file shipped inside the package."""

from __future__ import annotations

from importlib.resources import as_file, files

import anndata
import numpy as np
from anndata import AnnData


def read_bundled(name: str) -> AnnData:
    """A fresh copy of ``data/<name>``, counts in ``X`` as float32 CSR and again in
    ``layers["counts"]`` (two copies, so that normalising ``X`` keeps the counts)."""
    with as_file(files(__package__) / "data" / name) as path:
        adata = anndata.read_h5ad(path)
    adata.X = adata.X.astype(np.float32)
    adata.layers["counts"] = adata.X.copy()
    return adata
