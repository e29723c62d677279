"""Reading a count matrix that may live in memory or in a backed ``.h5ad`` file: blocks of
rows for the graph's PCA and the input checks, rows of a subgraph for minibatches.

A backed AnnData (``anndata.read_h5ad(path, backed="r")``) keeps ``X`` on disk; reading it
whole would defeat the purpose. These helpers read it a block of rows at a time, so the
graph's setup and training never hold more than one block (or one minibatch) of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from numba import njit

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


class _MappedArray:
    """Random access to an uncompressed 1-D HDF5 dataset through a memory map of its file.

    HDF5 reads at least a whole chunk per read; a memory map of the chunks' bytes touches
    only the pages that hold the requested entries. :meth:`create` returns ``None`` where
    that is not possible (filters such as compression, a driver other than a plain file,
    unallocated or misaligned chunks), and the caller falls back to HDF5 reads.
    """

    def __init__(self, path: str, dtype: np.dtype, chunk_len: int, chunk_start: np.ndarray):
        # the whole file as entries of ``dtype`` (its size need not be a multiple of them)
        n_entries = os.path.getsize(path) // dtype.itemsize
        self.file = np.memmap(path, dtype=dtype, mode="r", shape=(n_entries,))
        self._entries = self.file.view(np.ndarray)  # the same memory, as numba takes it
        self.chunk_len, self.chunk_start = chunk_len, chunk_start

    @classmethod
    def create(cls, dataset) -> _MappedArray | None:
        try:
            import h5py
        except ImportError:  # pragma: no cover - h5py comes with anndata
            return None
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1 or dataset.size == 0:
            return None
        path = dataset.file.filename
        if dataset.file.driver != "sec2" or not os.path.isfile(path):
            return None
        dsid, itemsize = dataset.id, dataset.dtype.itemsize
        if dsid.get_create_plist().get_nfilters() != 0:
            return None
        if dataset.chunks is None:  # contiguous: one "chunk"
            offset = dsid.get_offset()
            if offset is None:
                return None
            chunk_len, offsets = dataset.size, np.array([offset], dtype=np.int64)
        else:
            chunk_len = dataset.chunks[0]
            n_chunks = -(-dataset.size // chunk_len)
            offsets = np.full(n_chunks, -1, dtype=np.int64)
            try:
                def record(info):
                    offsets[info.chunk_offset[0] // chunk_len] = info.byte_offset
                dsid.chunk_iter(record)
            except (AttributeError, NotImplementedError, RuntimeError):  # older HDF5
                for i in range(dsid.get_num_chunks()):
                    info = dsid.get_chunk_info(i)
                    offsets[info.chunk_offset[0] // chunk_len] = info.byte_offset
            if (offsets < 0).any():
                return None
        if (offsets % itemsize).any():
            return None
        if offsets.max() + chunk_len * itemsize > os.path.getsize(path):
            return None
        try:
            return cls(path, dataset.dtype, chunk_len, offsets // itemsize)
        except (OSError, ValueError):  # a file that cannot be mapped: read through HDF5
            return None

    def ranges(self, lo: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The entries ``lo[i] : lo[i] + lengths[i]`` of the dataset for each ``i``, one
        after the other."""
        out = np.empty(int(lengths.sum()), dtype=self.file.dtype)
        _copy_ranges(self._entries, self.chunk_len, self.chunk_start,
                     np.ascontiguousarray(lo, dtype=np.int64),
                     np.ascontiguousarray(lengths, dtype=np.int64), out)
        return out


@njit(cache=True, nogil=True)
def _copy_ranges(entries, chunk_len, chunk_start, lo, lengths, out):
    """Copy the dataset's entries ``lo[i] : lo[i] + lengths[i]`` into ``out``, one range
    after the other, each as contiguous pieces (a range may run into the next chunk)."""
    o = 0
    for i in range(lo.size):
        entry, remaining = lo[i], lengths[i]
        while remaining > 0:
            chunk = entry // chunk_len
            within = entry - chunk * chunk_len
            piece = min(remaining, chunk_len - within)
            start = chunk_start[chunk] + within
            out[o : o + piece] = entries[start : start + piece]
            o += piece
            entry += piece
            remaining -= piece


class _RowReader:
    """Reads rows of a backed CSR matrix straight from its ``data`` and ``indices`` arrays.

    anndata's backed CSR indexing reads the whole matrix for an array of rows; here only
    the requested rows are read. Uncompressed HDF5 arrays (anndata's default) are read
    through a memory map of the file (:class:`_MappedArray`), which touches only the pages
    holding those rows. Otherwise (compressed, Zarr) spans covering the rows are read, rows
    whose ranges lie at most ``max_gap`` stored entries apart sharing one read (each read
    has a fixed cost, and HDF5 reads at least a whole chunk). The row pointers are read
    once and kept (8 bytes per row).
    """

    def __init__(self, group, shape, max_gap: int = 8_192, memory_map: bool = True):
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape, self.max_gap = shape, max_gap
        self.mapped = None
        if memory_map:
            mapped = (_MappedArray.create(self.data), _MappedArray.create(self.indices))
            self.mapped = mapped if None not in mapped else None

    def __call__(self, rows: np.ndarray) -> sp.csr_matrix:
        """``rows`` increasing and distinct (through a memory map: any rows, any order)."""
        lo, hi = self.indptr[rows], self.indptr[rows + 1]
        lengths = hi - lo
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        if self.mapped is not None:
            data, indices = (array.ranges(lo, lengths) for array in self.mapped)
            out = sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr),
                                shape=(rows.size, self.shape[1]))
            out.sort_indices()
            return out
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

    A backed CSR matrix is read range by range (:class:`_RowReader`), through a memory
    map where its arrays allow one; other backed matrices through their own indexing, in
    increasing row order as HDF5 needs.
    """
    if is_in_memory(matrix):
        return lambda rows: _to_csr(matrix[np.asarray(rows, dtype=np.int64)])
    group = _backed_csr_group(matrix)
    reader = _RowReader(group, matrix.shape) if group is not None else None
    if reader is not None and reader.mapped is not None:  # copies the rows as asked
        return lambda rows: reader(np.asarray(rows, dtype=np.int64))
    read_sorted = reader if reader is not None else lambda rows: _to_csr(matrix[rows])

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
