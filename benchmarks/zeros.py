"""Which zeros does LapDDPM's count model get wrong, and how much do they weigh?

Usage (from the repository root, after ``python benchmarks/quality.py --datasets pbmc3k``)::

    python benchmarks/zeros.py                          # PBMC3K, split 1, 2 draws
    python benchmarks/zeros.py --dataset zheng17 --seeds 0 1 2

For each split it takes the LapDDPM model ``quality.py`` trained and:

1. **Genes.** Decodes every training cell from a draw of its own posterior with its own
   library size (:meth:`~scldiff.LapDDPM.posterior_predictive_sample`) and compares the
   decoded cells with the same real cells, cell type by cell type, in the space of the
   metrics: the held-out cells' 2,000 highly variable genes, normalised to 10⁴ per cell
   and ``log1p``. The table lists the genes whose mean differs most there, with their mean
   counts and fractions of zeros, real and decoded.
2. **Weight of the zeros.** An oracle, not a generator: the posterior predictive for the
   held-out label counts, scored as ``quality.py`` scores (conditional MMD, RF AUC), and
   the same cells with each (cell type, gene)'s fraction of zeros set to that of the
   training cells of the type (zeros turned into ones, or counts into zeros, at random).
   If the metrics move a lot, the zeros are what separates the count model from real cells.

Writes ``benchmarks/results/zeros_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

import scldiff
from scldiff.metrics._evaluate import _seurat_v3_genes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's split, scoring and cache)
from prior_gap import LARGE, posterior_indices  # noqa: E402
from sampler_steps import RESULTS, cached_split, mean_sd, write_results  # noqa: E402

TOP = 6  # genes listed per cell type


def load(dataset: str, seed: int, adata: ad.AnnData):
    """The held-out cells, their label counts and the split's cached LapDDPM model."""
    train, test, label_counts, path = cached_split(adata, dataset, seed)
    expressed = np.asarray(train.X.sum(0)).ravel() > 0  # as quality.fit_lapddpm
    data = train[:, expressed].copy()
    scldiff.LapDDPM.setup_anndata(data, labels_key=quality.LABELS)
    return test, label_counts, scldiff.LapDDPM.load(path, adata=data)


def log_normalise(counts: np.ndarray) -> np.ndarray:
    library = counts.sum(1, keepdims=True)
    return np.log1p(counts * np.divide(1e4, library, out=np.zeros_like(library),
                                       where=library > 0))


def gene_table(model, test, seed: int) -> list[dict]:
    """Per large cell type, the genes whose log-normalised mean differs most between the
    training cells and their posterior predictive."""
    data = model.adata
    # the genes of the metrics: scldiff.metrics.shared_pca's selection on the held-out cells
    hvg = _seurat_v3_genes(sp.csr_matrix(test.X, dtype=np.float32), 2000)
    hvg_names = test.var_names[hvg]
    columns = data.var_names.get_indexer(hvg_names)
    columns = columns[columns >= 0]
    names = np.asarray(data.var_names)[columns]
    real = sp.csr_matrix(data.X)[:, columns].toarray()
    decoded = sp.csr_matrix(model.posterior_predictive_sample(
        indices=np.arange(data.n_obs), seed=seed).X)[:, columns].toarray()
    log_real, log_decoded = log_normalise(real), log_normalise(decoded)
    labels = data.obs[quality.LABELS].astype(str).to_numpy()
    test_labels = test.obs[quality.LABELS].astype(str).to_numpy()
    rows = []
    for label in np.unique(labels):
        if (test_labels == label).sum() < LARGE:
            continue
        cells = labels == label
        diff = log_decoded[cells].mean(0) - log_real[cells].mean(0)
        zeros_real, zeros_decoded = (real[cells] == 0).mean(0), (decoded[cells] == 0).mean(0)
        for g in np.argsort(-np.abs(diff))[:TOP]:
            rows.append({"seed": seed, "cell type": label, "gene": str(names[g]),
                         "log mean difference": float(diff[g]),
                         "mean count, real": float(real[cells, g].mean()),
                         "mean count, decoded": float(decoded[cells, g].mean()),
                         "zeros, real": float(zeros_real[g]),
                         "zeros, decoded": float(zeros_decoded[g])})
    return rows


def matched_zeros(counts: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                  reference_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``counts`` with each (label, gene)'s fraction of zeros moved to ``reference``'s, in
    expectation: zeros become ones with probability (d_ref - d) / (1 - d) where the
    reference detects the gene more often (d: fraction of nonzero counts), and counts
    become zeros with probability (d - d_ref) / d where it detects it less often."""
    out = counts.copy()
    for label in np.unique(labels):
        cells = labels == label
        block = out[cells]
        detected = (block > 0).mean(0)
        target = (reference[reference_labels == label] > 0).mean(0)
        add = np.clip((target - detected) / np.maximum(1.0 - detected, 1e-12), 0.0, 1.0)
        remove = np.clip((detected - target) / np.maximum(detected, 1e-12), 0.0, 1.0)
        u = rng.random(block.shape)
        zero = block == 0
        block[zero & (u < add)] = 1.0
        block[~zero & (u < remove)] = 0.0
        out[cells] = block
    return out


def oracle(model, test, label_counts: dict, seed: int, draws: int) -> list[dict]:
    data = model.adata
    train_labels = data.obs[quality.LABELS].astype(str).to_numpy()
    reference = sp.csr_matrix(data.X).toarray()
    records = []
    for draw in range(draws):
        draw_seed = seed + 100 * draw
        indices = posterior_indices(train_labels, label_counts,
                                    np.random.default_rng(draw_seed))
        decoded = model.posterior_predictive_sample(indices=indices, seed=draw_seed)
        counts = sp.csr_matrix(decoded.X).toarray()
        labels = decoded.obs[quality.LABELS].astype(str).to_numpy()
        fixed = matched_zeros(counts, labels, reference, train_labels,
                              np.random.default_rng(draw_seed))
        for name, matrix in (("posterior predictive", counts),
                             ("posterior predictive, zeros matched", fixed)):
            cells = ad.AnnData(sp.csr_matrix(matrix.astype(np.float32)),
                               obs=decoded.obs.copy(), var=decoded.var.copy())
            metrics = quality.score(test, quality.with_all_genes(cells, test.var_names), seed)
            records.append({"seed": seed, "draw": draw, "cells": name,
                            "cond. MMD": metrics["MMD | conditional"],
                            "RF AUC": metrics["RF AUC | unconditional"]})
    return records


def report(result: dict) -> str:
    lines = [f"Produced by `python benchmarks/zeros.py` on {result['dataset']} (splits "
             f"{', '.join(map(str, result['seeds']))}; code at commit "
             f"{result['meta']['commit']}): the LapDDPM models of `quality.py`.", "",
             "Posterior predictive of the training cells against the same cells, per cell "
             f"type with at least {LARGE} held-out cells: the {TOP} genes whose mean differs "
             "most in the metrics' space (log-normalised highly variable genes of the "
             "held-out cells).", "",
             "| split | cell type | gene | log mean, decoded − real | mean count, real → "
             "decoded | zeros, real → decoded |", "|---|---|---|---|---|---|"]
    for r in result["genes"]:
        lines.append(f"| {r['seed']} | {r['cell type']} | {r['gene']} | "
                     f"{r['log mean difference']:+.2f} | {r['mean count, real']:.2f} → "
                     f"{r['mean count, decoded']:.2f} | {r['zeros, real']:.3f} → "
                     f"{r['zeros, decoded']:.3f} |")
    lines += ["", "Weight of the zeros (an oracle: each cell type's fraction of zeros per gene "
              "set to its training cells'), scored against the held-out cells as "
              f"`quality.py` scores; mean ± sd over the splits' draws ({result['draws']} per "
              "split):", "",
              "| cells | cond. MMD | RF AUC |", "|---|---|---|"]
    for name in ("posterior predictive", "posterior predictive, zeros matched"):
        rows = [r for r in result["oracle"] if r["cells"] == name]
        lines.append(f"| {name} | "
                     + " | ".join(mean_sd(np.array([r[k] for r in rows]))
                                  for k in ("cond. MMD", "RF AUC")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pbmc3k", choices=quality.DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=quality.DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    adata = quality.load_dataset(args.dataset, args.data_dir)
    genes, records = [], []
    for seed in args.seeds:
        test, label_counts, model = load(args.dataset, seed, adata)
        genes += gene_table(model, test, seed)
        records += oracle(model, test, label_counts, seed, args.draws)
    result = {"dataset": args.dataset, "seeds": args.seeds, "draws": args.draws,
              "genes": genes, "oracle": records, "meta": quality.meta()}
    write_results(os.path.join(RESULTS, f"zeros_{args.dataset}"), result, report(result))


if __name__ == "__main__":
    main()
