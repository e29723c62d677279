"""Backed AnnData: setup, training batches and generation read the counts block by block."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import scvi

import scldiff
from scldiff.graph import SubgraphSampler, _matrix, knn_graph, log_normalize, pca_embedding
from scldiff.model._constants import ADATA_KEYS
from scldiff.module import BATCH_KEYS
from scldiff.train import SubgraphCollator

from .conftest import QUIET, small_pbmc


class Recorder:
    """A backed-like matrix (no ``toarray``, not a SciPy or NumPy type) that logs its reads.

    A read of all rows at once fails the test: that is what a backed file must not get.
    """

    def __init__(self, matrix: sp.csr_matrix):
        self.matrix, self.shape, self.reads = matrix, matrix.shape, []

    def __getitem__(self, key):
        rows = np.arange(self.shape[0])[key]
        assert rows.size < self.shape[0], "the whole matrix was read at once"
        if isinstance(key, np.ndarray):
            assert (np.diff(key) > 0).all(), "HDF5 needs increasing row indices"
        self.reads.append(rows.size)
        return self.matrix[key]


@pytest.fixture(scope="module")
def counts():
    return small_pbmc(300, 400).X.astype(np.float32).tocsr()


def test_row_helpers_read_the_same_rows_as_memory(counts, monkeypatch):
    monkeypatch.setattr(_matrix, "ROW_CHUNK", 64)
    backed = Recorder(counts)
    blocks = list(_matrix.row_chunks(backed))
    assert [b.shape[0] for b in blocks] == [64, 64, 64, 64, counts.shape[0] - 256]
    np.testing.assert_array_equal(sp.vstack(blocks).toarray(), counts.toarray())
    rows = np.array([250, 3, 17, 120, 4])  # not sorted: returned in this order
    np.testing.assert_array_equal(_matrix.row_reader(backed)(rows).toarray(),
                                  counts[rows].toarray())
    np.testing.assert_allclose(_matrix.row_sums(backed), np.asarray(counts.sum(1)).ravel())
    assert max(backed.reads) <= 64


def test_pca_of_a_backed_matrix_equals_the_in_memory_one(counts, monkeypatch):
    monkeypatch.setattr(_matrix, "ROW_CHUNK", 50)
    backed = Recorder(counts)
    expected = pca_embedding(counts, n_pcs=10, n_top_genes=150)
    got = pca_embedding(backed, n_pcs=10, n_top_genes=150)
    assert len(backed.reads) == 2 * 6  # two passes (gene variances, then the chosen genes)
    # ARPACK on the same matrix; components are defined up to sign
    signs = np.sign((expected * got).sum(0))
    np.testing.assert_allclose(got * signs, expected, rtol=1e-3, atol=1e-4)


def test_backed_minibatches_equal_the_in_memory_ones(counts, monkeypatch):
    monkeypatch.setattr(_matrix, "ROW_CHUNK", 100)
    embedding = pca_embedding(counts, n_pcs=10)
    graph = knn_graph(embedding, n_neighbors=5)
    labels = np.arange(counts.shape[0]) % 3
    lpe = np.random.default_rng(0).normal(size=(counts.shape[0], 4)).astype(np.float32)
    sampler = SubgraphSampler(graph, n_hops=2)
    memory = SubgraphCollator(counts, labels, lpe, sampler)
    backed = Recorder(counts)
    disk = SubgraphCollator(backed, labels, lpe, sampler)
    assert disk.inputs is None and memory.inputs is not None  # read per minibatch, or kept
    np.testing.assert_array_equal(disk.library, memory.library)
    seeds = [200, 5, 77, 31]
    a, b = memory(seeds), disk(seeds)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    assert backed.reads[-1] < counts.shape[0]  # only the subgraph's rows
    # the encoding pass: subgraphs without expression, and the inputs block by block
    a, b = memory.graph_batch(seeds), disk.graph_batch(seeds)
    assert a.keys() == b.keys() and BATCH_KEYS.NODE_INPUT not in a
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    np.testing.assert_array_equal(a[BATCH_KEYS.NODES].numpy(), sampler(seeds).nodes)
    backed.reads.clear()
    blocks = list(disk.input_blocks())
    assert backed.reads == [100, 100, counts.shape[0] - 200]  # in order, a block at a time
    inputs = sp.vstack(blocks)
    np.testing.assert_array_equal(inputs.toarray(), sp.vstack(list(memory.input_blocks()))
                                  .toarray())
    np.testing.assert_allclose(inputs.toarray(), log_normalize(counts).toarray())


def test_a_backed_anndata_gives_the_graph_and_model_of_the_in_memory_one(tmp_path,
                                                                         monkeypatch):
    adata = small_pbmc(200, 300)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    # the file's counts are read in blocks of rows or a minibatch's rows, never as one
    # slice of all rows (a minibatch's subgraph may cover all of so few cells)
    monkeypatch.setattr(_matrix, "ROW_CHUNK", 64)
    dataset = type(backed.X)
    read = dataset.__getitem__

    def read_a_block(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice):
            assert np.arange(self.shape[0])[rows].size < self.shape[0], "read whole"
        return read(self, key)

    monkeypatch.setattr(dataset, "__getitem__", read_a_block)
    models = []
    for data in (adata, backed):
        scldiff.LapDDPM.setup_anndata(data, labels_key="cell_type", n_neighbors=5, n_lpe=4)
        scvi.settings.seed = 0
        model = scldiff.LapDDPM(data, n_latent=4, n_hidden=16, score_hidden=16,
                                score_blocks=1)
        model.train(max_epochs_vae=1, max_epochs_diffusion=1, **QUIET)
        models.append(model)
    assert isinstance(backed.X, anndata.abc.CSRDataset)  # still on disk
    np.testing.assert_array_equal(backed.obsp[ADATA_KEYS.GRAPH].toarray(),
                                  adata.obsp[ADATA_KEYS.GRAPH].toarray())
    np.testing.assert_allclose(np.abs(backed.obsm[ADATA_KEYS.LPE]),
                               np.abs(adata.obsm[ADATA_KEYS.LPE]), atol=1e-5)
    np.testing.assert_allclose(models[1].get_latent_representation(),
                               models[0].get_latent_representation(), rtol=1e-4, atol=1e-5)
    generated = models[1].generate(n_samples=20, seed=0, progress_bar=False)
    assert generated.shape == (20, adata.n_vars)
    # saved with its AnnData, and loaded onto the backed file again
    models[1].save(tmp_path / "model", save_anndata=True)
    monkeypatch.undo()
    loaded = scldiff.LapDDPM.load(tmp_path / "model",
                                  adata=anndata.read_h5ad(tmp_path / "a.h5ad", backed="r"))
    assert loaded.adata.isbacked
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  models[1].get_latent_representation())


def test_rows_of_a_backed_csr_file_are_read_range_by_range(tmp_path, monkeypatch):
    adata = small_pbmc(200, 300)
    x = adata.X.astype(np.float32).tocsr()
    x[7] = 0  # an empty row
    x.eliminate_zeros()
    adata.X = x
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    # anndata's own indexing reads the whole matrix for an array of rows: not used
    monkeypatch.setattr(type(backed.X), "__getitem__",
                        lambda self, key: pytest.fail("read through anndata's indexing"))
    read = _matrix.row_reader(backed.X)
    for rows in ([5, 6, 7, 8, 150, 3, 199, 0], [7], list(range(200))[::-1], []):
        rows = np.asarray(rows, dtype=np.int64)
        got = read(rows)
        assert got.dtype == np.float32 and got.has_sorted_indices
        np.testing.assert_array_equal(got.toarray(), x[rows].toarray())


@pytest.mark.parametrize("layout", ["anndata", "small chunks", "contiguous", "gzip"])
def test_backed_rows_through_a_memory_map_equal_hdf5_reads(tmp_path, layout):
    """Uncompressed arrays are read through a memory map of the file's chunks; rows that
    run across a chunk boundary, a contiguous layout and float64 values included.
    Compressed arrays fall back to HDF5 reads."""
    import h5py

    adata = small_pbmc(200, 300)
    x = adata.X.astype(np.float32).tocsr()
    x[7] = 0
    x.eliminate_zeros()
    adata.X = x
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path, compression="gzip" if layout == "gzip" else None)
    if layout in ("small chunks", "contiguous"):
        with h5py.File(path, "r+") as f:
            for key, values in (("data", x.data.astype(np.float64)), ("indices", x.indices)):
                del f["X"][key]
                chunks = (7,) if layout == "small chunks" else None
                f["X"].create_dataset(key, data=values, chunks=chunks)
    if layout == "anndata":  # a file size that is not a whole number of entries
        with open(path, "ab") as handle:
            handle.write(b"\0" * 3)
    backed = anndata.read_h5ad(path, backed="r")
    reader = _matrix._RowReader(_matrix._backed_csr_group(backed.X), backed.shape)
    assert (reader.mapped is None) == (layout == "gzip")
    if layout == "small chunks":
        assert reader.mapped[0].chunk_len == 7
    hdf5 = _matrix._RowReader(_matrix._backed_csr_group(backed.X), backed.shape,
                              memory_map=False)
    rng = np.random.default_rng(0)
    for rows in (np.arange(200), np.array([7]), np.array([], dtype=np.int64),
                 np.sort(rng.choice(200, 60, replace=False))):
        got = reader(rows)
        assert got.dtype == np.float32 and got.has_sorted_indices
        np.testing.assert_array_equal(got.toarray(), x[rows].toarray())
        np.testing.assert_array_equal(hdf5(rows).toarray(), x[rows].toarray())
    # through row_reader, rows in any order: the memory map copies them as asked, HDF5
    # reads them sorted and puts them back in order
    read = _matrix.row_reader(backed.X)
    for rows in (rng.permutation(200), rng.choice(200, 60, replace=False)[::-1].copy()):
        got = read(rows)
        assert got.dtype == np.float32 and got.has_sorted_indices
        np.testing.assert_array_equal(got.toarray(), x[rows].toarray())
