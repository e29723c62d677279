"""Multiome benchmark: RNA generated from held-out cells' chromatin against their own RNA (the
LapDDPM paper's 10x Multiome experiment), 3 seeds.

Usage (from the repository root, after ``make install``)::

    python benchmarks/multiome.py                     # both datasets, seeds 0-2
    python benchmarks/multiome.py --datasets pbmc --seeds 0
    python benchmarks/multiome.py --report            # tables from finished runs

Data (``../shared/data``; say how small they are next to every figure):

* **pbmc**: ``multiome_pbmc10x_muon_subset.h5ad``, 10x Multiome PBMCs from muon's test data:
  981 cells with an open peak (of 1,000), 45 marker genes and 174 nearby peaks. Few features,
  real cell-type variation: the main benchmark.
* **snare**: ``multiome_snareseq_h1_hummus.h5ad``, SNARE-seq of H1 stem cells: 385 cells of one
  cell line, the 2,000 most variable genes (Seurat v3) and 36,954 binarised peaks. The
  chromatin predicts almost nothing beyond the mean there: the negative control.

A random fifth of the cells is held out (seeds 0-2). The models train on the rest and are
given the held-out cells' peaks:

* **LapDDPM, ATAC-conditioned**: ``setup_anndata(modality_key="modality", graph_modality=g)``
  for each graph ``g`` (rna, atac, both), ``generate(conditions=held_out)``: one cell per
  held-out cell; and the mean of 10 such draws per cell (log-normalised), a prediction.
* **LapDDPM, unconditional**: the ``rna`` model with the chromatin's guidance at 0
  (``guidance_scale={"atac": 0}``): what the ATAC adds.
* **MultiVI** (scvi-tools; the field's model of paired RNA + ATAC): trained on the training
  cells paired and the held-out cells as ATAC-only cells (transductive, as MultiVI imputes),
  the held-out cells' imputed expression (a mean).
* **kNN in LSI** (the simple baseline): the held-out cell's 15 nearest training cells in the
  LSI fitted on the training cells: their mean (a prediction), and one of them at random (a
  draw).
* **nearest in RNA** (a ceiling, it reads the held-out RNA): the 15 nearest training cells in
  the PCA of the training cells' log-normalised RNA; mean and one at random.
* **real training cells** (the floor of the distribution metrics): as many training cells
  at random.
* **LapDDPM + accessibility decoder** (``accessibility_decoder=True``, ``rna`` graph): paired
  cells; its RNA is scored as above, its peaks against the held-out cells' real peaks (the
  correlation of their TF-IDF profiles, the correlation across peaks of how often each is
  open, open peaks per cell, MMD and RF AUC on the TF-IDF), next to a random LSI neighbour's
  real peaks, peaks drawn independently at their training rates and real training cells.

Scores on the held-out cells, log-normalised counts (1e4, log1p): **centred per-cell
Pearson**, the correlation of a cell's generated and real deviation from the training
cells' mean (the raw correlation is dominated by the average profile), averaged over cells;
**per-gene Pearson** across held-out cells (genes that vary in both), averaged;
**gene-gene Spearman**, the Spearman correlation of the real and generated gene-gene
correlation matrices (the paper's GRN comparison); and for draws, the distribution metrics
of :func:`scldiff.metrics.evaluate` (MMD, RF AUC). Each run goes to
``benchmarks/results/multiome/<dataset>/seed<k>.json``; ``--report`` writes
``multiome.md``/``multiome.json``.
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
import pandas as pd
import scipy.sparse as sp
import torch

import scldiff
from scldiff.graph import LSI
from scldiff.metrics import evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import DEFAULT_DATA_DIR, RESULTS, meta  # noqa: E402

RUNS = os.path.join(RESULTS, "multiome")
FILES = {"pbmc": "multiome_pbmc10x_muon_subset.h5ad",
         "snare": "multiome_snareseq_h1_hummus.h5ad"}
GRAPHS = ("rna", "atac", "both")
N_HVG = 2000
K = 15  # neighbours of the kNN baselines
N_DRAWS = 10  # draws per held-out cell whose mean is LapDDPM's prediction
CENTRED = "centred per-cell r"
METRICS = (CENTRED, "per-gene r", "gene-gene Spearman", "MMD", "RF AUC")
ATAC_METRICS = ("TF-IDF centred r", "peak rate r", "open peaks (generated / real)",
                "MMD (TF-IDF PCA)", "RF AUC (TF-IDF)", "cells without an open peak")


def load(dataset: str, data_dir: str) -> ad.AnnData:
    """Genes then peaks, ``var["modality"]``; cells with an open peak; SNARE-seq's 2,000 most
    variable genes."""
    import scanpy as sc

    path = os.path.join(data_dir, FILES[dataset])
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: the multiome benchmark reads ../shared/data "
                 "(see its README); pass --data-dir.")
    adata = ad.read_h5ad(path)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    rna = (adata.var["modality"] == "rna").to_numpy()
    adata = adata[np.asarray(adata.X[:, ~rna].sum(1)).ravel() > 0].copy()
    if rna.sum() > N_HVG:
        genes = adata[:, rna].copy()
        sc.pp.filter_genes(genes, min_cells=3)
        sc.pp.highly_variable_genes(genes, n_top_genes=N_HVG, flavor="seurat_v3")
        keep = genes.var_names[genes.var["highly_variable"]]
        adata = adata[:, np.concatenate([adata.var_names[rna][adata.var_names[rna].isin(keep)],
                                         adata.var_names[~rna]])].copy()
    return adata


def log_normalised(counts) -> np.ndarray:
    x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1e-12) * 1e4)


def prediction_scores(real: np.ndarray, predicted: np.ndarray, mean: np.ndarray) -> dict:
    """Centred per-cell Pearson, per-gene Pearson and gene-gene Spearman of log-normalised
    ``predicted`` against ``real`` (cells x genes), ``mean`` the training cells' mean."""
    from scipy.stats import spearmanr

    def rowwise(a, b):
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        norm = np.sqrt((a * a).sum(1) * (b * b).sum(1))
        ok = norm > 0
        return float(np.mean((a * b).sum(1)[ok] / norm[ok]))

    varying = (real.std(0) > 1e-9) & (predicted.std(0) > 1e-9)
    upper = np.triu_indices(int(varying.sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        real_gg = np.corrcoef(real[:, varying].T)[upper]
        pred_gg = np.corrcoef(predicted[:, varying].T)[upper]
    finite = np.isfinite(real_gg) & np.isfinite(pred_gg)  # pairs of genes that vary
    return {CENTRED: rowwise(real - mean, predicted - mean),
            "per-gene r": rowwise(real[:, varying].T, predicted[:, varying].T),
            "gene-gene Spearman": float(spearmanr(real_gg[finite], pred_gg[finite]).statistic)}


def draw_scores(test: ad.AnnData, counts: sp.csr_matrix, mean: np.ndarray) -> dict:
    """:func:`prediction_scores` of one draw per held-out cell, and the distribution
    metrics of :func:`~scldiff.metrics.evaluate` (unconditional)."""
    out = prediction_scores(log_normalised(test.X), log_normalised(counts), mean)
    generated = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), var=test.var.copy())
    table = evaluate(test, generated, markers=False, n_pcs=min(30, test.n_vars - 1))
    out.update({"MMD": float(table.loc["MMD", "unconditional"]),
                "RF AUC": float(table.loc["RF AUC", "unconditional"])})
    return out


def atac_scores(real: sp.csr_matrix, generated, lsi: LSI, train_tfidf_mean: np.ndarray,
                seed: int) -> dict:
    """Generated peaks (0/1) of the held-out cells against their real peaks, on their TF-IDF
    with the training IDF (a fixed transform, so that cells the LSI was fitted on, whose
    in-sample projections are inflated where peaks outnumber cells, are not favoured): the
    correlation of a cell's generated and real TF-IDF, centred on the training cells' mean;
    the correlation across peaks of the fraction of cells in which each is open; the ratio
    of open peaks per cell; MMD on a PCA of both sets pooled (20 components) and RF AUC
    (:func:`~scldiff.metrics.classifier_auc`, its own pooled PCA). Cells with no open peak
    (TF-IDF undefined) are left out of those scores and counted."""
    from sklearn.decomposition import PCA

    from scldiff.graph import binarize_peaks
    from scldiff.metrics import classifier_auc, mmd_rbf

    real, generated = binarize_peaks(real), binarize_peaks(generated)
    has_peak = np.asarray(generated.sum(1)).ravel() > 0
    a = lsi.tfidf(real).toarray() - train_tfidf_mean
    b = lsi.tfidf(generated[has_peak]).toarray() - train_tfidf_mean
    c, d = a[has_peak] - a[has_peak].mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    r = (c * d).sum(1) / np.sqrt((c * c).sum(1) * (d * d).sum(1))
    pooled = PCA(n_components=20, random_state=seed).fit_transform(np.vstack([a, b]))
    pooled /= pooled[: a.shape[0]].std()
    rate_real = np.asarray(real.mean(0)).ravel()
    rate_gen = np.asarray(generated.mean(0)).ravel()
    return {"TF-IDF centred r": float(np.mean(r)),
            "peak rate r": float(np.corrcoef(rate_real, rate_gen)[0, 1]),
            "open peaks (generated / real)": float(generated.sum() / real.sum()),
            "MMD (TF-IDF PCA)": mmd_rbf(pooled[: a.shape[0]], pooled[a.shape[0]:]),
            "RF AUC (TF-IDF)": classifier_auc(a, b, n_pcs=20, random_state=seed),
            "cells without an open peak": float(1 - has_peak.mean())}


def lapddpm(train: ad.AnnData, test: ad.AnnData, graph: str, seed: int, mean: np.ndarray
            ) -> tuple[dict, float, scldiff.LapDDPM]:
    """Scores of the ATAC-conditioned draws and of the mean of ``N_DRAWS`` draws."""
    import scvi

    scvi.settings.seed = seed
    data = train.copy()
    start = time.perf_counter()
    scldiff.LapDDPM.setup_anndata(data, modality_key="modality", graph_modality=graph)
    model = scldiff.LapDDPM(data)
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    genes = test[:, model.gene_names].copy()
    draw = model.generate(conditions=test, seed=seed, progress_bar=False)
    scores = {"draw": draw_scores(genes, draw.X, mean)}
    repeated = ad.concat([test] * N_DRAWS, index_unique="-")
    many = model.generate(conditions=repeated, seed=seed + 100, progress_bar=False)
    average = log_normalised(many.X).reshape(N_DRAWS, test.n_obs, -1).mean(0)
    scores["mean"] = prediction_scores(log_normalised(genes.X), average, mean)
    return scores, seconds, model


def multivi(train: ad.AnnData, test: ad.AnnData, n_genes: int, seed: int) -> tuple[np.ndarray,
                                                                                   float]:
    """MultiVI's imputed log-normalised RNA of the held-out cells, given as ATAC-only cells
    (no RNA counts: MultiVI then reads the cell's accessibility alone)."""
    import mudata
    import scvi

    scvi.settings.seed = seed
    x = sp.vstack([sp.csr_matrix(train.X), sp.csr_matrix(test.X)], format="csr")
    x = sp.hstack([x[:, :n_genes].multiply(np.r_[np.ones(train.n_obs),
                                                  np.zeros(test.n_obs)][:, None]),
                   x[:, n_genes:]], format="csr")
    names = np.concatenate([train.obs_names, test.obs_names])
    obs = pd.DataFrame(index=names)
    mdata = mudata.MuData({
        "rna": ad.AnnData(sp.csr_matrix(x[:, :n_genes]), obs=obs.copy(),
                          var=train.var.iloc[:n_genes].copy()),
        "atac": ad.AnnData(sp.csr_matrix(x[:, n_genes:]), obs=obs.copy(),
                           var=train.var.iloc[n_genes:].copy())})
    start = time.perf_counter()
    scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna",
                                                       "atac_layer": "atac"})
    model = scvi.model.MULTIVI(mdata, n_genes=n_genes, n_regions=x.shape[1] - n_genes)
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    expression = model.get_normalized_expression(
        mdata, indices=np.arange(train.n_obs, len(names)), return_numpy=True)
    return np.log1p(np.asarray(expression, dtype=np.float64) * 1e4), seconds


def accessibility(train: ad.AnnData, test: ad.AnnData, results: dict, index: np.ndarray,
                  lsi: LSI, seed: int, mean: np.ndarray, floor: np.ndarray
                  ) -> tuple[dict, float]:
    """Paired cells from a model with an accessibility decoder (``rna`` graph): its RNA
    draws go to ``results``; its peaks, from the held-out cells' chromatin and without it,
    are scored (:func:`atac_scores`) next to a random LSI neighbour's real peaks, peaks
    drawn independently at their training rates, and as many real training cells (the
    floor)."""
    import scvi

    scvi.settings.seed = seed
    data = train.copy()
    start = time.perf_counter()
    scldiff.LapDDPM.setup_anndata(data, modality_key="modality")
    model = scldiff.LapDDPM(data, accessibility_decoder=True)
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    genes, peaks = model.gene_names, model.peak_names
    test_genes = test[:, genes].copy()
    paired = model.generate(conditions=test, seed=seed, progress_bar=False)
    blind = model.generate(conditions=test, seed=seed, progress_bar=False,
                           guidance_scale={"atac": 0.0})
    results["LapDDPM + accessibility decoder, ATAC"] = {
        "draw": draw_scores(test_genes, paired[:, genes].X, mean)}
    train_peaks = sp.csr_matrix(train[:, peaks].X)
    train_tfidf_mean = np.asarray(lsi.tfidf(train_peaks).mean(0)).ravel()
    real = sp.csr_matrix(test[:, peaks].X)
    rng = np.random.default_rng(seed)
    pick = index[np.arange(index.shape[0]), rng.integers(0, K, index.shape[0])]
    rate = np.asarray((train_peaks > 0).mean(0)).ravel()
    independent = sp.csr_matrix((rng.random(real.shape) < rate).astype(np.float32))
    atac = {"LapDDPM + accessibility decoder, ATAC": paired[:, peaks].X,
            "LapDDPM + accessibility decoder, unconditional": blind[:, peaks].X,
            "a neighbour in LSI": train_peaks[pick],
            "independent peaks at training rates": independent,
            "real training cells (floor)": train_peaks[floor]}
    return {name: atac_scores(real, x, lsi, train_tfidf_mean, seed)
            for name, x in atac.items()}, \
        seconds


def neighbours(reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=K).fit(reference).kneighbors(
        query, return_distance=False)


def knn_scores(train_rna: np.ndarray, test: ad.AnnData, index: np.ndarray, mean: np.ndarray,
               train_counts: sp.csr_matrix, seed: int) -> dict:
    """Scores of the neighbours' mean (a prediction) and of one of them (a draw)."""
    real = log_normalised(test.X)
    out = {"mean": prediction_scores(real, train_rna[index].mean(1), mean)}
    pick = index[np.arange(index.shape[0]),
                 np.random.default_rng(seed).integers(0, K, index.shape[0])]
    out["draw"] = draw_scores(test, train_counts[pick], mean)
    return out


def run(dataset: str, seed: int, data_dir: str, force: bool) -> None:
    path = os.path.join(RUNS, dataset, f"seed{seed}.json")
    if os.path.exists(path) and not force:
        print(f"{path} exists; skipped (--force refits).", flush=True)
        return
    adata = load(dataset, data_dir)
    n = adata.n_obs
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, n // 5, replace=False)] = True
    train, test = adata[~mask].copy(), adata[mask].copy()
    n_genes = int((adata.var["modality"] == "rna").sum())
    keep_genes = np.asarray(train.X[:, :n_genes].sum(0)).ravel() > 0
    keep = np.concatenate([keep_genes, np.ones(adata.n_vars - n_genes, dtype=bool)])
    train, test = train[:, keep].copy(), test[:, keep].copy()
    n_genes = int(keep_genes.sum())
    train_rna = log_normalised(train.X[:, :n_genes])
    mean = train_rna.mean(0)
    test_genes = test[:, :n_genes].copy()
    results, seconds = {}, {}
    for graph in GRAPHS:
        scores, seconds[f"LapDDPM ({graph} graph)"], model = lapddpm(train, test, graph, seed,
                                                                     mean)
        results[f"LapDDPM, ATAC ({graph} graph)"] = scores
        if graph == "rna":
            blind = model.generate(conditions=test, seed=seed, progress_bar=False,
                                   guidance_scale={"atac": 0.0})
            results["LapDDPM, unconditional"] = {"draw": draw_scores(test_genes, blind.X,
                                                                     mean)}
            lsi = LSI.from_dict(model.lsi_)
    try:
        imputed, seconds["MultiVI"] = multivi(train, test, n_genes, seed)
        results["MultiVI"] = {"mean": prediction_scores(log_normalised(test_genes.X), imputed,
                                                        mean)}
    except Exception as err:  # reported, not hidden: the table says why the row is missing
        results["MultiVI"] = {"error": f"{type(err).__name__}: {err}"}
    train_counts = sp.csr_matrix(train.X[:, :n_genes])
    index = neighbours(lsi.transform(train.X[:, n_genes:]), lsi.transform(test.X[:, n_genes:]))
    results["kNN in LSI"] = knn_scores(train_rna, test_genes, index, mean, train_counts, seed)
    lsi_index = index
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(30, n_genes - 1), random_state=seed).fit(train_rna)
    index = neighbours(pca.transform(train_rna), pca.transform(log_normalised(test_genes.X)))
    results["nearest in RNA (ceiling)"] = knn_scores(train_rna, test_genes, index, mean,
                                                     train_counts, seed)
    rng = np.random.default_rng(seed)
    floor = rng.choice(train.n_obs, test.n_obs, replace=False)
    results["real training cells (floor)"] = {"draw": draw_scores(test_genes,
                                                                  train_counts[floor], mean)}
    atac, seconds["LapDDPM + accessibility decoder"] = accessibility(
        train, test, results, lsi_index, lsi, seed, mean, floor)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"dataset": dataset, "seed": seed, "n_cells": int(n), "atac": atac,
                   "n_held_out": int(mask.sum()), "n_genes": n_genes,
                   "n_peaks": int(adata.n_vars - (adata.var["modality"] == "rna").sum()),
                   "scores": results, "fit_seconds": seconds, "meta": meta()}, f, indent=1)
    print(f"{dataset} seed {seed}: " + ", ".join(
        f"{k}: {v.get('draw', v.get('mean', {})).get(CENTRED, float('nan')):.3f}"
        for k, v in results.items() if "error" not in v), flush=True)


def report() -> None:
    """``multiome.md`` and ``multiome.json``: mean ± sd over seeds of every score."""
    rows, summary = [], {}
    for dataset in FILES:
        folder = os.path.join(RUNS, dataset)
        if not os.path.isdir(folder):
            continue
        runs = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))
                if f.endswith(".json")]
        first = runs[0]
        rows.append(f"\n## {dataset}: {first['n_cells']} cells, {first['n_genes']} genes, "
                    f"{first['n_peaks']} peaks; {first['n_held_out']} held out per seed, "
                    f"{len(runs)} seed(s)\n")
        rows.append("| method | output | " + " | ".join(METRICS) + " | fit (s) |")
        rows.append("|---|---|" + "---|" * (len(METRICS) + 1))
        summary[dataset] = {}
        for method in first["scores"]:
            if "error" in first["scores"][method]:
                rows.append(f"| {method} | {first['scores'][method]['error'][:80]} |")
                continue
            for output in ("draw", "mean"):
                values = [r["scores"][method].get(output) for r in runs]
                if values[0] is None:
                    continue
                cells, entry = [], {}
                for metric in METRICS:
                    v = np.array([x[metric] for x in values if metric in x], dtype=float)
                    entry[metric] = [float(v.mean()), float(v.std())] if v.size else None
                    cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if v.size else "")
                fits = [r["fit_seconds"].get(_fit_key(method)) for r in runs]
                fit = f"{np.mean(fits):.0f}" if fits[0] is not None else ""
                summary[dataset][f"{method} [{output}]"] = entry
                rows.append(f"| {method} | {output} | " + " | ".join(cells) + f" | {fit} |")
        rows.append(f"\nPeaks of the held-out cells ({dataset}): generated or taken, against "
                    "their real peaks\n")
        rows.append("| method | " + " | ".join(ATAC_METRICS) + " |")
        rows.append("|---|" + "---|" * len(ATAC_METRICS))
        for method in first.get("atac", {}):
            cells, entry = [], {}
            for metric in ATAC_METRICS:
                v = np.array([r["atac"][method][metric] for r in runs], dtype=float)
                entry[metric] = [float(v.mean()), float(v.std())]
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
            summary[dataset][f"{method} [peaks]"] = entry
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
    text = ("# Multiome benchmark (benchmarks/multiome.py)\n\nMean ± standard deviation over "
            "seeds, on the held-out fifth of the cells. *draw*: one generated (or real "
            "neighbour's) cell per held-out cell; *mean*: a prediction (LapDDPM: the mean of "
            f"{N_DRAWS} draws; kNN: the {K} neighbours' mean). Log-normalised counts; centred: "
            "minus the training cells' mean.\n" + "\n".join(rows) + "\n")
    with open(os.path.join(RESULTS, "multiome.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, "multiome.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(text)


def _fit_key(method: str) -> str | None:
    if method.startswith("LapDDPM, ATAC"):
        return "LapDDPM (" + method.split("(")[1]
    if method.startswith("LapDDPM + accessibility"):
        return "LapDDPM + accessibility decoder"
    return "MultiVI" if method == "MultiVI" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
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
            for seed in args.seeds:
                run(dataset, seed, args.data_dir, args.force)
    report()


if __name__ == "__main__":
    main()
