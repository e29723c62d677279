"""Reading a count matrix that may live in memory or in a backed ``.h5ad`` file.

A backed AnnData (``anndata.read_h5ad(path, backed="r")``) keeps ``X`` on disk; reading it
whole would defeat the purpose. These helpers read it a block of rows at a time, so the
graph's setup and training never hold more than one block (or one minibatch) of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

# rows read at a time from a backed matrix (a few MB of a typical sparse count matrix)
ROW_CHUNK = 10_000


def is_in_memory(matrix) -> bool:
    """Whether ``matrix`` is a NumPy array or a SciPy sparse matrix (not a backed dataset)."""
    return sp.issparse(matrix) or isinstance(matrix, np.ndarray)


def _to_csr(block) -> sp.csr_matrix:
    out = sp.csr_matrix(block, dtype=np.float32)
    out.sort_indices()
    return out


def as_csr(matrix) -> sp.csr_matrix:
    """The whole matrix in memory as float32 CSR with sorted indices (reads a backed one)."""
    return _to_csr(matrix if is_in_memory(matrix) else matrix[:])


def row_blocks(matrix, chunk_size: int | None = None) -> Iterator:
    """Consecutive slices of ``chunk_size`` rows (default ``ROW_CHUNK``) as stored: no
    conversion, so dtype checks see the original values."""
    chunk_size = ROW_CHUNK if chunk_size is None else chunk_size
    n_rows = matrix.shape[0]
    for start in range(0, n_rows, chunk_size):
        yield matrix[start : min(start + chunk_size, n_rows)]


def row_chunks(matrix, chunk_size: int | None = None) -> Iterator[sp.csr_matrix]:
    """Blocks of rows as float32 CSR: an in-memory matrix whole, a backed one in slices of
    ``chunk_size`` rows (default ``ROW_CHUNK``)."""
    if is_in_memory(matrix):
        yield as_csr(matrix)
        return
    for block in row_blocks(matrix, chunk_size):
        yield _to_csr(block)


def _backed_csr_group(matrix):
    """The HDF5/Zarr group of a backed CSR matrix (anndata's ``CSRDataset``), else ``None``."""
    group = getattr(matrix, "group", None)
    if getattr(matrix, "format", None) != "csr" or group is None:
        return None
    if not all(key in group for key in ("data", "indices", "indptr")):
        return None
    return group


class _RowReader:
    """Reads rows of a backed CSR matrix straight from its ``data`` and ``indices`` arrays.

    anndata's backed CSR indexing reads the whole matrix for an array of rows; here only
    spans covering the requested rows are read. Rows whose ranges lie at most ``max_gap``
    stored entries apart share one read (each read has a fixed cost, and HDF5 reads at least
    a whole chunk). The row pointers are read once and kept (8 bytes per row).
    """

    def __init__(self, group, shape, max_gap: int = 8_192):
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape, self.max_gap = shape, max_gap

    def __call__(self, rows: np.ndarray) -> sp.csr_matrix:
        """``rows`` increasing and distinct."""
        lo, hi = self.indptr[rows], self.indptr[rows + 1]
        lengths = hi - lo
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # spans: a new one where the gap to the previous row's end exceeds max_gap
        new_span = np.ones(rows.size, dtype=bool)
        new_span[1:] = lo[1:] - hi[:-1] > self.max_gap
        span = np.cumsum(new_span) - 1
        first = np.flatnonzero(new_span)
        span_lo = lo[first]
        span_hi = np.maximum.reduceat(hi, first) if rows.size else span_lo
        offsets = np.zeros(first.size + 1, dtype=np.int64)
        np.cumsum(span_hi - span_lo, out=offsets[1:])
        # buffers in the file's own types: HDF5's type conversion is slow
        data = np.empty(offsets[-1], dtype=self.data.dtype)
        indices = np.empty(offsets[-1], dtype=self.indices.dtype)
        for a, b, c, d in zip(span_lo, span_hi, offsets[:-1], offsets[1:], strict=True):
            if b > a:
                data[c:d] = self.data[a:b]
                indices[c:d] = self.indices[a:b]
        # each row's entries inside the buffer of its span
        start = offsets[span] + lo - span_lo[span]
        take = np.repeat(start - indptr[:-1], lengths) + np.arange(indptr[-1])
        out = sp.csr_matrix((data[take].astype(np.float32, copy=False), indices[take], indptr),
                            shape=(rows.size, self.shape[1]))
        out.sort_indices()
        return out


def row_reader(matrix):
    """A function ``rows -> float32 CSR`` for the rows ``rows`` (distinct, any order) of
    ``matrix``, in the order given.

    A backed CSR matrix is read range by range (:class:`_RowReader`); other backed
    matrices through their own indexing, in increasing row order as HDF5 needs.
    """
    if is_in_memory(matrix):
        return lambda rows: _to_csr(matrix[np.asarray(rows, dtype=np.int64)])
    group = _backed_csr_group(matrix)
    read_sorted = (_RowReader(group, matrix.shape) if group is not None
                   else lambda rows: _to_csr(matrix[rows]))

    def read(rows):
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        block = read_sorted(rows[order])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return block[inverse]

    return read


def row_sums(matrix, chunk_size: int | None = None) -> np.ndarray:
    """Total of each row (float64), reading a backed matrix block by block."""
    return np.concatenate([np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
                           for block in row_chunks(matrix, chunk_size)])
