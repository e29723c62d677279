"""LapDDPM end to end: setup, bad input, generation output, save/load, unconditional."""

import json
import os
import pickle

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import scvi
import torch

import scldiff
from scldiff import LapDDPM, ModelFileError

from .conftest import QUIET, small_pbmc


def snapshot(adata):
    """Everything a failed setup must leave untouched."""
    x = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return (x, adata.obs.copy(), sorted(adata.uns), sorted(adata.obsm), sorted(adata.obsp),
            sorted(adata.layers))


def assert_unchanged(adata, before):
    after = snapshot(adata)
    np.testing.assert_array_equal(np.nan_to_num(before[0], nan=-7), np.nan_to_num(after[0],
                                                                                 nan=-7))
    pd.testing.assert_frame_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_setup_anndata_stores_and_reuses_the_graph(pbmc_small):
    LapDDPM.setup_anndata(pbmc_small, labels_key="cell_type", n_neighbors=10, n_lpe=6)
    graph = pbmc_small.obsp["scldiff_connectivities"]
    assert graph.shape == (pbmc_small.n_obs,) * 2 and abs(graph - graph.T).max() == 0
    assert pbmc_small.obsm["X_scldiff_lpe"].shape == (pbmc_small.n_obs, 6)
    assert pbmc_small.uns["scldiff_graph"]["n_neighbors"] == 10
    LapDDPM.setup_anndata(pbmc_small, labels_key="cell_type", n_neighbors=10, n_lpe=6)
    assert pbmc_small.obsp["scldiff_connectivities"] is graph  # reused, not rebuilt
    LapDDPM.setup_anndata(pbmc_small, labels_key="cell_type", n_neighbors=12, n_lpe=6)
    assert pbmc_small.obsp["scldiff_connectivities"] is not graph
    assert (np.diff(pbmc_small.obsp["scldiff_connectivities"].indptr) >= 12).all()


def _non_integer(a):
    a.X = a.X.astype(np.float32)
    a.X.data[0] = 0.5


def _log_normalized(a):
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)


def _negative(a):
    a.X.data[3] = -2.0


def _nan(a):
    a.X.data[5] = np.nan


def _inf(a):
    a.X.data[5] = np.inf


def _empty_cell(a):
    a.X = sp.csr_matrix(a.X)
    a.X[4] = 0
    a.X.eliminate_zeros()


@pytest.mark.parametrize("corrupt,message", [
    (_non_integer, "non-integer"),
    (_log_normalized, "non-integer"),
    (_negative, "negative"),
    (_nan, "NaN"),
    (_inf, "infinite"),
    (_empty_cell, "no counts"),
])
def test_bad_counts_raise_and_leave_adata_unchanged(pbmc_small, corrupt, message):
    corrupt(pbmc_small)
    before = snapshot(pbmc_small)
    with pytest.raises(ValueError, match=message):
        LapDDPM.setup_anndata(pbmc_small, labels_key="cell_type")
    assert_unchanged(pbmc_small, before)


def test_bad_labels_and_sizes_raise_and_leave_adata_unchanged(pbmc_small):
    before = snapshot(pbmc_small)
    with pytest.raises(ValueError, match="not a column of adata.obs"):
        LapDDPM.setup_anndata(pbmc_small, labels_key="celltype")
    with pytest.raises(ValueError, match="not in adata.layers"):
        LapDDPM.setup_anndata(pbmc_small, layer="raw_counts")
    with pytest.raises(ValueError, match="too few for a 15-nearest-neighbour graph"):
        LapDDPM.setup_anndata(pbmc_small[:12].copy(), labels_key="cell_type")
    with pytest.raises(ValueError, match="smaller n_lpe"):
        LapDDPM.setup_anndata(pbmc_small, n_lpe=pbmc_small.n_obs)
    assert_unchanged(pbmc_small, before)
    pbmc_small.obs["with_nan"] = pbmc_small.obs["cell_type"].astype(object)
    pbmc_small.obs.iloc[3, pbmc_small.obs.columns.get_loc("with_nan")] = np.nan
    before = snapshot(pbmc_small)
    with pytest.raises(ValueError, match="1 missing values"):
        LapDDPM.setup_anndata(pbmc_small, labels_key="with_nan")
    assert_unchanged(pbmc_small, before)


def test_generate_returns_a_well_formed_anndata(trained_model, tmp_path):
    synth = trained_model.generate(labels={"B cells": 30, "Megakaryocytes": 5},
                                   guidance_scale=2.0, seed=0, progress_bar=False)
    assert isinstance(synth.X, sp.csr_matrix)
    assert (synth.X.data == np.round(synth.X.data)).all() and synth.X.data.min() > 0
    assert (synth.layers["counts"] != synth.X).nnz == 0
    assert synth.layers["counts"] is not synth.X
    for name in ("data", "indices", "indptr"):  # edits of X stay in X
        assert not np.shares_memory(getattr(synth.layers["counts"], name), getattr(synth.X, name))
    assert synth.X.dtype == np.float32
    assert list(synth.var_names) == list(trained_model.adata.var_names)
    labels = synth.obs["cell_type"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == ["B cells", "Megakaryocytes"]  # the requested ones
    assert labels.value_counts()[["B cells", "Megakaryocytes"]].tolist() == [30, 5]
    assert synth.obs["synthetic"].all() and synth.obs_names.is_unique
    info = synth.uns["scldiff"]
    assert info["seed"] == 0 and info["guidance_scale"] == 2.0 and info["sampler"] == "ode"
    assert info["scldiff_version"] == scldiff.__version__
    synth.write_h5ad(tmp_path / "synth.h5ad")
    back = anndata.read_h5ad(tmp_path / "synth.h5ad")
    assert (back.X != synth.X).nnz == 0 and back.uns["scldiff"]["sampler"] == "ode"
    pd.testing.assert_frame_equal(back.obs, synth.obs)


def test_generated_cells_go_through_scanpy_with_the_real_ones(trained_model):
    real = trained_model.adata
    synth = trained_model.generate(n_samples=200, seed=1, progress_bar=False)
    both = sc.concat({"real": real, "synthetic": synth}, label="origin", index_unique="-")
    assert both.n_obs == real.n_obs + 200 and both.n_vars == real.n_vars
    sc.pp.normalize_total(both)
    sc.pp.log1p(both)
    sc.pp.pca(both, n_comps=10)
    sc.pp.neighbors(both)
    sc.tl.umap(both)
    assert both.obsm["X_umap"].shape == (both.n_obs, 2)
    assert np.isfinite(both.obsm["X_umap"]).all()
    assert synth.X.data.max() == synth.layers["counts"].data.max()  # X and counts not shared


def test_generate_in_several_batches(trained_model):
    labels = ["B cells", "Megakaryocytes", "B cells", "NK cells"] * 10
    synth = trained_model.generate(labels=labels, batch_size=16, seed=3, progress_bar=False)
    again = trained_model.generate(labels=labels, batch_size=16, seed=3, progress_bar=False)
    assert isinstance(synth.X, sp.csr_matrix) and synth.X.dtype == np.float32
    assert synth.shape == (40, trained_model.adata.n_vars) and synth.X.has_canonical_format
    assert synth.obs["cell_type"].astype(str).tolist() == labels  # rows stay in order
    assert (synth.X != again.X).nnz == 0
    assert (synth.layers["counts"] != synth.X).nnz == 0


def test_generate_records_its_batch_size(trained_model):
    synth = trained_model.generate(n_samples=20, seed=0, progress_bar=False)
    assert synth.uns["scldiff"]["batch_size"] == 4096  # a CPU's default
    synth = trained_model.generate(n_samples=20, batch_size=7, seed=0, progress_bar=False)
    assert synth.uns["scldiff"]["batch_size"] == 7


def test_default_generation_batch_follows_the_gpu_memory(monkeypatch):
    from types import SimpleNamespace

    from scldiff.model._generation import default_generation_batch

    assert default_generation_batch(torch.device("cpu"), 13_713) == 4096
    gib = 2**30
    for memory, expected in ((80 * gib, 15_360),  # an 80 GB card: PBMC3K's 10k in one batch
                             (8 * gib, 1024),  # 1,528 cells fit: rounded down to 1,024
                             (gib // 4, 1024),  # never below 1,024
                             (4096 * gib, 65_536)):  # never above 65,536
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, memory=memory: SimpleNamespace(total_memory=memory))
        assert default_generation_batch(torch.device("cuda"), 13_713) == expected
    # an eighth of the memory at 48 bytes per (cell, gene) entry
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=24 * gib))
    cells = 24 * gib // 8 // (2000 * 48)
    assert default_generation_batch(torch.device("cuda"), 2000) == cells // 1024 * 1024


def test_generate_under_bf16_autocast(trained_model):
    """The networks run in bf16 under autocast; the counts stay well-formed and close."""
    kw = dict(n_samples=1000, progress_bar=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = trained_model.generate(seed=4, **kw)
    exact = trained_model.generate(seed=4, **kw)
    assert mixed.X.dtype == np.float32 and (mixed.X.data == np.round(mixed.X.data)).all()
    assert mixed.obs["cell_type"].tolist() == exact.obs["cell_type"].tolist()
    # the same libraries; the draws part ways at the first entry that flips, so compare
    # the totals and the genes' mean profile, against two float32 draws of other seeds:
    # bf16 may not move the profile more than sampling does (correlations ~0.97 at 1,000
    # cells, ~0.92 at 300)
    assert abs(mixed.X.sum() / exact.X.sum() - 1) < 0.03
    other = trained_model.generate(seed=104, **kw)
    profile = {name: np.log1p(np.asarray(x.X.mean(0)).ravel())
               for name, x in (("mixed", mixed), ("exact", exact), ("other", other))}
    sampling = np.corrcoef(profile["other"], profile["exact"])[0, 1]
    assert np.corrcoef(profile["mixed"], profile["exact"])[0, 1] > sampling - 0.01
    # precision="bfloat16" is that autocast, and the provenance records either
    asked = trained_model.generate(seed=4, precision="bfloat16", **kw)
    assert (asked.X != mixed.X).nnz == 0 and (asked.X != exact.X).nnz > 0
    assert asked.uns["scldiff"]["precision"] == "bfloat16"
    assert mixed.uns["scldiff"]["precision"] == "bfloat16"
    assert exact.uns["scldiff"]["precision"] == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 asked: the caller's rules
        assert trained_model.generate(seed=4, precision="float32", **kw
                                      ).uns["scldiff"]["precision"] == "bfloat16"
    assert not torch.is_autocast_enabled("cpu")  # the model's autocast ended with the call
    for bad in ("bf16", "float16", None, ["float32"]):
        with pytest.raises(ValueError, match="precision must be one of"):
            trained_model.generate(precision=bad, **kw)


def test_generate_leaves_torch_global_state_alone(trained_model):
    # a library call: torch's global generator, thread count, autocast and deterministic
    # algorithms are as the caller left them (the draws come from generate's own generators)
    torch.manual_seed(123)
    rng_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    for precision in ("float32", "bfloat16"):
        trained_model.generate(n_samples=600, seed=1, progress_bar=False, precision=precision)
        trained_model.posterior_predictive_cells(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert not torch.is_autocast_enabled("cpu")


def test_generate_label_arguments(trained_model):
    gen = lambda **kw: trained_model.generate(seed=0, progress_bar=False, **kw)
    seq = gen(labels=["NK cells", "B cells", "NK cells"])
    assert seq.obs["cell_type"].tolist() == ["NK cells", "B cells", "NK cells"]
    default = gen(n_samples=100)
    table = trained_model.combinations_  # one categorical attribute: its codes and counts
    props = np.zeros(len(trained_model.label_categories))
    props[np.asarray(table["codes"])[:, 0]] = table["counts"]
    props /= props.sum()
    counts = default.obs["cell_type"].value_counts().reindex(trained_model.label_categories)
    assert counts.sum() == 100 and (np.abs(counts.to_numpy() - 100 * props) < 1).all()
    assert gen().n_obs == len(trained_model.train_indices_)
    with pytest.raises(ValueError, match=r"Unknown 'cell_type' value\(s\) \['T cells'\]"):
        gen(labels={"T cells": 3})
    with pytest.raises(ValueError, match="Unknown 'cell_type'"):
        gen(labels=["B cells", "nope"])
    with pytest.raises(ValueError, match="must be positive"):
        gen(labels={"B cells": 0})
    with pytest.raises(ValueError, match="must be positive"):
        gen(labels={"B cells": -2})
    with pytest.raises(TypeError, match="must be an integer"):
        gen(labels={"B cells": 2.5})
    with pytest.raises(TypeError, match="mapping"):
        gen(labels="B cells")
    with pytest.raises(TypeError, match="mapping"):
        gen(labels=5)
    with pytest.raises(ValueError, match="either labels or n_samples"):
        gen(labels={"B cells": 2}, n_samples=3)
    with pytest.raises(ValueError, match="sampler"):
        gen(n_samples=3, sampler="euler")
    with pytest.raises(ValueError, match="guidance_scale"):
        gen(n_samples=3, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        gen(n_samples=3, guidance_interval=(0.8, 0.2))


@pytest.mark.parametrize("sampler", ["ode", "ddim", "sde"])
def test_every_sampler_generates_plausible_libraries(trained_model, sampler):
    synth = trained_model.generate(n_samples=100, sampler=sampler, n_steps=20, seed=0,
                                   progress_bar=False)
    real = np.median(np.asarray(trained_model.adata.X.sum(1)).ravel())
    generated = np.median(np.asarray(synth.X.sum(1)).ravel())
    assert 0.5 * real < generated < 2 * real


def test_generated_libraries_follow_each_labels_training_libraries(trained_model):
    adata = trained_model.adata
    train = np.asarray(trained_model.train_indices_)
    library = np.asarray(adata.X[train].sum(1)).ravel()
    labels = adata.obs["cell_type"].to_numpy()[train]
    for label in ("CD4 T cells", "B cells"):
        real = library[labels == label]
        synth = trained_model.generate(labels={label: 2000}, seed=1, progress_bar=False,
                                       library_size="label")
        generated = np.asarray(synth.X.sum(1)).ravel()
        # the ZINB's totals concentrate on the drawn library (its own mean): their quantiles
        # follow the label's training libraries within a few percent
        for q in (0.25, 0.5, 0.75):
            assert abs(np.quantile(generated, q) / np.quantile(real, q) - 1) < 0.06, (label, q)
        # within the training range, but for the count noise of the totals around the
        # drawn library (the log-normal fit's draws reached 1.39 times the largest in a check)
        assert generated.min() >= 0.7 * real.min() and generated.max() <= 1.3 * real.max()
    assert synth.uns["scldiff"]["library_size"] == "label"


def test_same_seed_same_counts_and_different_seed_different_counts(trained_model):
    kw = dict(labels={"CD4 T cells": 20, "B cells": 10}, progress_bar=False)
    a, b = trained_model.generate(seed=3, **kw), trained_model.generate(seed=3, **kw)
    c = trained_model.generate(seed=4, **kw)
    assert (a.X != b.X).nnz == 0
    assert (a.X != c.X).nnz > 0


def test_guidance_interval_that_holds_no_step_samples_the_conditional_model(trained_model):
    kw = dict(labels={"B cells": 20, "NK cells": 20}, seed=5, progress_bar=False)
    # the ODE's times run from 1 down to t_min = 0.001 > 0: (0, 0) guides none of them
    unguided = trained_model.generate(guidance_scale=4.0, guidance_interval=(0, 0), **kw)
    conditional = trained_model.generate(guidance_scale=1.0, **kw)
    assert (unguided.X != conditional.X).nnz == 0
    assert list(unguided.uns["scldiff"]["guidance_interval"]) == [0.0, 0.0]
    # every step inside: the same as no interval
    everywhere = trained_model.generate(guidance_scale=4.0, guidance_interval=(0, 1), **kw)
    guided = trained_model.generate(guidance_scale=4.0, **kw)
    assert (everywhere.X != guided.X).nnz == 0
    assert (guided.X != conditional.X).nnz > 0
    assert list(guided.uns["scldiff"]["guidance_interval"]) == [0.0, 1.0]


def test_save_load_generate_gives_identical_counts(trained_model, tmp_path):
    path = str(tmp_path / "model")
    trained_model.save(path, save_anndata=True)
    assert sorted(os.listdir(path)) == ["adata.h5ad", "model.json", "model.safetensors"]
    loaded = LapDDPM.load(path)
    kw = dict(labels={"B cells": 15, "NK cells": 15}, guidance_scale=1.5, seed=11,
              progress_bar=False)
    assert (trained_model.generate(**kw).X != loaded.generate(**kw).X).nnz == 0
    for key in trained_model.history:
        pd.testing.assert_frame_equal(trained_model.history[key], loaded.history[key],
                                      check_dtype=False)
    np.testing.assert_allclose(trained_model.get_latent_representation(),
                               loaded.get_latent_representation(), atol=1e-5)
    without_data = LapDDPM.load(path, adata=False)
    assert without_data.adata is None
    assert (without_data.generate(**kw).X != loaded.generate(**kw).X).nnz == 0
    with pytest.raises(ValueError, match="already exists"):
        trained_model.save(path)
    trained_model.save(path, overwrite=True)
    assert sorted(os.listdir(path)) == ["model.json", "model.safetensors"]


class _WriteMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_refuses_a_pickle_payload_and_never_runs_it(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(str(path))
    marker = tmp_path / "marker"
    with open(path / "model.safetensors", "wb") as handle:
        pickle.dump({"state": _WriteMarker(str(marker))}, handle)
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        LapDDPM.load(str(path), adata=False)
    assert not marker.exists()


def test_load_refuses_tampered_metadata_and_mismatched_weights(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(str(path))
    meta = (path / "model.json").read_text()
    (path / "model.json").write_text(meta.replace('"n_latent": 8', '"n_latent": 9'))
    with pytest.raises(ModelFileError, match="do not fit"):
        LapDDPM.load(str(path), adata=False)
    (path / "model.json").write_text(meta[: len(meta) // 2])
    with pytest.raises(ModelFileError, match="not valid scldiff model metadata"):
        LapDDPM.load(str(path), adata=False)
    (path / "model.json").write_text(meta.replace('"dtype": "<i8"', '"dtype": "|O"', 1))
    with pytest.raises(ModelFileError):
        LapDDPM.load(str(path), adata=False)
    with pytest.raises(ModelFileError, match="not an scldiff model directory"):
        LapDDPM.load(str(tmp_path / "nothing"))


def test_load_refuses_a_file_of_another_format_version(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(str(path))
    meta = json.loads((path / "model.json").read_text())
    assert meta["format_version"] == 2
    for version in (1, 3, None):
        (path / "model.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(ModelFileError, match="saved by another version of scldiff"):
            LapDDPM.load(str(path), adata=False)
    del meta["library_model_"]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="lacks 'library_model_'"):
        LapDDPM.load(str(path), adata=False)


def test_load_checks_genes(trained_model, tmp_path):
    path = str(tmp_path / "model")
    trained_model.save(path)
    adata = trained_model.adata[:, 5:].copy()
    with pytest.raises(ValueError, match="5 missing"):
        LapDDPM.load(path, adata=adata)


def test_history_has_both_stages(trained_model):
    history = trained_model.history
    for key in ("reconstruction_loss_train", "kl_local_train", "elbo_train",
                "perturbation_relative_change_train", "diffusion_loss_train"):
        assert key in history
    assert len(history["elbo_train"]) == 8 and len(history["diffusion_loss_train"]) == 20
    assert history["diffusion_loss_train"].index[0] == 8
    assert history["perturbation_relative_change_train"].iloc[-1, 0] == pytest.approx(0.05)
    assert trained_model.get_latent_representation().shape == (trained_model.adata.n_obs, 8)



def test_posterior_predictive_cells(trained_model, monkeypatch):
    """Each row decodes a draw from its source cell's posterior with that cell's library."""
    import torch

    model = trained_model
    adata = model.adata
    n = adata.n_obs
    rng = np.random.default_rng(1)
    indices = np.concatenate([rng.permutation(n), rng.integers(0, n, 50)])  # shuffled, repeats
    seen = {}
    decode = model.module.decode_counts

    def spy(z, library, *args, **kwargs):
        seen["z"], seen["library"] = z.clone(), library.clone()
        return decode(z, library, *args, **kwargs)

    monkeypatch.setattr(model.module, "decode_counts", spy)
    draws = model.posterior_predictive_cells(indices=indices, seed=3)
    mean, logvar = model._posterior(model._collator(), np.arange(n))
    # standardised against each source cell's own posterior (so the rows follow indices)
    standardized = (seen["z"] - mean[indices]) / torch.exp(0.5 * logvar[indices])
    assert abs(standardized.mean().item()) < 0.05
    assert standardized.std().item() == pytest.approx(1.0, abs=0.05)  # a draw, not the mean
    totals = np.asarray(adata.X.sum(1)).ravel()
    np.testing.assert_allclose(seen["library"].numpy(), totals[indices], rtol=1e-6)

    assert draws.shape == (indices.size, adata.n_vars)
    assert list(draws.var_names) == list(adata.var_names)
    x = draws.X.toarray()
    assert np.array_equal(x, np.round(x)) and (x >= 0).all()
    assert list(draws.obs["source_cell"]) == list(adata.obs_names[indices])
    assert list(draws.obs["cell_type"].astype(str)) == list(
        adata.obs["cell_type"].astype(str).to_numpy()[indices])
    assert draws.obs["synthetic"].all()
    # library sizes follow the source cells (ZINB draws keep the expected total)
    drawn = x.sum(1)
    assert np.corrcoef(np.log1p(drawn), np.log1p(totals[indices]))[0, 1] > 0.9
    monkeypatch.undo()
    again = model.posterior_predictive_cells(indices=indices[:20], seed=3)
    repeat = model.posterior_predictive_cells(indices=indices[:20], seed=3)
    np.testing.assert_array_equal(again.X.toarray(), repeat.X.toarray())
    assert model.posterior_predictive_cells(seed=0).n_obs == n
    for bad in (np.array([n]), np.array([-1]), np.array([0.5]), np.zeros((2, 2), int)):
        with pytest.raises(ValueError, match="indices must be integer positions"):
            model.posterior_predictive_cells(indices=bad)


def test_latent_representation_is_the_full_graph_encoding(trained_model, capsys):
    """The encoding pass projects each cell's expression once and gathers the projections
    per subgraph; it must equal the encoder run on the expression of the whole graph."""
    import torch

    model = trained_model
    model.module.eval()
    collator = model._collator()
    n = model.adata.n_obs
    with torch.inference_mode():
        batch = collator(list(range(n)))  # one subgraph: every cell, the full graph
        inputs = model.module._get_inference_input(batch)
        expected = model.module.inference(**inputs, use_mean=True)
    for batch_size in (37, 512):
        latent = model.get_latent_representation(batch_size=batch_size)
        np.testing.assert_allclose(latent, expected["qz_mean"].numpy(), rtol=1e-5, atol=1e-5)
    assert "Encoding cells" not in "".join(capsys.readouterr())
    model.get_latent_representation(progress_bar=True)
    assert "Encoding cells" in "".join(capsys.readouterr())
    # a large share of the cells (projected once) and a few (read per batch)
    for n_cells, batch_size in ((50, 16), (5, 2)):
        order = np.random.default_rng(0).permutation(n)[:n_cells]
        np.testing.assert_allclose(model.get_latent_representation(indices=order,
                                                                   batch_size=batch_size),
                                   expected["qz_mean"].numpy()[order], rtol=1e-5, atol=1e-5)
    # and the log-variances, which stage B trains on
    mean, logvar = model._posterior(collator, np.arange(n), batch_size=64)
    np.testing.assert_allclose(logvar.numpy(), expected["qz_logvar"].numpy(), rtol=1e-5,
                               atol=1e-5)

def test_unconditional_model_with_validation_split():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=200, n_genes=300)
    LapDDPM.setup_anndata(adata, n_neighbors=8, n_lpe=4)
    model = LapDDPM(adata, n_latent=4, n_hidden=32, score_hidden=32, score_blocks=1)
    model.train(max_epochs_vae=2, max_epochs_diffusion=2, train_size=0.8, **QUIET)
    assert len(model.train_indices_) == 160 and len(model.validation_indices_) == 40
    assert "validation_loss" in model.history and "diffusion_loss_validation" in model.history
    synth = model.generate(n_samples=50, seed=0, progress_bar=False)
    assert synth.n_obs == 50 and list(synth.obs.columns) == ["synthetic"]
    with pytest.raises(ValueError, match="has no labels"):
        model.generate(labels={"B cells": 3}, progress_bar=False)


def test_untrained_model_refuses_to_generate(pbmc_small):
    LapDDPM.setup_anndata(pbmc_small, labels_key="cell_type", n_neighbors=8, n_lpe=4)
    model = LapDDPM(pbmc_small)
    with pytest.raises(RuntimeError):
        model.generate(n_samples=3)


def test_datasets_pbmc3k_is_bundled_raw_counts_ready_for_setup():
    adata = scldiff.datasets.pbmc3k()
    assert adata.shape == (2638, 13713)
    assert (adata.X.data == np.round(adata.X.data)).all()
    assert adata.obs["cell_type"].value_counts()["B cells"] == 342
    assert isinstance(adata, anndata.AnnData)
    assert (adata.layers["counts"] != adata.X).nnz == 0
    assert adata.layers["counts"].data is not adata.X.data  # normalising X keeps the counts
    LapDDPM.setup_anndata(adata, labels_key="cell_type")  # as it comes: no filtering first
    assert "scldiff_connectivities" in adata.obsp


def test_training_again_runs_in_train_mode_and_appends_history():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=200, n_genes=300)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=8, n_lpe=4)
    model = LapDDPM(adata, n_latent=4, n_hidden=32, score_hidden=32, score_blocks=1)
    model.train(max_epochs_vae=3, max_epochs_diffusion=4, **QUIET)
    modes = []
    handle = model.module.encoder.register_forward_pre_hook(
        lambda module, args: modes.append(module.training))
    try:
        model.train(max_epochs_vae=1, max_epochs_diffusion=1, **QUIET)
    finally:
        handle.remove()
    assert True in modes  # stage A ran with dropout (the posterior pass is in eval mode)
    history = model.history
    assert len(history["elbo_train"]) == 4 and len(history["diffusion_loss_train"]) == 5
    assert history["elbo_train"].index[-1] == 7  # after the first run's 3 + 4 epochs
    assert history["diffusion_loss_train"].index[-1] == 8
    assert not model.module.training


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_other_likelihoods_train_and_generate(likelihood, tmp_path):
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=150, n_genes=200)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=6, n_lpe=0)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1,
                    likelihood=likelihood)
    model.train(max_epochs_vae=2, max_epochs_diffusion=2, **QUIET)
    assert np.isfinite(model.history["reconstruction_loss_train"].to_numpy(float)).all()
    synth = model.generate(labels={"CD4 T cells": 20}, seed=0, progress_bar=False)
    assert synth.n_obs == 20 and synth.uns["scldiff"]["likelihood"] == likelihood
    assert (synth.X.data == np.round(synth.X.data)).all()
    model.save(tmp_path / "model")
    loaded = LapDDPM.load(tmp_path / "model", adata=adata)
    again = loaded.generate(labels={"CD4 T cells": 20}, seed=0, progress_bar=False)
    assert loaded.module.likelihood == likelihood and (again.X != synth.X).nnz == 0


def _generates_and_round_trips(model, adata, tmp_path):
    """Generation and the posterior predictive work; saved and loaded, the model generates
    the same counts. Returns the loaded model."""
    kw = dict(labels={"CD4 T cells": 20, "B cells": 10}, seed=0, progress_bar=False)
    synth = model.generate(**kw)
    assert synth.n_obs == 30 and (synth.X.data == np.round(synth.X.data)).all()
    assert model.posterior_predictive_cells(seed=0).n_obs == adata.n_obs
    model.save(str(tmp_path / "m"), save_anndata=True)
    again = LapDDPM.load(str(tmp_path / "m"))
    assert (again.generate(**kw).X != synth.X).nnz == 0
    return again


def test_decoder_covariates_train_generate_and_round_trip(tmp_path):
    """A decoder that reads the label: the label's one-hot changes what a latent decodes
    to, it is the label each cell is generated for, and it is saved with the model."""
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=150, n_genes=200)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=6, n_lpe=0)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
    n_labels = len(model.label_categories)
    first = model.module.decoder.hidden[0]
    assert first.in_features == 4 + n_labels  # the default with labels
    before = first.weight.detach()[:, 4:].clone()
    model.train(max_epochs_vae=3, max_epochs_diffusion=2, **QUIET)
    assert not torch.allclose(first.weight.detach()[:, 4:], before)  # the label columns learn
    decoder = model.module.decoder.eval()
    with torch.no_grad():
        scale = decoder(torch.zeros(2, 4), torch.tensor([0, 1])).scale_and_kept()[0]
    assert not torch.allclose(scale[0], scale[1])
    # each cell is decoded with its own label: the one it is generated for, or its own
    seen = []
    handle = decoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[1].cpu()))
    try:
        synth = model.generate(labels=["B cells", "CD4 T cells", "CD4 T cells"], seed=0,
                               progress_bar=False)
        codes = pd.Categorical(synth.obs["cell_type"], categories=model.label_categories).codes
        np.testing.assert_array_equal(torch.cat(seen).numpy()[:, 0], codes)
        seen.clear()
        own = pd.Categorical(adata.obs["cell_type"], categories=model.label_categories).codes
        cells = [int(np.flatnonzero(own == code)[0]) for code in np.unique(own)[:3]]
        model.posterior_predictive_cells(indices=cells, seed=0)
        np.testing.assert_array_equal(torch.cat(seen).numpy()[:, 0], own[cells])
    finally:
        handle.remove()
    plain = LapDDPM(adata, n_latent=4, n_hidden=16, decoder_covariates=False)
    assert plain.module.decoder.hidden[0].in_features == 4
    again = _generates_and_round_trips(model, adata, tmp_path)
    assert again.module.decoder.n_categories == [n_labels]


def test_bad_model_and_training_arguments():
    adata = small_pbmc(n_cells=100, n_genes=100)
    LapDDPM.setup_anndata(adata, n_neighbors=5, n_lpe=2)
    with pytest.raises(ValueError, match="needs categorical attributes"):
        LapDDPM(adata, decoder_covariates=True)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=2)
    for name, value in (("likelihood", "hurdle"), ("library_size", "diffusion"),
                        ("prediction", "x0")):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            LapDDPM(adata, **{name: value})
    model = LapDDPM(adata, n_latent=4, n_hidden=16)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    quick = dict(max_epochs_vae=1, max_epochs_diffusion=0, **QUIET)
    with pytest.raises(ValueError, match="perturbation must be one of"):
        model.train(plan_kwargs={"perturbation": "adversarial"}, **quick)
    with pytest.raises(ValueError, match="mask_fraction"):
        model.train(plan_kwargs={"mask_fraction": 1.0}, **quick)
    with pytest.raises(ValueError, match="p_uncond"):
        model.train(max_epochs_vae=0, max_epochs_diffusion=1,
                    diffusion_plan_kwargs={"p_uncond": 1.0}, **QUIET)
    with pytest.raises(TypeError, match="n_epochs_stage_a"):
        model.train(n_epochs_stage_a=1, **quick)  # not an argument of the plan either
    with pytest.raises(ValueError, match="train_size"):
        model.train(train_size=1.5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_epochs must be a non-negative integer"):
            model.train(max_epochs=bad)
    with pytest.raises(ValueError, match="nothing to train"):
        model.train(max_epochs_vae=0, max_epochs_diffusion=0)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())


def test_an_encoder_without_neighbours_trains_only_without_perturbation():
    adata = small_pbmc(n_cells=100, n_genes=100)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=2)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, cheb_k=1)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    quick = dict(max_epochs_vae=1, max_epochs_diffusion=1, **QUIET)
    for perturbation in ("spectral", "random"):
        with pytest.raises(ValueError, match="cheb_k=1.*'perturbation': 'none'"):
            model.train(plan_kwargs={"perturbation": perturbation}, **quick)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    model.train(plan_kwargs={"perturbation": "none"}, **quick)
    synth = model.generate(n_samples=20, seed=0, progress_bar=False)
    assert synth.n_obs == 20 and np.isfinite(synth.X.data).all()


def test_generated_libraries_follow_the_latent_by_default(trained_model):
    assert trained_model.library_size == "latent"
    kw = dict(labels={"CD4 T cells": 1500, "B cells": 500}, seed=5, progress_bar=False)
    synth = trained_model.generate(**kw)
    assert synth.uns["scldiff"]["library_size"] == "latent"
    adata = trained_model.adata
    train = np.asarray(trained_model.train_indices_)
    library = np.asarray(adata.X[train].sum(1)).ravel()
    labels = adata.obs["cell_type"].to_numpy()[train]
    generated = np.asarray(synth.X.sum(1)).ravel()
    for label in ("CD4 T cells", "B cells"):
        ratio = np.median(generated[synth.obs["cell_type"] == label]) / np.median(
            library[labels == label])
        assert 0.85 < ratio < 1.15, (label, ratio)
    # the other mode is a generation-time choice of the same model
    by_label = trained_model.generate(**kw, library_size="label")
    assert by_label.uns["scldiff"]["library_size"] == "label"
    assert (by_label.X != synth.X).nnz > 0
    for bad in ("diffusion", "observed"):
        with pytest.raises(ValueError, match="library_size"):
            trained_model.generate(**kw, library_size=bad)


def test_library_model_round_trips_and_a_damaged_one_is_refused(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(str(path))
    kw = dict(labels={"B cells": 30}, seed=2, progress_bar=False)
    loaded = LapDDPM.load(str(path), adata=False)
    assert loaded.library_model_.to_dict() == trained_model.library_model_.to_dict()
    assert (loaded.generate(**kw).X != trained_model.generate(**kw).X).nnz == 0
    meta = json.loads((path / "model.json").read_text())
    fit = meta["library_model_"]
    rows = fit["residual_quantiles"]
    for damaged in ({**fit, "coef": [0.0]},  # wrong length
                    {**fit, "residual_quantiles": [[float("nan")] * len(rows[0])] * len(rows)},
                    {**fit, "log_quantiles": [list(reversed(r)) for r in fit["log_quantiles"]]},
                    {**fit, "log_range": [9.0, 4.0]},
                    {"coef": fit["coef"]},  # fields missing
                    "text"):
        (path / "model.json").write_text(json.dumps({**meta, "library_model_": damaged}))
        with pytest.raises(ModelFileError, match="library-size model"):
            LapDDPM.load(str(path), adata=False)


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_the_scorenets_prediction_round_trips(trained_model, tmp_path, prediction):
    model = trained_model
    if prediction == "epsilon":  # the same weights read as a noise predictor
        model = LapDDPM(registry=trained_model.registry_, n_latent=8, n_hidden=64,
                        score_hidden=64, score_blocks=2, prediction="epsilon")
        model.module.load_state_dict(trained_model.module.state_dict())
        for name in ("is_trained_", "train_indices_", "combinations_", "library_model_"):
            setattr(model, name, getattr(trained_model, name))
    kw = dict(labels={"B cells": 40}, seed=3, progress_bar=False)
    model.save(str(tmp_path / "m"))
    loaded = LapDDPM.load(str(tmp_path / "m"), adata=False)
    assert loaded.module.prediction == prediction
    assert (loaded.generate(**kw).X != model.generate(**kw).X).nnz == 0
    if prediction == "epsilon":
        assert (model.generate(**kw).X != trained_model.generate(**kw).X).nnz > 0


def test_posterior_predictive_sample_has_scvi_tools_contract(trained_model):
    """scvi-tools' signature and return type: a sparse.GCXS of (cells, genes[, samples]),
    so that scvi.criticism.PosteriorPredictiveCheck takes the model."""
    import sparse
    from scvi.criticism import PosteriorPredictiveCheck

    model = trained_model
    cells = np.array([5, 0, 7])
    one = model.posterior_predictive_sample(indices=cells, seed=2)
    assert isinstance(one, sparse.GCXS) and one.shape == (3, model.adata.n_vars)
    same = model.posterior_predictive_cells(indices=cells, seed=2)
    np.testing.assert_array_equal(one.todense(), same.X.toarray())
    three = model.posterior_predictive_sample(indices=cells, n_samples=3, seed=2)
    assert three.shape == (3, model.adata.n_vars, 3)
    repeated = model.posterior_predictive_cells(indices=np.repeat(cells, 3), seed=2).X.toarray()
    np.testing.assert_array_equal(three.todense().transpose(0, 2, 1).reshape(9, -1), repeated)
    genes = list(model.adata.var_names[[3, 1]])
    assert model.posterior_predictive_sample(indices=cells, gene_list=genes, seed=2).shape \
        == (3, 2)
    with pytest.raises(ValueError, match="gene_list"):
        model.posterior_predictive_sample(gene_list=["not a gene"])
    # integer counts: scvi-tools 1.4's check of float counts fails with sparse 0.19, for SCVI too
    real = model.adata.copy()
    real.X = real.X.astype(np.int64)
    ppc = PosteriorPredictiveCheck(real, {"lapddpm": model}, n_samples=2)
    ppc.coefficient_of_variation("features")
    assert np.isfinite(ppc.metrics["cv_cell"].to_numpy()).any()


def test_generate_follows_scvi_settings_seed_and_names_cells_uniquely(trained_model):
    gen = lambda **kw: trained_model.generate(n_samples=40, progress_bar=False, **kw)
    scvi.settings.seed = 7
    first = gen()
    scvi.settings.seed = 7
    again = gen()
    np.testing.assert_array_equal(first.X.toarray(), again.X.toarray())
    seed = first.uns["scldiff"]["seed"]
    np.testing.assert_array_equal(gen(seed=seed).X.toarray(), first.X.toarray())
    other = gen()  # the global generator moved on: other cells, other names
    assert not set(other.obs_names) & set(first.obs_names)
    both = anndata.concat([first, other])
    assert both.obs_names.is_unique


def test_generated_cells_go_straight_into_rank_genes_groups(trained_model):
    import scanpy as sc

    synth = trained_model.generate(labels={"B cells": 30, "NK cells": 30}, seed=0,
                                   progress_bar=False)
    assert list(synth.obs["cell_type"].cat.categories) == ["B cells", "NK cells"]
    sc.pp.normalize_total(synth)
    sc.pp.log1p(synth)
    sc.tl.rank_genes_groups(synth, "cell_type")
    assert synth.uns["rank_genes_groups"]["names"].dtype.names == ("B cells", "NK cells")
    assert (synth.layers["counts"].data == np.round(synth.layers["counts"].data)).all()


def test_max_epochs_is_the_whole_budget_split_in_the_default_proportion():
    from scldiff.model._training import (
        STAGE_A_STEPS,
        STAGE_B_STEPS,
        epochs_for_steps,
        stage_epochs,
    )

    n = 2_638
    d_a, d_b = epochs_for_steps(STAGE_A_STEPS, n, 128), epochs_for_steps(STAGE_B_STEPS, n, 256)
    assert stage_epochs(None, None, None, n, 128, 256) == (d_a, d_b)
    assert stage_epochs(100, None, None, n, 128, 256) == (round(100 * d_a / (d_a + d_b)),
                                                          100 - round(100 * d_a / (d_a + d_b)))
    assert stage_epochs(2, None, None, n, 128, 256) == (1, 1)  # at least one epoch each
    # below 2,000 cells the epochs are capped, so the steps scale with the cells
    assert stage_epochs(None, None, None, 500, 128, 256) == (128, 512)
    assert stage_epochs(None, None, None, 1_000, 128, 256) == (128, 512)
    assert stage_epochs(None, None, None, 10_000, 128, 256) == (
        epochs_for_steps(STAGE_A_STEPS, 10_000, 128), epochs_for_steps(STAGE_B_STEPS, 10_000, 256))
    assert stage_epochs(100, 7, None, n, 128, 256)[0] == 7  # a stage's own argument wins
    assert stage_epochs(100, None, 0, n, 128, 256)[1] == 0


def test_train_takes_scvi_tools_max_epochs():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=150, n_genes=100)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=2)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
    model.train(max_epochs=2, **QUIET)
    assert len(model.history["reconstruction_loss_train"]) == 1
    assert len(model.history["diffusion_loss_train"]) == 1
    assert model.generate(n_samples=5, seed=0, progress_bar=False).n_obs == 5


def test_get_normalized_expression_is_the_decoders_mean_per_library(trained_model):
    model = trained_model
    cells = np.array([3, 1, 4])
    expr = model.get_normalized_expression(indices=cells)
    assert expr.shape == (3, model.adata.n_vars)
    assert list(expr.index) == list(model.adata.obs_names[cells])
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1.0, rtol=1e-4)  # fractions of ℓ
    # against the expected counts by hand: E[x] = ℓ (1 - π) ρ / Σ (1 - π) ρ
    import torch

    z = torch.from_numpy(model.get_latent_representation(indices=cells))
    codes = model.module.categories(torch.from_numpy(model._collator().attributes[cells]))
    with torch.no_grad():
        params = model.module.decoder(z, codes).with_biases()
    rho = torch.softmax(params.logits.double(), -1)
    kept = torch.sigmoid(-params.zi_logits.double())
    by_hand = (kept * rho / (kept * rho).sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(expr.to_numpy(), by_hand, rtol=1e-4, atol=1e-9)
    genes = list(model.adata.var_names[[5, 2]])  # returned in the model's order, as scVI's
    sub = model.get_normalized_expression(indices=cells, gene_list=genes, library_size=1e4)
    assert list(sub.columns) == genes[::-1]
    np.testing.assert_allclose(sub.to_numpy(), expr[genes[::-1]].to_numpy() * 1e4, rtol=1e-5)
    draws = model.get_normalized_expression(indices=cells, n_samples=4, return_mean=False,
                                            seed=0)
    assert draws.shape == (4, 3, model.adata.n_vars) and not np.allclose(draws[0], draws[1])


def test_registry_and_setup_args_of_a_saved_model(trained_model, tmp_path, capsys):
    trained_model.save(str(tmp_path / "m"))
    registry = LapDDPM.load_registry(str(tmp_path / "m"))
    assert registry["setup_args"]["labels_key"] == "cell_type"
    LapDDPM.view_setup_args(str(tmp_path / "m"))
    assert "cell_type" in capsys.readouterr().out


def test_early_stopping_watches_each_stages_validation_loss():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=150, n_genes=100)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=2)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
    with pytest.raises(ValueError, match="early_stopping=True needs validation cells"):
        model.train(max_epochs=4, early_stopping=True, **QUIET)
    model.train(max_epochs_vae=8, max_epochs_diffusion=8, early_stopping=True, train_size=0.8,
                early_stopping_patience=1, early_stopping_min_delta=1e9,
                **QUIET)  # no epoch improves by 1e9: each stage stops after its patience
    assert 1 <= len(model.history["elbo_validation"]) < 8
    assert 1 <= len(model.history["diffusion_loss_validation"]) < 8
    assert model.generate(n_samples=5, seed=0, progress_bar=False).n_obs == 5
