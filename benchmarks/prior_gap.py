"""Where is LapDDPM's remaining distance to real cells: in the count model or in the prior?

Usage (from the repository root, after ``python benchmarks/quality.py --datasets pbmc3k``)::

    python benchmarks/prior_gap.py                         # PBMC3K, seeds 0-2, 3 draws
    python benchmarks/prior_gap.py --dataset zheng17 --seeds 0 --draws 2
    python benchmarks/prior_gap.py --seeds 1 --name kl025 --train-kwargs '{"kl_weight": 0.25}'

The generated cells pass through two learned parts: the latent diffusion (the prior) and
the stage-A count model (decoder and likelihood). The diffusion is trained on the
encoder's posterior, so it cannot do better than decoding the posterior itself. For each
split this script takes the LapDDPM model ``quality.py`` trained
(``benchmarks/.cache/<dataset>/seed<k>/lapddpm_model``) and draws, for the held-out label
counts:

- **posterior predictive**: training cells of each label, each decoded from a draw of its
  own posterior with its own library size
  (:meth:`~scldiff.LapDDPM.posterior_predictive_sample`): the count model alone;
- **diffusion**: :meth:`~scldiff.LapDDPM.generate` at its defaults, as ``quality.py``;

and scores both as ``quality.py`` does, beside the real-vs-real floor of the same split
(training cells against the held-out ones). If the posterior predictive sits at the floor
and the diffusion above it, the gap is in the prior; if both sit above the floor, it is in
the count model. The conditional MMD is also given on the cell types with at least 30
held-out cells, where it is not dominated by the few-cell types' sampling noise, and so is
how spread out the cells of those types are, relative to the floor's.

With ``--model-kwargs`` or ``--train-kwargs`` (JSON), a model of that variant is trained on
each split instead (as ``quality.py`` trains, not cached), to see whether a stage-A change
brings the posterior predictive closer; ``--name`` then labels the output files.

Writes ``benchmarks/results/prior_gap_<dataset>[_<name>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

import scldiff

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's split, scoring and cache)
from sampler_steps import (  # noqa: E402
    METRICS,
    RESULTS,
    cached_split,
    mean_sd,
    source_rows,
    write_results,
)

LARGE = 30  # held-out cells a cell type needs to count as large
LARGE_NAME = f"cond. MMD, types with ≥ {LARGE} cells"
SPREAD_NAME = "within-type spread / floor's"
SOURCES = ("floor", "posterior predictive", "diffusion")


def large_type_mmd(test, generated, seed: int) -> float:
    """Mean MMD over the cell types with at least ``LARGE`` held-out cells (PCA of
    :func:`scldiff.metrics.evaluate`: fit on the real cells, generated ones projected)."""
    x_real, x_gen = scldiff.metrics.shared_pca(test, generated, random_state=seed)
    real = test.obs[quality.LABELS].astype(str).to_numpy()
    fake = generated.obs[quality.LABELS].astype(str).to_numpy()
    labels, counts = np.unique(real, return_counts=True)
    return float(np.mean([scldiff.metrics.mmd_rbf(x_real[real == label], x_gen[fake == label])
                          for label in labels[counts >= LARGE]]))


def type_spreads(test, cells, seed: int) -> np.ndarray:
    """How spread out each large cell type of ``cells`` is: for each type with at least
    ``LARGE`` held-out cells, the mean squared distance between two of its cells in the PCA
    of :func:`large_type_mmd`. Divided by the floor's, it is 1 for cells as spread out as
    real training cells, below 1 for more concentrated ones."""
    real = test.obs[quality.LABELS].astype(str).to_numpy()
    labels, counts = np.unique(real, return_counts=True)
    _, x = scldiff.metrics.shared_pca(test, cells, random_state=seed)
    own = cells.obs[quality.LABELS].astype(str).to_numpy()
    return np.array([2.0 * ((x[own == label] - x[own == label].mean(0)) ** 2).sum(1).mean()
                     for label in labels[counts >= LARGE]])


def posterior_indices(train_labels: np.ndarray, label_counts: dict, rng) -> np.ndarray:
    """Training cells for the held-out label counts (without replacement where possible)."""
    chosen = []
    for label, n in label_counts.items():
        pool = np.flatnonzero(train_labels == label)
        chosen.append(rng.choice(pool, n, replace=n > pool.size))
    return np.concatenate(chosen)


def record(seed: int, source: str, draw: int, test, generated,
           floor_spreads: np.ndarray) -> dict:
    metrics = quality.score(test, generated, seed)
    out = {"seed": seed, "source": source, "draw": draw,
           **{name: metrics.get(key) for name, key in METRICS.items()},
           LARGE_NAME: large_type_mmd(test, generated, seed),
           SPREAD_NAME: float(np.mean(type_spreads(test, generated, seed) / floor_spreads))}
    print(json.dumps(out), flush=True)
    return out


def run(dataset: str, seeds: list[int], draws: int, data_dir: str,
        model_kwargs: dict | None = None, train_kwargs: dict | None = None,
        setup_kwargs: dict | None = None) -> dict:
    variant = bool(model_kwargs or train_kwargs or setup_kwargs)
    adata = quality.load_dataset(dataset, data_dir)
    records = []
    for seed in seeds:
        if variant:
            train, test = scldiff.metrics.stratified_split(adata, quality.LABELS, 0.2,
                                                           seed=seed)
            label_counts = {k: int(v) for k, v in
                            test.obs[quality.LABELS].value_counts().items() if v}
            model, _ = quality.fit_lapddpm(train, label_counts, seed, setup_kwargs or {},
                                           train_kwargs or {}, model_kwargs)
        else:
            train, test, label_counts, path = cached_split(adata, dataset, seed)
            expressed = np.asarray(train.X.sum(0)).ravel() > 0  # as quality.fit_lapddpm
            data = train[:, expressed].copy()
            scldiff.LapDDPM.setup_anndata(data, labels_key=quality.LABELS)
            model = scldiff.LapDDPM.load(path, adata=data)
        floor = scldiff.metrics.label_matched_sample(train, test, quality.LABELS, seed=seed)
        floor_spreads = type_spreads(test, floor, seed)
        records.append(record(seed, "floor", 0, test, floor, floor_spreads))
        train_labels = model.adata.obs[quality.LABELS].astype(str).to_numpy()
        for draw in range(draws):
            draw_seed = seed + 100 * draw
            indices = posterior_indices(train_labels, label_counts,
                                        np.random.default_rng(draw_seed))
            posterior = model.posterior_predictive_sample(indices=indices, seed=draw_seed)
            records.append(record(seed, "posterior predictive", draw, test,
                                  quality.with_all_genes(posterior, test.var_names),
                                  floor_spreads))
            records.append(record(seed, "diffusion", draw, test, quality.lapddpm_generate(
                model, label_counts, draw_seed, {}, test), floor_spreads))
    return {"dataset": dataset, "seeds": seeds, "draws": draws, "records": records,
            "model_kwargs": model_kwargs or {}, "train_kwargs": train_kwargs or {},
            "setup_kwargs": setup_kwargs or {}, "meta": quality.meta()}


def report(result: dict) -> str:
    records = result["records"]
    # SPREAD_NAME: absent from the records of runs before it was measured
    names = list(METRICS) + [LARGE_NAME] + [SPREAD_NAME] * any(SPREAD_NAME in r
                                                                for r in records)
    kwargs = {k: result.get(k) for k in ("setup_kwargs", "model_kwargs", "train_kwargs")
              if result.get(k)}
    models = (f"LapDDPM models trained with {json.dumps(kwargs)}" if kwargs
              else "LapDDPM models of `quality.py`")
    lines = [f"Produced by `python benchmarks/prior_gap.py` on {result['dataset']}: the "
             f"{models} (seeds {', '.join(map(str, result['seeds']))}), "
             f"{result['draws']} draw(s) per seed of the posterior predictive (training cells "
             f"decoded from their own posteriors and library sizes) and of the diffusion "
             f"(`generate()`); mean ± sd over all draws. Code at commit "
             f"{result['meta']['commit']}.", "",
             "| cells | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += source_rows(records, SOURCES, list(names))
    lines += ["", "Conditional MMD per split:", "",
              "| split | " + " | ".join(SOURCES) + " |", "|---|" + "---|" * len(SOURCES)]
    for seed in result["seeds"]:
        cells = [mean_sd(np.array([r["cond. MMD"] for r in records
                                   if r["seed"] == seed and r["source"] == s], dtype=float))
                 for s in SOURCES]
        lines.append(f"| seed {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pbmc3k", choices=quality.DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=quality.DEFAULT_DATA_DIR)
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help='LapDDPM(...) arguments of a variant, JSON: \'{"n_hidden": 256}\'')
    parser.add_argument("--train-kwargs", type=json.loads, default=None,
                        help="train(...) arguments of a variant, JSON")
    parser.add_argument("--setup-kwargs", type=json.loads, default=None,
                        help='setup_anndata(...) arguments of a variant, JSON: '
                             '\'{"n_neighbors": 30}\'')
    parser.add_argument("--name", default=None, help="suffix of the output files")
    args = parser.parse_args(argv)
    if (args.model_kwargs or args.train_kwargs or args.setup_kwargs) and not args.name:
        parser.error("a variant (--model-kwargs/--train-kwargs/--setup-kwargs) needs --name "
                     "for its files.")
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    result = run(args.dataset, args.seeds, args.draws, args.data_dir, args.model_kwargs,
                 args.train_kwargs, args.setup_kwargs)
    stem = f"prior_gap_{args.dataset}" + (f"_{args.name}" if args.name else "")
    write_results(os.path.join(RESULTS, stem), result, report(result))


if __name__ == "__main__":
    main()
