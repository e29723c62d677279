"""Plots draw what they say and write the file they are given."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from anndata import AnnData  # noqa: E402

import scldiff  # noqa: E402


def toy(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b"])[rng.integers(0, 2, n)]
    rates = np.where((labels == "a")[:, None], 4.0, 1.0) * np.linspace(0.1, 3, 40)[None, :]
    adata = AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(40)]
    adata.obs_names = [f"c{seed}_{i}" for i in range(n)]
    adata.obs["cell_type"] = pd.Categorical(labels)
    return adata


def test_plots_write_files(tmp_path):
    real, gen = toy(120, 0), toy(100, 1)
    fig = scldiff.pl.mean_variance(real, gen, path=tmp_path / "mv.png")
    # one point cloud per set, at (gene mean, gene variance)
    clouds = fig.axes[0].collections
    assert len(clouds) == 2
    x = real.X.toarray()
    np.testing.assert_allclose(clouds[0].get_offsets()[:, 0], x.mean(0), rtol=1e-5)
    fig = scldiff.pl.zeros_per_cell(real, gen, labels_key="cell_type", path=tmp_path / "z.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]
    scldiff.pl.zeros_per_cell(real, gen, path=tmp_path / "z1.png")
    scldiff.pl.real_vs_generated_umap(real, gen, "cell_type", path=tmp_path / "umap.png")
    for name in ("mv.png", "z.png", "z1.png", "umap.png"):
        assert (tmp_path / name).stat().st_size > 1000
