"""Does a cell's library size need to follow its state? The count model with four library models.

Usage (from the repository root, after ``python benchmarks/quality.py``)::

    python benchmarks/library_coupling.py                       # PBMC3K, seeds 0-2, 3 draws
    python benchmarks/library_coupling.py --dataset zheng17

For each split, this script takes the LapDDPM model ``quality.py`` trained
(``benchmarks/.cache/<dataset>/seed<k>/lapddpm_model``), draws training cells for the
held-out label counts, draws a latent from each one's posterior and decodes it with four
library sizes:

- **own**: the cell's own total count, the real pairing of depth and state (as
  :meth:`~scldiff.LapDDPM.posterior_predictive_sample`);
- **shuffled within label**: another training cell's of the same label, which keeps each
  label's library distribution and breaks the pairing;
- **latent**: drawn given the latent, as ``generate(library_size="latent")`` does
  (:class:`~scldiff.module.LatentLibrary`);
- **label**: drawn from the label's training libraries, as ``generate(library_size="label")``.

Each set is scored as ``quality.py`` scores generated cells, with the real-vs-real floor of
the split beside them. ``library–expression R²`` (:func:`scldiff.metrics.library_coupling`)
is how much of the log library size the first 10 principal components explain within cell
types: the floor's is the real cells'.

Writes ``benchmarks/results/library_coupling_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import sys

import anndata as ad
import numpy as np
import pandas as pd
import torch

import scldiff
from scldiff.model._lapddpm import _sample_quantiles

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's split, scoring and cache)
from prior_gap import posterior_indices  # noqa: E402
from sampler_steps import (  # noqa: E402
    RESULTS,
    benchmark_parser,
    cached_model_with_data,
    quiet_threads,
    source_rows,
    write_results,
)

METRICS = {"cond. MMD": "MMD | conditional", "cond. W2": "W2 | conditional",
           "RF AUC": "RF AUC | unconditional",
           "library–expression R²": "library-expression R2 (generated) | conditional"}
SOURCES = ("floor", "own", "shuffled within label", "latent", "label")


def libraries(model: scldiff.LapDDPM, collator, indices: np.ndarray, z: torch.Tensor,
              rng: np.random.Generator, generator: torch.Generator) -> dict[str, np.ndarray]:
    """The four library sizes of the cells ``indices`` (training rows) with latents ``z``."""
    own = collator.library[indices].astype(np.float32)
    codes = collator.labels[indices]
    shuffled = own.copy()
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        shuffled[rows] = own[rng.permutation(rows)]
    latent = model._latent_library().sample(z, torch.from_numpy(codes), generator).numpy()
    label = np.exp(_sample_quantiles(np.asarray(model.library_log_quantiles_), codes, rng))
    return {"own": own, "shuffled within label": shuffled, "latent": latent,
            "label": label.astype(np.float32)}


def run(dataset: str, seeds: list[int], draws: int, data_dir: str) -> dict:
    adata = quality.load_dataset(dataset, data_dir)
    records = []
    for seed in seeds:
        train, test, label_counts, model = cached_model_with_data(adata, dataset, seed)
        if model.library_latent_ is None:
            raise SystemExit(f"The {dataset} seed-{seed} model has no regression of the "
                             "library size on the latent: train it again with "
                             "`python benchmarks/quality.py --force`.")
        floor = scldiff.metrics.label_matched_sample(train, test, quality.LABELS, seed=seed)
        records.append(record(seed, "floor", 0, test, floor))
        names = model.adata.obs[quality.LABELS].astype(str).to_numpy()
        collator = model._collator(model.adata)
        mean, logvar = model._posterior(collator, np.arange(model.adata.n_obs))
        for draw in range(draws):
            draw_seed = seed + 100 * draw
            rng = np.random.default_rng(draw_seed)
            generator = torch.Generator().manual_seed(draw_seed)
            indices = posterior_indices(names, label_counts, rng)
            z = mean[indices] + torch.randn(len(indices), mean.shape[1],
                                            generator=generator) * (0.5 * logvar[indices]).exp()
            labels = torch.from_numpy(collator.labels[indices]).long()
            for source, library in libraries(model, collator, indices, z, rng,
                                             generator).items():
                counts = model.module.decode_counts(z, torch.from_numpy(library),
                                                    np.random.default_rng(draw_seed),
                                                    labels=labels)
                cells = ad.AnnData(counts, obs=pd.DataFrame(
                    {quality.LABELS: names[indices]},
                    index=[f"cell-{i}" for i in range(len(indices))]))
                cells.var_names = model.adata.var_names
                records.append(record(seed, source, draw, test,
                                      quality.with_all_genes(cells, test.var_names)))
    return {"dataset": dataset, "seeds": seeds, "draws": draws, "records": records,
            "meta": quality.meta()}


def record(seed: int, source: str, draw: int, test, cells) -> dict:
    metrics = quality.score(test, cells, seed)
    out = {"seed": seed, "source": source, "draw": draw,
           **{name: metrics.get(key) for name, key in METRICS.items()}}
    print(json.dumps(out), flush=True)
    return out


def report(result: dict) -> str:
    records = result["records"]
    lines = [f"Produced by `python benchmarks/library_coupling.py` on {result['dataset']}: the "
             f"LapDDPM models of `quality.py` (seeds {', '.join(map(str, result['seeds']))}), "
             f"{result['draws']} draw(s) per seed of training cells' posterior latents, "
             "decoded with each library model; mean ± sd over all draws. Code at commit "
             f"{result['meta']['commit']}.", "",
             "| library sizes | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += source_rows(records, SOURCES, list(METRICS))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = benchmark_parser(__doc__.splitlines()[0], draws=3).parse_args(argv)
    quiet_threads(args.threads)
    result = run(args.dataset, args.seeds, args.draws, args.data_dir)
    write_results(os.path.join(RESULTS, f"library_coupling_{args.dataset}"), result,
                  report(result))


if __name__ == "__main__":
    main()
