"""Paired RNA + ATAC: set-up (modalities, LSI, graph), bad input, RNA generated from chromatin
(``generate(conditions=atac)``), save and load of the fitted LSI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from anndata import AnnData

import scldiff
from scldiff.graph import LSI, knn_graph

from .conftest import QUIET


def paired(n_cells: int = 300, n_genes: int = 30, n_peaks: int = 60, seed: int = 0
           ) -> AnnData:
    """Two cell types, each with its own marker genes (the first and second thirds of the
    genes) and its own open peaks (the first and second halves), in MultiVI's layout: genes
    first, then peaks, ``var["modality"]``. Peaks hold fragment counts (0 to 3)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n_cells)
    rate = np.full((n_cells, n_genes), 2.0)
    third = n_genes // 3
    rate[kind == 0, :third] = 12.0
    rate[kind == 1, third : 2 * third] = 12.0
    genes = rng.poisson(rate)
    half = n_peaks // 2
    p_open = np.full((n_cells, n_peaks), 0.05)
    p_open[kind == 0, :half] = 0.6
    p_open[kind == 1, half:] = 0.6
    peaks = (rng.random((n_cells, n_peaks)) < p_open) * rng.integers(1, 4, (n_cells, n_peaks))
    peaks[:, 0] = np.maximum(peaks[:, 0], kind == 1)  # every cell has an open peak
    var = pd.DataFrame({"modality": ["rna"] * n_genes + ["atac"] * n_peaks},
                       index=[f"g{j}" for j in range(n_genes)] +
                       [f"chr1:{100 * j}-{100 * j + 50}" for j in range(n_peaks)])
    obs = pd.DataFrame({"kind": pd.Categorical([f"type{k}" for k in kind])},
                       index=[f"cell{i}" for i in range(n_cells)])
    return AnnData(sp.csr_matrix(np.hstack([genes, peaks]).astype(np.float32)), obs=obs,
                   var=var)


def snapshot(adata: AnnData) -> tuple:
    return (adata.X.copy(), dict(adata.obsm), dict(adata.obsp), set(adata.uns),
            adata.var.copy())


def unchanged(adata: AnnData, before: tuple) -> bool:
    x, obsm, obsp, uns, var = before
    return (adata.X != x).nnz == 0 and set(adata.obsm) == set(obsm) \
        and set(adata.obsp) == set(obsp) and set(adata.uns) == uns and adata.var.equals(var)


@pytest.fixture(scope="module")
def multiome_model():
    scvi.settings.seed = 0
    adata = paired()
    train = adata[:240].copy()
    scldiff.LapDDPM.setup_anndata(train, modality_key="modality", lsi_components=5)
    model = scldiff.LapDDPM(train, n_latent=6, n_hidden=32, score_hidden=32, score_blocks=2)
    model.train(max_epochs_vae=50, max_epochs_diffusion=300, **QUIET)
    return model, adata[240:].copy()


def test_setup_registers_genes_and_fits_the_lsi_of_the_peaks():
    adata = paired()
    scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", lsi_components=5)
    model = scldiff.LapDDPM(adata)
    assert model.n_genes == 30 and model.module.decoder.scale.out_features == 30
    assert list(model.gene_names) == [f"g{j}" for j in range(30)]
    assert model.peak_names.size == 60 and model.module.n_chromatin == 5
    # the stored embedding is the LSI of the binarised peaks, fitted as graph.LSI fits it
    peaks = adata.X[:, 30:]
    expected = LSI.fit(peaks, n_components=5).transform(peaks)
    np.testing.assert_allclose(adata.obsm["X_scldiff_lsi"], expected, rtol=1e-5, atol=1e-6)
    fit = adata.uns["scldiff_lsi"]
    np.testing.assert_allclose(fit["mean"], expected.mean(0), rtol=1e-4, atol=1e-6)
    # the graph (default: the genes') is rebuilt when asked from the chromatin
    rna_graph = adata.obsp["scldiff_connectivities"].copy()
    scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", lsi_components=5,
                                  graph_modality="atac")
    atac_graph = adata.obsp["scldiff_connectivities"]
    assert (atac_graph != knn_graph(adata.obsm["X_scldiff_lsi"])).nnz == 0
    assert (atac_graph != rna_graph).nnz > 0
    scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", lsi_components=5,
                                  graph_modality="both")
    both = adata.obsp["scldiff_connectivities"]
    assert (both != rna_graph.maximum(atac_graph)).nnz == 0


def test_peaks_as_counts_or_binarised_give_one_embedding():
    counts, binary = paired(), paired()
    binary.X = sp.hstack([binary.X[:, :30], (binary.X[:, 30:] > 0).astype(np.float32)],
                         format="csr")
    for adata in (counts, binary):
        scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", lsi_components=5)
    np.testing.assert_allclose(counts.obsm["X_scldiff_lsi"], binary.obsm["X_scldiff_lsi"])


@pytest.mark.parametrize("change, message", [
    ("no_column", "modality_key='modality' is not a column of adata.var"),
    ("bad_value", "each feature must be 'rna'"),
    ("peaks_first", "genes first, then the peaks"),
    ("fractional_peaks", "The peaks of adata.X: Peaks must hold accessibility counts"),
    ("closed_cell", "1 cell\\(s\\) have no accessible peak"),
    ("no_peaks", "paired data need both"),
])
def test_bad_paired_input_is_refused_and_the_anndata_left_unchanged(change, message):
    adata = paired(n_cells=60)
    if change == "no_column":
        del adata.var["modality"]
    elif change == "bad_value":
        adata.var.loc["g0", "modality"] = "protein"
    elif change == "peaks_first":
        adata = adata[:, np.r_[30:90, 0:30]].copy()
    elif change == "fractional_peaks":
        x = adata.X.toarray()
        x[0, 40] = 0.5
        adata.X = sp.csr_matrix(x)
    elif change == "closed_cell":
        x = adata.X.toarray()
        x[3, 30:] = 0
        adata.X = sp.csr_matrix(x)
    elif change == "no_peaks":
        adata.var["modality"] = "rna"
    before = snapshot(adata)
    with pytest.raises(ValueError, match=message):
        scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", lsi_components=5)
    assert unchanged(adata, before)


def test_bad_multiome_settings_are_refused():
    adata = paired(n_cells=60)
    with pytest.raises(ValueError, match="graph_modality must be one of"):
        scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", graph_modality="peaks")
    with pytest.raises(ValueError, match="pass modality_key too"):
        scldiff.LapDDPM.setup_anndata(adata, graph_modality="atac")
    with pytest.raises(ValueError, match="lsi_components must be an integer in \\[1, 58\\]"):
        scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", lsi_components=59)
    adata.obsm["spatial"] = np.random.default_rng(0).random((60, 2))
    with pytest.raises(ValueError, match="cannot be combined"):
        scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", spatial_key="spatial")


def test_rna_generated_from_chromatin_follows_the_cell_type(multiome_model):
    model, held_out = multiome_model
    synth = model.generate(conditions=held_out, seed=0, progress_bar=False)
    assert synth.shape == (held_out.n_obs, 30)
    assert list(synth.obs_names) == list(held_out.obs_names)
    assert list(synth.var_names) == list(model.gene_names)
    assert synth.uns["scldiff"]["conditioned_on"] == ["atac"]
    x = synth.X.toarray()
    markers = np.stack([x[:, :10].mean(1), x[:, 10:20].mean(1)], 1)
    predicted = np.where(markers[:, 0] > markers[:, 1], "type0", "type1")
    # the model never saw these cells' type, only their peaks
    assert (predicted == held_out.obs["kind"].to_numpy()).mean() > 0.85
    # the chromatin carries it: without its guidance, the types are drawn at random
    blind = model.generate(conditions=held_out, seed=0, progress_bar=False,
                           guidance_scale={"atac": 0.0}).X.toarray()
    blind_markers = np.stack([blind[:, :10].mean(1), blind[:, 10:20].mean(1)], 1)
    blind_predicted = np.where(blind_markers[:, 0] > blind_markers[:, 1], "type0", "type1")
    assert (blind_predicted == held_out.obs["kind"].to_numpy()).mean() < 0.75
    # the same peaks as 0/1 or as counts, and with the genes left out, give the same cells
    only_peaks = held_out[:, model.peak_names].copy()
    only_peaks.X = (only_peaks.X > 0).astype(np.float32)
    again = model.generate(conditions=only_peaks, seed=0, progress_bar=False)
    assert (again.X != synth.X).nnz == 0


def test_unconditional_generation_of_a_multiome_model(multiome_model):
    model, _ = multiome_model
    synth = model.generate(n_samples=25, seed=1, progress_bar=False)
    assert synth.shape == (25, 30) and "X_scldiff_lsi" not in synth.obsm


def test_bad_chromatin_conditions_are_refused(multiome_model, trained_model):
    model, held_out = multiome_model
    with pytest.raises(ValueError, match="lacks 1 of the model's 60 peaks"):
        model.generate(conditions=held_out[:, :-1].copy(), progress_bar=False)
    closed = held_out[:5].copy()
    x = closed.X.toarray()
    x[2, 30:] = 0
    closed.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="conditions: 1 cell\\(s\\) have no accessible peak"):
        model.generate(conditions=closed, progress_bar=False)
    with pytest.raises(ValueError, match="Pass conditions alone"):
        model.generate(conditions=held_out, n_samples=3, progress_bar=False)
    with pytest.raises(ValueError, match="keep_fraction < 1 is not available with chromatin"):
        model.generate(conditions=held_out, keep_fraction=0.5, progress_bar=False)
    with pytest.raises(ValueError, match="needs a multiome model"):
        trained_model.generate(conditions=held_out, progress_bar=False)


def test_the_lsi_is_saved_with_the_model(multiome_model, tmp_path):
    model, held_out = multiome_model
    model.save(str(tmp_path / "m"))
    loaded = scldiff.LapDDPM.load(str(tmp_path / "m"), adata=False)
    assert loaded.n_genes == 30 and list(loaded.peak_names) == list(model.peak_names)
    first = model.generate(conditions=held_out, seed=3, progress_bar=False)
    second = loaded.generate(conditions=held_out, seed=3, progress_bar=False)
    assert (first.X != second.X).nnz == 0
    # the fit is plain numbers in model.json; a damaged one is refused on load
    path = tmp_path / "m" / "model.json"
    saved = json.loads(path.read_text())
    assert len(saved["lsi_"]["idf"]) == 60
    saved["lsi_"]["std"] = saved["lsi_"]["std"][:2]
    path.write_text(json.dumps(saved))
    with pytest.raises(scldiff.ModelFileError, match="the LSI in its model.json is damaged"):
        scldiff.LapDDPM.load(str(tmp_path / "m"), adata=False)


def test_paired_anndata_from_a_mudata():
    mudata = pytest.importorskip("mudata")
    adata = paired(n_cells=40)
    rna = adata[:, :30].copy()
    atac = adata[5:, 30:].copy()  # five cells lack chromatin
    mdata = mudata.MuData({"rna": rna, "atac": atac})
    both = scldiff.model.paired_anndata(mdata)
    assert both.n_obs == 35 and list(both.var["modality"].unique()) == ["rna", "atac"]
    assert (both.X != adata[5:].X).nnz == 0
    with pytest.raises(ValueError, match="no modality 'peaks'"):
        scldiff.model.paired_anndata(mdata, atac="peaks")


def test_setup_on_the_bundled_multiome_subset():
    adata = scldiff.datasets.pbmc_multiome_subset()
    assert adata.shape == (1000, 219) and list(adata.var["modality"][[0, 45]]) == ["rna", "atac"]
    before = snapshot(adata)
    with pytest.raises(ValueError, match="19 cell\\(s\\) have no accessible peak"):
        scldiff.LapDDPM.setup_anndata(adata, modality_key="modality")
    assert unchanged(adata, before)
    peaks = adata[:, adata.var["modality"] == "atac"].X
    adata = adata[np.asarray(peaks.sum(1)).ravel() > 0].copy()
    scldiff.LapDDPM.setup_anndata(adata, modality_key="modality", graph_modality="both")
    assert adata.obsm["X_scldiff_lsi"].shape == (981, 20)
    assert scldiff.LapDDPM(adata).n_genes == 45


def test_labels_beside_the_chromatin_guide_or_come_from_the_nearest_cell():
    scvi.settings.seed = 0
    adata = paired(n_cells=200)
    train, held_out = adata[:160].copy(), adata[160:].copy()
    scldiff.LapDDPM.setup_anndata(train, labels_key="kind", modality_key="modality",
                                  lsi_components=5)
    model = scldiff.LapDDPM(train, n_latent=6, n_hidden=32, score_hidden=32, score_blocks=2)
    model.train(max_epochs_vae=5, max_epochs_diffusion=5, **QUIET)
    without = held_out.copy()
    del without.obs["kind"]
    synth = model.generate(conditions=without, seed=0, progress_bar=False,
                           guidance_scale={"kind": 1.0, "atac": 2.0})
    assert synth.uns["scldiff"]["conditioned_on"] == ["atac"]
    assert synth.uns["scldiff"]["guidance_scale"] == {"kind": 1.0, "atac": 2.0}
    # not guided on, but the decoder's label: the training cell of nearest chromatin's
    assert (synth.obs["kind"].astype(str).to_numpy()
            == held_out.obs["kind"].astype(str).to_numpy()).mean() > 0.9
    flipped = held_out.copy()
    flipped.obs["kind"] = np.where(held_out.obs["kind"] == "type0", "type1", "type0")
    guided = model.generate(conditions=flipped, seed=0, progress_bar=False)
    assert guided.uns["scldiff"]["conditioned_on"] == ["kind", "atac"]
    assert list(guided.obs["kind"].astype(str)) == list(flipped.obs["kind"])


def test_fit_accessibility_starts_at_the_peak_rates_and_learns_what_the_latent_tells():
    from scldiff.module import AccessibilityDecoder
    from scldiff.train import fit_accessibility

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    mean = torch.from_numpy(rng.standard_normal((600, 2))).float()
    logvar = torch.full((600, 2), -8.0)  # draws at the means
    peaks = np.zeros((600, 3), dtype=np.float32)
    peaks[:, 0] = mean[:, 0].numpy() > 0  # told by the latent
    peaks[:, 1] = rng.random(600) < 0.2  # not told: its rate
    peaks[:5, 2] = 1  # rare
    decoder = AccessibilityDecoder(2, 3, n_hidden=16)
    fit_accessibility(decoder, mean, logvar, sp.csr_matrix(peaks), n_steps=0)
    rate = peaks.mean(0)
    np.testing.assert_allclose(decoder.logits.bias.detach().numpy(),
                               np.log(rate / (1 - rate)), rtol=1e-5)
    held = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    nll = fit_accessibility(decoder, mean, logvar, sp.csr_matrix(peaks),
                            validation=(held, held, sp.csr_matrix([[1, 0, 0], [0, 0, 0]])),
                            n_steps=400, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.sigmoid(decoder(held)).numpy()
    assert p[0, 0] > 0.9 and p[1, 0] < 0.1
    assert abs(p[:, 1].mean() - rate[1]) < 0.1 and p[:, 2].max() < 0.1
    assert 0 < nll < 1.5


def test_an_accessibility_decoder_generates_paired_cells(tmp_path):
    with pytest.raises(ValueError, match="accessibility_decoder=True generates peaks"):
        adata = paired(n_cells=60)
        scldiff.LapDDPM.setup_anndata(adata)
        scldiff.LapDDPM(adata, accessibility_decoder=True)
    scvi.settings.seed = 0
    adata = paired()
    train, held_out = adata[:240].copy(), adata[240:].copy()
    scldiff.LapDDPM.setup_anndata(train, modality_key="modality", lsi_components=5)
    model = scldiff.LapDDPM(train, n_latent=6, n_hidden=32, score_hidden=32, score_blocks=2,
                            accessibility_decoder=True)
    model.train(max_epochs_vae=50, max_epochs_diffusion=300, train_size=0.9, **QUIET)
    assert np.isfinite(model.history["accessibility_nll_validation"].iloc[0, 0])
    synth = model.generate(conditions=held_out, seed=0, progress_bar=False)
    assert list(synth.var_names) == list(train.var_names)
    assert list(synth.var["modality"]) == list(train.var["modality"])
    peaks = synth[:, model.peak_names].X.toarray()
    assert set(np.unique(peaks)) <= {0.0, 1.0}
    # the drawn peaks go with the chromatin the RNA was drawn for
    first_half = peaks[:, :30].mean(1) > peaks[:, 30:].mean(1)
    assert (first_half == (held_out.obs["kind"] == "type0").to_numpy()).mean() > 0.9
    # paired cells in the training layout: they set up as the training data did
    scldiff.LapDDPM.setup_anndata(synth, modality_key="modality", lsi_components=5)
    model.save(str(tmp_path / "m"))
    loaded = scldiff.LapDDPM.load(str(tmp_path / "m"), adata=False)
    again = loaded.generate(conditions=held_out, seed=0, progress_bar=False)
    assert (again.X != model.generate(conditions=held_out, seed=0,
                                      progress_bar=False).X).nnz == 0
