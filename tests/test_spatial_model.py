"""Spatial set-up and generation of tissue sections: the graph from coordinates, bad input,
``generate(spots=...)``, save and load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from anndata import AnnData

import scldiff

from .conftest import QUIET
from .test_spatial import visium_lattice


def tissue(n_rows: int = 14, n_cols: int = 40, n_genes: int = 40, seed: int = 0) -> AnnData:
    """A hexagonal section with three horizontal layers, layer-specific genes and a smooth
    gradient along x; raw Poisson counts."""
    xy, _ = visium_lattice(n_rows, n_cols)
    rng = np.random.default_rng(seed)
    layer = np.digitize(xy[:, 1], np.quantile(xy[:, 1], [1 / 3, 2 / 3]))
    base = rng.gamma(2.0, 1.0, size=(3, n_genes)) * 3
    gradient = np.sin(xy[:, :1] / xy[:, 0].max() * np.pi) * np.linspace(-1, 1, n_genes)
    counts = rng.poisson(base[layer] * np.exp(gradient)).astype(np.float32)
    obs = pd.DataFrame({"layer": pd.Categorical([f"L{k}" for k in layer])},
                       index=[f"spot{i}" for i in range(xy.shape[0])])
    adata = AnnData(sp.csr_matrix(counts), obs=obs)
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obsm["spatial"] = xy
    return adata


@pytest.fixture(scope="module")
def spatial_model():
    scvi.settings.seed = 0
    adata = tissue()
    scldiff.LapDDPM.setup_anndata(adata, labels_key="layer", spatial_key="spatial", n_lpe=6)
    model = scldiff.LapDDPM(adata, n_latent=6, n_hidden=32, score_hidden=32, score_blocks=2)
    model.train(max_epochs_vae=6, max_epochs_diffusion=10, **QUIET)
    return model


def test_setup_builds_the_tissue_graph_in_squidpy_layout():
    adata = tissue()
    scldiff.LapDDPM.setup_anndata(adata, spatial_key="spatial", n_lpe=4)
    connectivities = adata.obsp["spatial_connectivities"]
    degree = np.diff(connectivities.tocsr().indptr)
    assert degree.max() == 6 and degree.min() >= 2  # hexagonal: 6 inside, fewer at edges
    assert adata.obsp["spatial_distances"].nnz == connectivities.nnz
    assert adata.uns["spatial_neighbors"]["connectivities_key"] == "spatial_connectivities"
    # the model's graph is the tissue's (no expression edges), its LPE the tissue's modes
    assert (adata.obsp["scldiff_connectivities"] != connectivities).nnz == 0
    assert adata.uns["scldiff_graph"]["spatial"]["key"] == "spatial"
    lpe = adata.obsm["X_scldiff_lpe"]
    assert abs(np.corrcoef(lpe[:, 0], adata.obsm["spatial"][:, 0])[0, 1]) > 0.9  # smoothest
    with_expression = tissue()
    scldiff.LapDDPM.setup_anndata(with_expression, spatial_key="spatial", n_lpe=4,
                                  expression_edges=True, n_neighbors=5)
    assert with_expression.obsp["scldiff_connectivities"].nnz > connectivities.nnz
    np.testing.assert_allclose(with_expression.obsm["X_scldiff_lpe"], lpe, atol=1e-5)


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.obsm.pop("spatial"), "not in adata.obsm"),
    (lambda a: a.obsm["spatial"].__setitem__((3, 0), np.nan), "missing or infinite"),
    (lambda a: a.obsm["spatial"].__setitem__(4, a.obsm["spatial"][5]), "more than one spot"),
])
def test_bad_coordinates_are_refused_and_leave_the_anndata_alone(damage, message):
    adata = tissue()
    damage(adata)
    before = adata.copy()
    with pytest.raises(ValueError, match=message):
        scldiff.LapDDPM.setup_anndata(adata, spatial_key="spatial")
    assert list(adata.obsp.keys()) == [] and list(adata.uns.keys()) == []
    assert list(adata.obsm.keys()) == list(before.obsm.keys())


def test_spatial_arguments_are_checked():
    adata = tissue()
    for kwargs, message in (({"expression_edges": True}, "pass spatial_key"),
                            ({"spatial_key": "spatial", "spatial_graph": "hex"},
                             "spatial_graph must be"),
                            ({"spatial_key": "spatial", "spatial_neighbors": 0},
                             "spatial_neighbors")):
        with pytest.raises(ValueError, match=message):
            scldiff.LapDDPM.setup_anndata(adata, **kwargs)


def test_an_island_spot_is_joined_and_warned():
    adata = tissue()
    adata.obsm["spatial"][0] = [-1000.0, -1000.0]
    with pytest.warns(UserWarning, match="1 spot"):
        scldiff.LapDDPM.setup_anndata(adata, spatial_key="spatial", n_lpe=4)
    assert adata.obsp["spatial_connectivities"][0].nnz == 0  # squidpy's graph as computed
    assert adata.obsp["scldiff_connectivities"][0].nnz == 1  # the model's: joined


def test_generate_a_section_keeps_the_spots(spatial_model):
    adata = spatial_model.adata
    section = spatial_model.generate(seed=0, progress_bar=False)
    assert list(section.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(section.obsm["spatial"], adata.obsm["spatial"])
    assert (section.obsp["spatial_connectivities"]
            != adata.obsp["spatial_connectivities"]).nnz == 0
    assert section.obs["layer"].astype(str).tolist() == adata.obs["layer"].astype(str).tolist()
    assert section.uns["scldiff"]["noise_coupling"] == 0.5
    assert "spatial" in section.uns["scldiff"]["conditioned_on"]
    again = spatial_model.generate(seed=0, progress_bar=False)
    assert (again.X != section.X).nnz == 0
    other = spatial_model.generate(seed=0, noise_coupling=0.0, progress_bar=False)
    assert (other.X != section.X).nnz > 0


def test_generate_new_spots_and_missing_layers(spatial_model):
    adata = spatial_model.adata
    spots = AnnData(obs=pd.DataFrame(index=[f"new{i}" for i in range(30)]))
    spots.obsm["spatial"] = adata.obsm["spatial"][:30] + 7.0  # between training spots
    section = spatial_model.generate(spots=spots, seed=1, progress_bar=False)
    assert list(section.obs_names) == list(spots.obs_names)
    # no layer given: the nearest training spot's, for the decoder and library sizes
    assert section.obs["layer"].astype(str).tolist() == \
        adata.obs["layer"].astype(str).tolist()[:30]
    assert section.uns["scldiff"]["conditioned_on"] == ["spatial"]
    far = spots.copy()
    far.obsm["spatial"] = far.obsm["spatial"] + 1e5
    with pytest.warns(UserWarning, match="a guess that coarsens"):
        spatial_model.generate(spots=far, seed=1, progress_bar=False)


def test_section_requests_are_checked(spatial_model, trained_model):
    with pytest.raises(ValueError, match="no spots"):
        spatial_model.generate(spots=AnnData(obs=pd.DataFrame(index=[])))
    spots = AnnData(obs=pd.DataFrame(index=["a", "b"]))
    with pytest.raises(ValueError, match="no 'spatial'"):
        spatial_model.generate(spots=spots)
    spots.obsm["spatial"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="more than one spot"):
        spatial_model.generate(spots=spots)
    spots.obsm["spatial"] = np.eye(2)
    with pytest.raises(ValueError, match="Pass spots alone"):
        spatial_model.generate(spots=spots, n_samples=3)
    with pytest.raises(ValueError, match="keep_fraction"):
        spatial_model.generate(spots=spots, keep_fraction=0.5)
    with pytest.raises(ValueError, match="noise_coupling"):
        spatial_model.generate(spots=spots, noise_coupling=2.0)
    with pytest.raises(ValueError, match="spatial model"):
        trained_model.generate(spots=spots)
    # cells without positions: the position is null, the layers guide as before
    cells = spatial_model.generate(labels={"L0": 5}, seed=0, progress_bar=False)
    assert cells.n_obs == 5 and "spatial" not in cells.obsm


def test_save_and_load_generate_the_same_section(spatial_model, tmp_path):
    section = spatial_model.generate(seed=3, progress_bar=False)
    spatial_model.save(str(tmp_path / "m"), save_anndata=True)
    loaded = scldiff.LapDDPM.load(str(tmp_path / "m"))
    assert loaded.spatial_key == "spatial" and loaded.module.n_position == 6
    assert (loaded.generate(seed=3, progress_bar=False).X != section.X).nnz == 0
    bare = scldiff.LapDDPM.load(str(tmp_path / "m"), adata=False)
    with pytest.raises(ValueError, match="load the model with its AnnData"):
        bare.generate(seed=3)


def test_posterior_predictive_on_the_section(spatial_model):
    draws = spatial_model.posterior_predictive_cells(indices=np.arange(10), seed=0)
    assert draws.n_obs == 10
    assert draws.obs["source_cell"].tolist() == list(spatial_model.adata.obs_names[:10])


def test_the_position_has_its_own_compositional_scale(spatial_model):
    both = spatial_model.generate(seed=0, guidance_scale={"layer": 1.0}, progress_bar=False)
    assert both.uns["scldiff"]["guidance_scale"] == {"layer": 1.0, "spatial": 1.0}
    alone = spatial_model.generate(seed=0, guidance_scale={"layer": 1.0, "spatial": 0.0},
                                   progress_bar=False)
    assert alone.uns["scldiff"]["guidance_scale"] == {"layer": 1.0, "spatial": 0.0}
    assert (alone.X != both.X).nnz > 0
    with pytest.raises(ValueError, match="not attributes"):
        spatial_model.generate(seed=0, guidance_scale={"place": 1.0})
