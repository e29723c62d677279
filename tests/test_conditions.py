"""Conditioning on several attributes: set-up checks, the registry, generation requests,
compositional guidance, the post-guidance filter, clusters as labels, a continuous covariate
with a known answer, and save/load of all of it."""

from __future__ import annotations

import math
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

from scldiff import LapDDPM

from .conftest import QUIET, small_pbmc
from .test_reliability import fingerprint

SMALL = {"n_latent": 4, "n_hidden": 32, "score_hidden": 32, "score_blocks": 1}


def _with_attributes(n_cells: int = 200, n_genes: int = 150, seed: int = 0):
    adata = small_pbmc(n_cells=n_cells, n_genes=n_genes)
    rng = np.random.default_rng(seed)
    adata.obs["condition"] = pd.Categorical(rng.choice(["ctrl", "stim"], adata.n_obs))
    adata.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2", "d3"], adata.n_obs))
    adata.obs["dose"] = rng.uniform(0.0, 10.0, adata.n_obs)
    return adata


SETUP = {"labels_key": "cell_type", "categorical_covariate_keys": ["condition", "donor"],
         "continuous_covariate_keys": ["dose"], "n_neighbors": 6, "n_lpe": 2}


@pytest.fixture(scope="module")
def attribute_model():
    scvi.settings.seed = 0
    adata = _with_attributes()
    LapDDPM.setup_anndata(adata, **SETUP)
    model = LapDDPM(adata, **SMALL)
    model.train(max_epochs_vae=3, max_epochs_diffusion=6, **QUIET)
    return model


def _set_obs(key, values):
    def corrupt(adata):
        adata.obs[key] = values(adata)
    return corrupt


BAD = {
    "missing column": (lambda a: None, {"categorical_covariate_keys": ["batch"]},
                       ValueError, r"'batch' is not a column of adata.obs"),
    "NaN in a categorical": (_set_obs("condition", lambda a: pd.Categorical(
        [None] + list(a.obs["condition"][1:]))), {}, ValueError,
        r"adata.obs\['condition'\] has 1 missing values"),
    "a category with one cell": (_set_obs("donor", lambda a: pd.Categorical(
        ["lone"] + ["d1"] * (a.n_obs - 1))), {}, ValueError,
        r"1 category of adata.obs\['donor'\] has a single cell \(\['lone'\]\)"),
    "NaN in a continuous": (_set_obs("dose", lambda a: np.r_[np.nan, a.obs["dose"][1:]]), {},
                            ValueError, r"adata.obs\['dose'\] has 1 missing or infinite"),
    "infinite continuous": (_set_obs("dose", lambda a: np.r_[np.inf, a.obs["dose"][1:]]), {},
                            ValueError, "missing or infinite"),
    "text as continuous": (lambda a: None, {"categorical_covariate_keys": ["donor"],
                                           "continuous_covariate_keys": ["condition"]},
                           ValueError, "must be numeric"),
    "constant continuous": (_set_obs("dose", lambda a: np.ones(a.n_obs)), {}, ValueError,
                            "same value in every cell"),
    "a column twice": (lambda a: None, {"categorical_covariate_keys": ["cell_type"]},
                       ValueError, r"\['cell_type'\] are given more than once"),
    "a string for a list": (lambda a: None, {"categorical_covariate_keys": "condition"},
                            TypeError, "must be a list"),
    "clusters and labels": (lambda a: None, {"cluster_labels": True}, ValueError,
                            "cluster_labels=True makes labels from clusters"),
    "bad resolution": (lambda a: None, {"labels_key": None, "cluster_labels": True,
                                        "cluster_resolution": 0}, ValueError,
                       "cluster_resolution must be a number > 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_attributes_raise_naming_the_problem_and_leave_the_anndata_unchanged(case):
    corrupt, kwargs, error, message = BAD[case]
    adata = _with_attributes(n_cells=80, n_genes=60)
    corrupt(adata)
    before = fingerprint(adata)
    with pytest.raises(error, match=message):
        LapDDPM.setup_anndata(adata, **{**SETUP, **kwargs})
    assert fingerprint(adata) == before


def test_every_attribute_is_registered_with_its_categories_or_its_range(attribute_model):
    model = attribute_model
    adata = model.adata
    assert model.attribute_keys == ["cell_type", "condition", "donor", "dose"]
    kinds = [a.kind for a in model.attributes]
    assert kinds == ["categorical"] * 3 + ["continuous"]
    assert list(model.attributes[1].categories) == ["ctrl", "stim"]
    assert list(model.attributes[2].categories) == ["d1", "d2", "d3"]
    dose = adata.obs["dose"].to_numpy()
    attribute = model.attributes[3]
    assert attribute.mean == pytest.approx(dose.mean())
    assert attribute.std == pytest.approx(dose.std())
    assert (attribute.low, attribute.high) == (pytest.approx(dose.min()),
                                               pytest.approx(dose.max()))
    # the networks' rows: codes, then the standardised covariate
    rows = model._collator().attributes
    codes = adata.obs["donor"].cat.codes.to_numpy()
    np.testing.assert_array_equal(rows[:, 2], codes)
    np.testing.assert_allclose(rows[:, 3], (dose - dose.mean()) / dose.std(), rtol=1e-5)
    # the networks: one embedding (and null token) per category, one covariate MLP
    score_net = model.module.score_net
    assert [e.num_embeddings for e in score_net.category_embeddings] == [
        len(model.label_categories) + 1, 3, 4]
    assert len(score_net.continuous_mlps) == 1
    assert model.module.decoder.n_categories == [len(model.label_categories), 2, 3]


def test_generate_from_a_dataframe_fills_and_records_every_attribute(attribute_model):
    model = attribute_model
    rows = pd.DataFrame({"cell_type": ["B cells", "B cells", None, "NK cells"],
                         "condition": ["stim", None, "ctrl", "ctrl"],
                         "dose": [2.5, np.nan, 7.0, np.nan]})
    seen = []
    handle = model.module.score_net.register_forward_hook(
        lambda m, args, out: seen.append(args[2].clone()))
    try:
        out = model.generate(conditions=rows, seed=0, progress_bar=False, guidance_scale=1.0)
    finally:
        handle.remove()
    assert out.n_obs == 4 and list(out.obs.columns) == [
        "cell_type", "condition", "donor", "dose", "synthetic"]
    for key in ("cell_type", "condition", "donor"):
        assert isinstance(out.obs[key].dtype, pd.CategoricalDtype)
        order = list(model.attributes[model.attribute_keys.index(key)].categories)
        assert list(out.obs[key].cat.categories) == [c for c in order
                                                     if c in set(out.obs[key])]
    assert out.obs["cell_type"].iloc[[0, 1, 3]].tolist() == ["B cells", "B cells", "NK cells"]
    assert out.obs["condition"].iloc[[0, 2, 3]].tolist() == ["stim", "ctrl", "ctrl"]
    np.testing.assert_allclose(out.obs["dose"].to_numpy(), [2.5, np.nan, 7.0, np.nan])
    # the diffusion saw exactly what was given: NaN where a value was left out (donor: never)
    guide = seen[-1]
    assert torch.isnan(guide[:, 2]).all()
    assert torch.isnan(guide[2, 0]) and torch.isnan(guide[1, 1]) and torch.isnan(guide[1, 3])
    assert not torch.isnan(guide[0, [0, 1, 3]]).any()
    info = out.uns["scldiff"]
    assert info["conditioned_on"] == ["cell_type", "condition", "dose"]
    assert info["attributes"] == model.attribute_keys and info["guidance"] == "joint"


def test_filled_categories_follow_the_training_cells_that_share_the_given_ones():
    from scldiff.model._attributes import Attribute, request_rows

    attributes = [Attribute("type", "categorical", ("a", "b")),
                  Attribute("condition", "categorical", ("x", "y"))]
    # training: type a with x 3 times as often as y; type b only with y
    table = {"codes": [[0, 0], [0, 1], [1, 1]], "counts": [300, 100, 50]}
    rows = pd.DataFrame({"type": ["a"] * 4000 + ["b"] * 100})
    request = request_rows(rows, None, None, attributes, table, np.random.default_rng(0), "type")
    filled = request.filled[:, 1]
    assert np.mean(filled[:4000] == 0) == pytest.approx(0.75, abs=0.02)
    assert (filled[4000:] == 1).all()
    assert np.isnan(request.guide[:, 1]).all() and request.unseen == []
    # a combination no training cell has is generated and reported
    rows = pd.DataFrame({"type": ["b"], "condition": ["x"]})
    request = request_rows(rows, None, None, attributes, table, np.random.default_rng(0), "type")
    assert request.unseen == ["type=b, condition=x"]
    # n_samples: the combinations' training proportions, exactly
    request = request_rows(None, None, 9, attributes, table, np.random.default_rng(0), "type")
    combos, counts = np.unique(request.guide, axis=0, return_counts=True)
    assert combos.tolist() == [[0, 0], [0, 1], [1, 1]] and counts.tolist() == [6, 2, 1]


def test_generation_requests_in_every_form_and_their_errors(attribute_model):
    model = attribute_model
    gen = lambda **kw: model.generate(seed=1, progress_bar=False, **kw)
    out = gen(conditions={("B cells", "stim", None, 4.0): 3, ("NK cells", None, "d2", None): 2})
    assert out.obs["cell_type"].tolist() == ["B cells"] * 3 + ["NK cells"] * 2
    assert out.obs["donor"].iloc[3:].tolist() == ["d2", "d2"]
    assert gen(labels={"B cells": 2}).obs["cell_type"].tolist() == ["B cells"] * 2
    with pytest.raises(ValueError, match=r"not attributes of the model: \['batch'\]"):
        gen(conditions=pd.DataFrame({"batch": ["a"]}))
    with pytest.raises(ValueError, match="give one per attribute, in the order"):
        gen(conditions={("B cells", "stim"): 2})
    with pytest.raises(ValueError, match=r"Unknown 'condition' value\(s\) \['treated'\]"):
        gen(conditions=pd.DataFrame({"condition": ["treated"]}))
    with pytest.raises(ValueError, match="must hold numbers"):
        gen(conditions=pd.DataFrame({"dose": ["high"]}))
    with pytest.raises(ValueError, match="Pass conditions alone"):
        gen(conditions=pd.DataFrame({"dose": [1.0]}), n_samples=3)
    with pytest.raises(ValueError, match=r"guidance_scale names \['batch'\], which are not"):
        gen(n_samples=2, guidance_scale={"batch": 2.0})
    with pytest.raises(ValueError, match=r"guidance_scale\['dose'\] must be a finite number"):
        gen(n_samples=2, guidance_scale={"dose": -1.0})
    with pytest.warns(UserWarning, match="outside the training range"):
        gen(conditions=pd.DataFrame({"dose": [50.0]}))
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="keep_fraction must be a number in"):
            gen(n_samples=2, keep_fraction=bad)


def test_compositional_guidance_is_recorded_and_warns_for_unseen_combinations():
    scvi.settings.seed = 0
    adata = _with_attributes(n_cells=160, n_genes=100)
    # no stimulated B cells in training
    keep = ~((adata.obs["cell_type"] == "B cells") & (adata.obs["condition"] == "stim"))
    adata = adata[keep.to_numpy()].copy()
    LapDDPM.setup_anndata(adata, labels_key="cell_type",
                          categorical_covariate_keys=["condition"], n_neighbors=6, n_lpe=0)
    model = LapDDPM(adata, **SMALL)
    model.train(max_epochs_vae=2, max_epochs_diffusion=2, **QUIET)
    with pytest.warns(UserWarning, match="Combinations no training cell has"):
        out = model.generate(conditions={("B cells", "stim"): 5}, seed=0, progress_bar=False,
                             guidance_scale={"cell_type": 2.0})
    info = out.uns["scldiff"]
    assert info["unseen_combinations"] == ["cell_type=B cells, condition=stim"]
    assert info["guidance"] == "compositional"
    assert info["guidance_scale"] == {"cell_type": 2.0, "condition": 1.0}
    assert out.obs["condition"].tolist() == ["stim"] * 5
    # the unseen combination's library sizes come from the group of all cells
    groups = model.library_model_.intercept.shape[0]
    assert groups == len(model.combinations_["codes"]) + 1


def test_keep_fraction_keeps_the_best_scored_candidates_of_each_request(attribute_model,
                                                                        monkeypatch):
    model = attribute_model
    module = model.module
    scored = {}

    def scorer(z, attributes):  # realness = the first latent coordinate
        scored["z"] = z
        return z[:, 0]

    monkeypatch.setattr(module.scorer, "forward", scorer)
    rows = pd.DataFrame({"cell_type": ["B cells"] * 3 + ["NK cells"] * 2,
                         "condition": "ctrl", "donor": "d1"})
    seen = {}
    original = module.sample_latents

    def sample(attributes, **kwargs):
        seen["n"] = attributes.shape[0]
        seen["z"] = original(attributes, **kwargs)
        return seen["z"]

    monkeypatch.setattr(module, "sample_latents", sample)
    out = model.generate(conditions=rows, seed=0, progress_bar=False, keep_fraction=0.3)
    assert seen["n"] == 5 * math.ceil(1 / 0.3)  # 4 candidates per requested cell
    assert out.obs["cell_type"].tolist() == rows["cell_type"].tolist()
    # the kept latents are each request's best candidates
    candidates = module.standardize(seen["z"])[:, 0].reshape(5, 4)
    best_b = torch.sort(candidates[:3].reshape(-1), descending=True).values[:3]
    best_nk = torch.sort(candidates[3:].reshape(-1), descending=True).values[:2]
    kept = []
    handle = module.decoder.register_forward_pre_hook(
        lambda m, args: kept.append(module.standardize(args[0])[:, 0].clone()))
    try:
        model.generate(conditions=rows, seed=0, progress_bar=False, keep_fraction=0.3)
    finally:
        handle.remove()
    torch.testing.assert_close(torch.cat(kept), torch.cat([best_b, best_nk]))


def test_the_scorer_learns_to_tell_real_from_generated_latents():
    from scldiff.module import RealnessScorer
    from scldiff.train import fit_scorer

    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 3, generator=g)
    fake = torch.randn(2000, 3, generator=g) * 0.4 + 1.0  # shifted and too narrow
    attributes = torch.zeros(2000, 1)
    scorer = RealnessScorer(3, [2], 0)
    accuracy = fit_scorer(scorer, real, fake, attributes, n_steps=300, generator=g)
    assert accuracy > 0.8
    with torch.no_grad():  # the real-looking of two points scores higher
        far, typical = scorer(torch.tensor([[1.0, 1.0, 1.0], [-1.5, -1.5, -1.5]]),
                              torch.zeros(2, 1))
    assert typical > far


def test_cluster_labels_are_leiden_clusters_of_the_graph_reused_and_trained_on():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=200, n_genes=150)
    del adata.obs["cell_type"]
    LapDDPM.setup_anndata(adata, cluster_labels=True, cluster_resolution=0.5, n_neighbors=8,
                          n_lpe=0)
    clusters = adata.obs["scldiff_cluster"]
    sizes = clusters.value_counts(sort=False).to_numpy()
    assert list(clusters.cat.categories) == [str(i) for i in range(len(sizes))]
    assert (np.diff(sizes) <= 0).all() and sizes.min() >= 2 and len(sizes) > 1
    assert adata.uns["scldiff_clusters"]["resolution"] == 0.5
    # on the graph's communities: most edge weight stays inside a cluster
    graph = sp.coo_matrix(adata.obsp["scldiff_connectivities"])
    codes = clusters.cat.codes.to_numpy()
    inside = graph.data[codes[graph.row] == codes[graph.col]].sum() / graph.data.sum()
    assert inside > 0.7
    model = LapDDPM(adata, **SMALL)
    assert model.labels_key == "scldiff_cluster" and model.label_categories == list(
        clusters.cat.categories)
    model.train(max_epochs_vae=2, max_epochs_diffusion=2, **QUIET)
    out = model.generate(n_samples=100, seed=0, progress_bar=False)
    expected = clusters[model.train_indices_].value_counts(normalize=True) * 100
    got = out.obs["scldiff_cluster"].value_counts().reindex(expected.index, fill_value=0)
    assert (np.abs(got.to_numpy() - expected.to_numpy()) < 1).all()
    # a second setup reuses the stored clusters (here edited: kept as edited); another
    # resolution recomputes them
    edited = adata.obs["scldiff_cluster"].copy()
    edited.iloc[0] = "1" if edited.iloc[0] == "0" else "0"
    adata.obs["scldiff_cluster"] = edited
    before = adata.obs["scldiff_cluster"].copy()
    LapDDPM.setup_anndata(adata, cluster_labels=True, cluster_resolution=0.5, n_neighbors=8,
                          n_lpe=0)
    pd.testing.assert_series_equal(adata.obs["scldiff_cluster"], before)
    LapDDPM.setup_anndata(adata, cluster_labels=True, cluster_resolution=2.0, n_neighbors=8,
                          n_lpe=0)
    assert adata.obs["scldiff_cluster"].nunique() > len(sizes)


def test_every_attribute_survives_save_and_load(attribute_model, tmp_path):
    model = attribute_model
    rows = pd.DataFrame({"cell_type": ["B cells", "NK cells"], "dose": [1.0, 9.0]})
    kw = {"conditions": rows, "seed": 5, "progress_bar": False, "keep_fraction": 0.5,
          "guidance_scale": {"cell_type": 2.0, "dose": 1.5}}
    first = model.generate(**kw)
    model.save(str(tmp_path / "m"), save_anndata=True)
    for adata in (False, None):
        loaded = LapDDPM.load(str(tmp_path / "m"), adata=adata)
        assert loaded.attributes == model.attributes
        assert loaded.combinations_ == model.combinations_
        again = loaded.generate(**kw)
        assert (again.X != first.X).nnz == 0
        pd.testing.assert_frame_equal(again.obs, first.obs)
    first.write_h5ad(tmp_path / "generated.h5ad")  # provenance and columns write as they are
    back = anndata.read_h5ad(tmp_path / "generated.h5ad")
    assert back.uns["scldiff"]["guidance_scale"]["dose"] == 1.5
    pd.testing.assert_frame_equal(back.obs, first.obs)
    registry = LapDDPM.load_registry(str(tmp_path / "m"))
    assert registry["setup_args"]["continuous_covariate_keys"] == ["dose"]


def test_a_continuous_covariate_with_a_known_smooth_effect_is_followed_between_values():
    """Synthetic cells whose expression is a known smooth function of a covariate x: gene
    proportions rho_g(x) ∝ exp(±x/2) for two halves of the genes, so that the log ratio of
    the halves' totals is about x. Trained on x in {0, 1, 3, 4} (no cell at 2), the generated
    cells follow it: at the training values as the model's own reconstructions of the cells
    do (the diffusion's target), and at 2 between its neighbours, near the truth."""
    scvi.settings.seed = 0
    rng = np.random.default_rng(0)
    n_genes, xs = 30, np.repeat([0.0, 1.0, 3.0, 4.0], 150)
    sign = np.where(np.arange(n_genes) < n_genes // 2, 0.5, -0.5)

    def cells(x: np.ndarray) -> np.ndarray:
        logits = sign[None, :] * x[:, None]
        rho = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return rng.poisson(rho * 300.0).astype(np.float32)

    def log_ratio(total) -> float:
        total = np.asarray(total, dtype=float)
        up, down = total[:, : n_genes // 2].sum(1) + 1, total[:, n_genes // 2:].sum(1) + 1
        return float(np.mean(np.log(up / down)))

    adata = anndata.AnnData(sp.csr_matrix(cells(xs)), obs=pd.DataFrame(
        {"x": xs}, index=[f"c{i}" for i in range(len(xs))]))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    LapDDPM.setup_anndata(adata, continuous_covariate_keys=["x"], n_neighbors=10, n_lpe=0)
    model = LapDDPM(adata, n_latent=2, n_hidden=32, score_hidden=64, score_blocks=2,
                    likelihood="poisson")
    model.train(max_epochs_vae=60, max_epochs_diffusion=150, **QUIET)

    def generated(x: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(conditions=pd.DataFrame({"x": [x] * 400}), seed=1,
                                 progress_bar=False, guidance_scale=1.0)
        return log_ratio(out.X.toarray())

    got = {x: generated(x) for x in (0.0, 1.0, 2.0, 3.0, 4.0)}
    assert all(np.diff(list(got.values())) > 0), got  # monotone, through the unseen value
    reconstructed = model.posterior_predictive_cells(seed=0).X.toarray()
    for x in (0.0, 1.0, 3.0, 4.0):
        assert abs(got[x] - log_ratio(reconstructed[xs == x])) < 0.3, (x, got)
    between = (got[2.0] - got[1.0]) / (got[3.0] - got[1.0])
    assert 0.25 < between < 0.75, got
    assert abs(got[2.0] - log_ratio(cells(np.full(4000, 2.0)))) < 0.6, got


def test_combination_index_finds_each_rows_combination_or_the_fallback():
    from scldiff.model._attributes import combination_index, combination_table

    rows = np.array([[2, 0], [0, 1], [2, 0], [1, 1]], dtype=np.float32)
    table = combination_table(rows, 2)
    assert table == {"codes": [[0, 1], [1, 1], [2, 0]], "counts": [1, 1, 2]}
    wanted = np.array([[2, 0], [0, 1], [3, 3], [1, 1], [0, 0]])
    np.testing.assert_array_equal(combination_index(wanted, table), [2, 0, 3, 1, 3])
    empty = combination_table(np.zeros((5, 0), np.float32), 0)
    assert empty == {"codes": [[]], "counts": [5]}
    np.testing.assert_array_equal(combination_index(np.zeros((3, 0)), empty), [0, 0, 0])


def test_singleton_clusters_join_their_strongest_neighbours_cluster():
    from scldiff.model._setup import merge_singletons

    # cells 0-2 form cluster 0, 3-5 cluster 1; cells 6 and 7 are singletons tied to each
    # other, 6 more weakly to cluster 0, 7 to nothing else; cell 8 is tied to cluster 1
    edges = {(0, 1): 1, (1, 2): 1, (3, 4): 1, (4, 5): 1, (6, 7): 2.0, (6, 0): 0.5,
             (8, 5): 1.0}
    rows, cols, weights = zip(*[(i, j, w) for (i, j), w in edges.items()], strict=True)
    graph = sp.coo_matrix((weights, (rows, cols)), shape=(9, 9))
    graph = (graph + graph.T).tocsr()
    codes = merge_singletons(np.array([0, 0, 0, 1, 1, 1, 2, 3, 4]), graph)
    np.testing.assert_array_equal(codes, [0, 0, 0, 1, 1, 1, 3, 3, 1])  # 6 and 7 together
    assert np.bincount(codes)[np.unique(codes)].min() >= 2


def test_labels_need_a_model_with_labels():
    from scldiff.model._attributes import Attribute, request_rows

    attributes = [Attribute("condition", "categorical", ("x", "y"))]
    table = {"codes": [[0], [1]], "counts": [5, 5]}
    with pytest.raises(ValueError, match="has no labels"):
        request_rows(None, {"x": 2}, None, attributes, table, np.random.default_rng(0), None)
