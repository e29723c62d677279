"""LSI of chromatin accessibility against a hand computation: binarisation, TF-IDF, the SVD
with its first component dropped, new cells, save and load, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse as sp

from scldiff.graph import LSI, binarize_peaks

PEAKS = np.array([[2, 0, 1, 0, 0, 3, 0],
                  [0, 1, 1, 0, 4, 0, 0],
                  [1, 1, 0, 0, 0, 1, 1],
                  [0, 0, 0, 2, 1, 0, 1],
                  [1, 0, 1, 1, 0, 0, 0],
                  [0, 2, 0, 1, 1, 1, 0],
                  [3, 0, 0, 0, 1, 0, 2],
                  [0, 1, 1, 1, 0, 0, 1]], dtype=float)


def by_hand(train: np.ndarray, cells: np.ndarray, k: int) -> np.ndarray:
    """muon's tfidf(log_tf=True, log_idf=True) and an exact SVD, first component dropped,
    each component signed by its largest loading."""
    b = (train > 0).astype(float)
    idf = np.log1p(b.shape[0] / b.sum(0))
    tfidf = lambda x: np.log1p(1e4 * (x > 0) / (x > 0).sum(1, keepdims=True)) * idf  # noqa: E731
    _, _, vt = np.linalg.svd(tfidf(train), full_matrices=False)
    v = vt[1:k + 1].T
    v = v * np.sign(v[np.abs(v).argmax(0), np.arange(k)])
    return tfidf(cells) @ v


def test_binarize_peaks_makes_zero_one_and_refuses_what_is_not_counts():
    out = binarize_peaks(sp.csr_matrix(PEAKS))
    np.testing.assert_array_equal(out.toarray(), (PEAKS > 0).astype(np.float32))
    assert out.dtype == np.float32
    for bad in (-1.0, 0.5, np.nan):
        peaks = PEAKS.copy()
        peaks[0, 0] = bad
        with pytest.raises(ValueError, match="non-negative integers"):
            binarize_peaks(peaks)
    assert PEAKS[0, 0] == 2  # the input is left as it was


def test_lsi_matches_the_hand_computation_on_training_and_new_cells():
    lsi = LSI.fit(sp.csr_matrix(PEAKS), n_components=3)
    np.testing.assert_allclose(lsi.transform(PEAKS), by_hand(PEAKS, PEAKS, 3), atol=1e-4)
    new = np.array([[1, 1, 0, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0, 2]], dtype=float)
    np.testing.assert_allclose(lsi.transform(new), by_hand(PEAKS, new, 3), atol=1e-4)
    # counts and their 0/1 pattern embed alike: only accessibility counts
    np.testing.assert_allclose(lsi.transform(PEAKS), lsi.transform(PEAKS > 0), atol=1e-6)
    # the TF-IDF it projects, by hand: log TF times the training IDF
    b = (PEAKS > 0).astype(float)
    idf = np.log1p(8 / b.sum(0))
    expected = np.log1p(1e4 * (new > 0) / (new > 0).sum(1, keepdims=True)) * idf
    np.testing.assert_allclose(lsi.tfidf(new).toarray(), expected, rtol=1e-6)


def test_lsi_is_saved_as_plain_numbers_and_loaded_exactly():
    lsi = LSI.fit(PEAKS, n_components=2)
    values = json.loads(json.dumps(lsi.to_dict()))
    again = LSI.from_dict(values)
    np.testing.assert_array_equal(again.transform(PEAKS), lsi.transform(PEAKS))
    for broken in ({"idf": values["idf"]}, {**values, "components": [[1.0]]},
                   {**values, "idf": [float("nan")] * len(values["idf"])}):
        with pytest.raises(ValueError, match="saved LSI"):
            LSI.from_dict(broken)


def test_lsi_refuses_bad_input():
    lsi = LSI.fit(PEAKS, n_components=2)
    empty = PEAKS.copy()
    empty[3] = 0
    with pytest.raises(ValueError, match="no accessible peak"):
        LSI.fit(empty, n_components=2)
    with pytest.raises(ValueError, match="no accessible peak"):
        lsi.transform(empty)
    with pytest.raises(ValueError, match="fitted on 7"):
        lsi.transform(PEAKS[:, :5])
    for k in (0, 6, 2.5):
        with pytest.raises(ValueError, match="n_components"):
            LSI.fit(PEAKS, n_components=k)


def test_lsi_of_real_multiome_cells_drops_the_depth_component():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                        "multiome_pbmc10x_muon_subset.h5ad")
    if not os.path.exists(path):
        pytest.skip("../shared/data/multiome_pbmc10x_muon_subset.h5ad is absent")
    import anndata as ad
    from sklearn.utils.extmath import randomized_svd

    adata = ad.read_h5ad(path)
    peaks = adata[:, (adata.var["modality"] == "atac").to_numpy()].X
    keep = np.asarray((sp.csr_matrix(peaks) > 0).sum(1)).ravel() > 0
    peaks = sp.csr_matrix(peaks)[keep]
    lsi = LSI.fit(peaks, n_components=10)
    embedding = lsi.transform(peaks)
    assert embedding.shape == (peaks.shape[0], 10) and np.isfinite(embedding).all()
    # the dropped first component follows the number of open peaks more than any kept one
    depth = np.log(np.asarray((peaks > 0).sum(1)).ravel())
    x = binarize_peaks(peaks)
    tf = x.multiply(1e4 / np.asarray(x.sum(1))).tocsr()
    tf.data = np.log1p(tf.data)
    first = randomized_svd(sp.csr_matrix(tf @ sp.diags(lsi.idf)), 1, random_state=0)[0][:, 0]
    kept = max(abs(np.corrcoef(depth, embedding[:, j])[0, 1]) for j in range(10))
    assert abs(np.corrcoef(depth, first)[0, 1]) > kept
