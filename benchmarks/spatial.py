"""Spatial benchmark: generated tissue sections against the real ones (the LapDDPM paper's
Visium experiment), 3 seeds.

Usage (from the repository root, after ``make install``)::

    python benchmarks/spatial.py                      # both sections, both hold-outs, seeds 0-2
    python benchmarks/spatial.py --datasets dlpfc --holdouts random --seeds 0
    python benchmarks/spatial.py --report             # tables and figures from finished runs

Sections: human DLPFC Visium 151673 (``visium_dlpfc_151673.h5ad``, 3,611 spots with a layer,
L1-L6 and white matter) and the mouse olfactory bulb (``st_mouse_olfactory_bulb.h5ad``, 260
spots, 5 layers); the 2,000 most variable genes (Seurat v3, on the whole section). A fifth of
the spots is held out: at random, or a contiguous strip (a fifth of the section's width, at
a different place for each seed). Each model is trained on the other spots and generates the
whole section, every spot given its layer (the held-out ones at their positions):

* **scVI, layer as covariate** (no spatial information, the paper's baseline): z ~ N(0, I)
  decoded with the spot's layer, library sizes drawn from the training spots of its layer.
* **LapDDPM, expression graph**: ``labels_key="layer"``, ``generate(conditions=layers)``.
* **LapDDPM, spatial graph**: ``labels_key="layer", spatial_key="spatial"``,
  ``generate(spots=section)`` at several ``noise_coupling`` values; and the same model
  guided on the layer alone (``guidance_scale={"layer": 1.5, "spatial": 0}``: the position
  left out), without and with coupled noise, to tell the two parts apart.

Scored on the real section's graph (:mod:`scldiff.metrics`): Moran's I of the 200 genes of
highest real Moran's I (correlation across genes, mean absolute difference), domain ARI of
k-means on the expression (the real section's alongside), spectral mismatch (energy on the
graph's 50 lowest modes, same genes); and on the held-out spots only, the distribution
metrics of :func:`scldiff.metrics.evaluate` (MMD per layer, RF AUC pooled over layers,
gene-gene correlation error) and a random forest's AUC within each layer of at least 20
held-out spots, averaged, next to the real-vs-real floor (as many training spots of the same
layers). Each run goes to ``benchmarks/results/spatial/<dataset>/<holdout>/seed<k>.json``;
``--report`` writes ``spatial.md``/``spatial.json`` and the figures in ``docs/_static``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

import scldiff
from scldiff.graph import join_isolated, spatial_graph
from scldiff.metrics import (
    classifier_auc,
    domain_ari,
    evaluate,
    moran_agreement,
    morans_i,
    spectral_mismatch,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import DEFAULT_DATA_DIR, RESULTS, meta  # noqa: E402

RUNS = os.path.join(RESULTS, "spatial")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "_static")
FILES = {"dlpfc": "visium_dlpfc_151673.h5ad", "olfactory_bulb": "st_mouse_olfactory_bulb.h5ad"}
LAYER, SPATIAL = "layer", "spatial"
COUPLINGS = (0.0, 0.5, 0.9)
GUIDANCE = 1.5  # generate()'s default joint scale, here on the layer alone
N_SVG = 200
N_MAPS = 4
MIN_AUC_SPOTS = 20  # held-out spots a layer needs for its own classifier
MORAN_R = "Moran's I correlation"
METRICS = ("Moran's I correlation", "Moran's I MAD", "Moran's I (generated)", "domain ARI",
           "spectral mismatch", "MMD (per layer)", "RF AUC", "gene-gene correlation error")


def load(dataset: str, data_dir: str) -> ad.AnnData:
    """The section's spots with a layer, the 2,000 most variable genes, raw counts."""
    import scanpy as sc

    path = os.path.join(data_dir, FILES[dataset])
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: the spatial benchmark needs ../shared/data "
                 "(see its README).")
    adata = ad.read_h5ad(path)
    adata = adata[adata.obs[LAYER].notna()].copy()
    adata.obs[LAYER] = adata.obs[LAYER].astype(str).astype("category")
    sc.pp.filter_genes(adata, min_counts=1)
    hvg = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000,
                                      inplace=False)["highly_variable"].to_numpy()
    adata = adata[:, hvg].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def held_out(adata: ad.AnnData, holdout: str, seed: int) -> np.ndarray:
    """Mask of the held-out fifth: random, or a strip of a fifth of the width."""
    n = adata.n_obs
    if holdout == "random":
        mask = np.zeros(n, dtype=bool)
        mask[np.random.default_rng(seed).choice(n, n // 5, replace=False)] = True
        return mask
    x = adata.obsm[SPATIAL][:, 0]
    low = np.quantile(x, (0.2, 0.4, 0.6)[seed % 3])
    return (x >= low) & (x < np.quantile(x, (0.4, 0.6, 0.8)[seed % 3]))


def section_graph(adata: ad.AnnData) -> sp.csr_matrix:
    connectivities, _ = spatial_graph(adata.obsm[SPATIAL], kind="grid")
    return join_isolated(connectivities, adata.obsm[SPATIAL])[0]


def scvi_section(train: ad.AnnData, adata: ad.AnnData, seed: int) -> tuple[sp.csr_matrix, float]:
    """scVI with the layer as batch covariate: every spot's counts from z ~ N(0, I), its
    layer and a library size of a training spot of its layer."""
    import scvi

    scvi.settings.seed = seed
    data = train.copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(data, batch_key=LAYER)
    model = scvi.model.SCVI(data)
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    layers = list(data.obs[LAYER].cat.categories)
    train_library = np.asarray(data.X.sum(1)).ravel()
    code = np.array([layers.index(v) for v in adata.obs[LAYER].astype(str)])
    library = np.array([rng.choice(train_library[(data.obs[LAYER] == layers[c]).to_numpy()])
                        for c in code], dtype=np.float32)
    z = torch.from_numpy(rng.standard_normal((adata.n_obs, model.module.n_latent))).float()
    model.module.eval()
    with torch.no_grad():
        out = model.module.generative(z=z, library=torch.log(torch.from_numpy(library))[:, None],
                                      batch_index=torch.from_numpy(code)[:, None])
        mu, theta = out["px"].mu.double().numpy(), out["px"].theta.double().numpy()
    return sp.csr_matrix(rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)), seconds


def lapddpm_sections(train: ad.AnnData, adata: ad.AnnData, seed: int, spatial: bool
                     ) -> tuple[dict[str, sp.csr_matrix], float]:
    """LapDDPM's whole section: on the spatial graph at each coupling, or on the expression
    graph from the layers alone."""
    import scvi

    scvi.settings.seed = seed
    data = train.copy()
    start = time.perf_counter()
    scldiff.LapDDPM.setup_anndata(data, labels_key=LAYER,
                                  spatial_key=SPATIAL if spatial else None)
    model = scldiff.LapDDPM(data)
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    spots = ad.AnnData(obs=adata.obs[[LAYER]].copy(), obsm={SPATIAL: adata.obsm[SPATIAL]})
    if not spatial:
        out = model.generate(conditions=spots.obs[[LAYER]], seed=seed, progress_bar=False)
        return {"LapDDPM, expression graph": sp.csr_matrix(out.X)}, seconds
    sections = {}
    for rho in COUPLINGS:
        out = model.generate(spots=spots, noise_coupling=rho, seed=seed, progress_bar=False)
        sections[f"LapDDPM, spatial graph, coupling {rho:g}"] = sp.csr_matrix(out.X)
    for rho in (0.0, 0.5):  # the position left out of the guidance: the layers alone
        out = model.generate(spots=spots, noise_coupling=rho, seed=seed, progress_bar=False,
                             guidance_scale={LAYER: GUIDANCE, SPATIAL: 0.0})
        sections[f"LapDDPM, spatial graph, no position, coupling {rho:g}"] = \
            sp.csr_matrix(out.X)
    return sections, seconds


def per_layer_auc(real: ad.AnnData, other: ad.AnnData, seed: int) -> float:
    """Mean over the layers with at least ``MIN_AUC_SPOTS`` held-out spots of a random
    forest's AUC at telling ``other``'s spots of the layer from the real ones
    (:func:`scldiff.metrics.classifier_auc`, log-normalised, 30 PCs); NaN where no layer
    has enough spots."""
    from scldiff.graph import log_normalize

    real_log, other_log = log_normalize(real.X), log_normalize(other.X)
    real_layers = real.obs[LAYER].astype(str).to_numpy()
    other_layers = other.obs[LAYER].astype(str).to_numpy()
    values = [classifier_auc(real_log[real_layers == layer].toarray(),
                             other_log[other_layers == layer].toarray(), n_pcs=30,
                             random_state=seed)
              for layer in np.unique(real_layers)
              if min((real_layers == layer).sum(), (other_layers == layer).sum())
              >= MIN_AUC_SPOTS]
    return float(np.mean(values)) if values else float("nan")


def distribution_scores(real: ad.AnnData, other: ad.AnnData) -> dict[str, float]:
    """The held-out spots' distribution metrics of ``other`` against ``real``: MMD per
    layer, RF AUC pooled and per layer, gene-gene correlation error."""
    table = evaluate(real, other, labels_key=LAYER, markers=False, min_cells=5)
    return {"MMD (per layer)": float(table.loc["MMD", "conditional"]),
            "RF AUC": float(table.loc["RF AUC", "unconditional"]),
            "RF AUC (per layer)": per_layer_auc(real, other, 0),
            "gene-gene correlation error": float(
                table.loc["gene-gene correlation error", "unconditional"])}


def scores(adata: ad.AnnData, counts: sp.csr_matrix, graph, mask: np.ndarray,
           svg: np.ndarray) -> dict:
    """Section scores of generated ``counts`` (one row per spot of ``adata``), with the
    Moran's I of each spatially variable gene (for the figure)."""
    out = moran_agreement(adata.X, counts, graph, n_genes=N_SVG)
    out["Moran's I per gene"] = morans_i(counts, graph)[svg].tolist()
    out["domain ARI"] = domain_ari(counts, adata.obs[LAYER].to_numpy())
    out["spectral mismatch"] = spectral_mismatch(adata.X, counts, graph, genes=svg)
    real = adata[mask]
    fake = ad.AnnData(counts[np.flatnonzero(mask)], obs=real.obs[[LAYER]].copy(),
                      var=adata.var[[]].copy())
    return {**out, **distribution_scores(real, fake)}


def floor(adata: ad.AnnData, mask: np.ndarray, graph, svg: np.ndarray, seed: int) -> dict:
    """The real section's own figures, and the distribution metrics of as many training
    spots of each layer as held out (the real-vs-real floor)."""
    rng = np.random.default_rng(seed)
    out = moran_agreement(adata.X, adata.X, graph, n_genes=N_SVG)
    out["domain ARI"] = domain_ari(adata.X, adata.obs[LAYER].to_numpy())
    out["spectral mismatch"] = 0.0
    real, rest = adata[mask], adata[~mask]
    picks = []
    for layer, n in real.obs[LAYER].value_counts().items():
        pool = np.flatnonzero((rest.obs[LAYER] == layer).to_numpy())
        if n and pool.size:
            picks.append(rng.choice(pool, n, replace=pool.size < n))
    other = rest[np.concatenate(picks)]
    return {**out, **distribution_scores(real, other)}


def save_maps(path: str, adata: ad.AnnData, sections: dict, genes: np.ndarray) -> None:
    """Log-normalised expression of a few spatially variable genes on every spot, real and
    each method's, for the figure of maps on the tissue."""
    from scldiff.graph import log_normalize

    values = {"real": log_normalize(adata.X)[:, genes].toarray()}
    values.update({name: log_normalize(counts)[:, genes].toarray()
                   for name, counts in sections.items()})
    np.savez_compressed(path, coordinates=adata.obsm[SPATIAL],
                        genes=adata.var_names[genes].to_numpy(dtype=str),
                        layers=adata.obs[LAYER].astype(str).to_numpy(),
                        names=np.array(list(values), dtype=str),
                        values=np.stack([values[k] for k in values]).astype(np.float32))


def run(dataset: str, holdout: str, seed: int, data_dir: str, force: bool) -> None:
    path = os.path.join(RUNS, dataset, holdout, f"seed{seed}.json")
    if os.path.exists(path) and not force:
        print(f"{path} exists; skipped (--force refits).", flush=True)
        return
    adata = load(dataset, data_dir)
    mask = held_out(adata, holdout, seed)
    train = adata[~mask].copy()
    keep = np.asarray(train.X.sum(0)).ravel() > 0
    adata, train = adata[:, keep].copy(), train[:, keep].copy()
    graph = section_graph(adata)
    real_i = morans_i(adata.X, graph)
    svg = np.argsort(-np.nan_to_num(real_i, nan=-np.inf), kind="stable")[:N_SVG]
    results = {"real section (floor)": floor(adata, mask, graph, svg, seed)}
    results["real section (floor)"]["Moran's I per gene"] = real_i[svg].tolist()
    seconds = {}
    sections = {}
    counts, seconds["scVI"] = scvi_section(train, adata, seed)
    sections["scVI, layer covariate"] = counts
    for spatial in (False, True):
        out, fit = lapddpm_sections(train, adata, seed, spatial)
        sections.update(out)
        seconds["LapDDPM " + ("spatial" if spatial else "expression")] = fit
    for name, counts in sections.items():
        results[name] = scores(adata, counts, graph, mask, svg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_maps(path.replace(".json", "_maps.npz"), adata, sections, svg[:N_MAPS])
    with open(path, "w") as f:
        json.dump({"dataset": dataset, "holdout": holdout, "seed": seed,
                   "n_spots": int(adata.n_obs), "n_held_out": int(mask.sum()),
                   "n_genes": int(adata.n_vars), "scores": results, "fit_seconds": seconds,
                   "meta": meta()}, f, indent=1)
    print(f"{dataset} {holdout} seed {seed}: " + ", ".join(
        f"{k}: I r={v[MORAN_R]:.2f}" for k, v in results.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--holdouts", nargs="+", default=["random", "strip"],
                        choices=["random", "strip"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if not args.report:
        for dataset in args.datasets:
            for holdout in args.holdouts:
                for seed in args.seeds:
                    run(dataset, holdout, seed, args.data_dir, args.force)
    from spatial_report import report

    report(RUNS, RESULTS, STATIC, args.data_dir)


if __name__ == "__main__":
    main()
