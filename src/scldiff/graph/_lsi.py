r"""Latent semantic indexing (LSI) of chromatin accessibility: binarised peaks, TF-IDF,
truncated SVD with the first component dropped, the embedding the field uses for ATAC
(Signac's ``RunTFIDF`` + ``RunSVD``, muon's ``tfidf`` + ``lsi``). Fitted once and kept
(:meth:`LSI.to_dict`, plain numbers), so that new cells are embedded the same way.

Written here rather than taken from muon or Signac: muon is not a dependency, and a fitted
embedding must be saved without pickle and applied to new cells, which neither offers as a
plain object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


def binarize_peaks(peaks) -> sp.csr_matrix:
    """Accessibility as 0/1 (CSR float32): any positive count is 1. Peaks hold counts or 0/1
    values; negative, non-integer or non-finite values are refused (``ValueError``)."""
    x = sp.csr_matrix(peaks, dtype=np.float64, copy=True)
    x.eliminate_zeros()
    if x.data.size and (not np.isfinite(x.data).all() or (x.data < 0).any()
                        or (x.data != np.round(x.data)).any()):
        raise ValueError("Peaks must hold accessibility counts or 0/1 values (non-negative "
                         "integers); found negative, fractional or non-finite values. Pass "
                         "the raw fragment or read counts per peak.")
    x.data[:] = 1.0
    return x.astype(np.float32)


def _term_frequency(x: sp.csr_matrix, scale_factor: float) -> sp.csr_matrix:
    """:math:`\\log(1 + s\\, x_{ij} / \\sum_j x_{ij})` per cell; cells without an accessible
    peak are refused."""
    total = np.asarray(x.sum(1)).ravel()
    if (total == 0).any():
        raise ValueError(f"{int((total == 0).sum())} cell(s) have no accessible peak (e.g. row "
                         f"{int(np.flatnonzero(total == 0)[0])}); their chromatin tells "
                         "nothing. Remove them first.")
    tf = sp.csr_matrix(sp.diags(scale_factor / total) @ x)
    tf.data = np.log1p(tf.data)
    return tf


@dataclass
class LSI:
    r"""A fitted LSI: ``idf`` (``(n_peaks,)``) and ``components`` (``(n_peaks, k)``).

    A cell's binarised peaks :math:`x` become :math:`t_j = \log(1 + 10^4 x_j / \sum_j x_j)\,
    \mathrm{idf}_j` with :math:`\mathrm{idf}_j = \log(1 + n / n_j)` (:math:`n_j` training
    cells with peak :math:`j` open; muon's ``tfidf(log_tf=True, log_idf=True)``), and its
    embedding is :math:`t V`, :math:`V` the right singular vectors of the training cells'
    TF-IDF matrix from the second on (the first follows sequencing depth), each signed so
    that its largest loading is positive.
    """

    idf: np.ndarray
    components: np.ndarray
    scale_factor: float = 1e4

    @classmethod
    def fit(cls, peaks, n_components: int = 20, scale_factor: float = 1e4,
            random_state: int = 0) -> LSI:
        """Fit on ``peaks`` (cells x peaks, counts or 0/1): ``n_components`` dimensions after
        the dropped first one."""
        from sklearn.utils.extmath import randomized_svd

        x = binarize_peaks(peaks)
        n_cells, n_peaks = x.shape
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) \
                or not 1 <= n_components < min(n_cells, n_peaks) - 1:
            raise ValueError(f"n_components must be an integer in [1, "
                             f"{min(n_cells, n_peaks) - 2}] for {n_cells} cells and "
                             f"{n_peaks} peaks, got {n_components!r}.")
        opened = np.asarray((x > 0).sum(0)).ravel()
        idf = np.log1p(n_cells / np.maximum(opened, 1)) * (opened > 0)
        tfidf = sp.csr_matrix(_term_frequency(x, scale_factor) @ sp.diags(idf))
        _, _, vt = randomized_svd(tfidf, n_components + 1, n_iter=7,
                                  random_state=random_state)
        v = vt[1:].T
        v = v * np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
        return cls(idf.astype(np.float64), v.astype(np.float64), float(scale_factor))

    def tfidf(self, peaks) -> sp.csr_matrix:
        """``(n_cells, n_peaks)`` TF-IDF of cells with the training peaks (the training
        IDF), :math:`t` above: what :meth:`transform` projects."""
        x = binarize_peaks(peaks)
        if x.shape[1] != self.idf.size:
            raise ValueError(f"The cells have {x.shape[1]} peaks; this LSI was fitted on "
                             f"{self.idf.size}. Give the training peaks, in their order.")
        return sp.csr_matrix(_term_frequency(x, self.scale_factor) @ sp.diags(self.idf))

    def transform(self, peaks) -> np.ndarray:
        """``(n_cells, k)`` float32 embedding of cells with the training peaks."""
        return np.asarray(self.tfidf(peaks) @ self.components, dtype=np.float32)

    def to_dict(self) -> dict:
        """Plain lists and numbers, for a JSON model file."""
        return {"idf": self.idf.tolist(), "components": self.components.tolist(),
                "scale_factor": self.scale_factor}

    @classmethod
    def from_dict(cls, values: dict) -> LSI:
        """The LSI of :meth:`to_dict`; ``ValueError`` for missing, mis-shaped or non-finite
        entries."""
        try:
            idf = np.asarray(values["idf"], dtype=np.float64)
            components = np.asarray(values["components"], dtype=np.float64)
            scale = float(values["scale_factor"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"A saved LSI needs idf, components and scale_factor: {err}"
                             ) from err
        if idf.ndim != 1 or components.ndim != 2 or components.shape[0] != idf.size \
                or not (np.isfinite(idf).all() and np.isfinite(components).all()) \
                or not scale > 0:
            raise ValueError("A saved LSI has mis-shaped or non-finite entries.")
        return cls(idf, components, scale)
