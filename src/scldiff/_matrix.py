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


def read_rows(matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (distinct, any order) as float32 CSR, in the order given.

    A backed matrix is read in increasing row order (what HDF5 needs), then reordered.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if is_in_memory(matrix):
        return _to_csr(matrix[rows])
    order = np.argsort(rows, kind="stable")
    block = _to_csr(matrix[rows[order]])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return block[inverse]


def row_sums(matrix, chunk_size: int | None = None) -> np.ndarray:
    """Total of each row (float64), reading a backed matrix block by block."""
    return np.concatenate([np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
                           for block in row_chunks(matrix, chunk_size)])
