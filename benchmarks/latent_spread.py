"""Do the samplers reproduce the latent distribution the diffusion was trained on?

Usage (from the repository root, after ``python benchmarks/quality.py``)::

    python benchmarks/latent_spread.py                      # PBMC3K, seeds 0-2
    python benchmarks/latent_spread.py --dataset zheng17

The diffusion is trained on latents drawn from the training cells' posteriors. For the
LapDDPM models ``quality.py`` trained and kept, this script draws one such latent per
training cell and, for the same labels, latents from each sampler at guidance 1 (the
conditional model itself) and 2 (sharper than ``generate()``'s 1.5), and reports the
ratio of the generated latents' total variance to the posterior draws', per label (the
mean over labels) and over all cells. A sampler that reproduces the learned distribution gives
about 1 at guidance 1; guidance above 1 may concentrate each label.

Writes ``benchmarks/results/latent_spread_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's split and cache)
from sampler_steps import (  # noqa: E402
    RESULTS,
    benchmark_parser,
    cached_model_with_data,
    mean_sd,
    quiet_threads,
    write_results,
)

SAMPLERS = (("ode", 10), ("ode", 50), ("ddim", 200), ("sde", 500))


def variance_ratios(z: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[float, float]:
    """Mean over labels of the per-label total-variance ratio, and the ratio over all."""
    per_label = [(z[labels == u].var(0).sum() / reference[labels == u].var(0).sum()).item()
                 for u in labels.unique() if (labels == u).sum() > 2]
    return float(np.mean(per_label)), (z.var(0).sum() / reference.var(0).sum()).item()


def run(dataset: str, seeds: list[int], data_dir: str) -> dict:
    adata = quality.load_dataset(dataset, data_dir)
    records = []
    for seed in seeds:
        model = cached_model_with_data(adata, dataset, seed)[3]
        collator = model._collator(model.adata)
        mean, logvar = model._posterior(collator, np.arange(model.adata.n_obs))
        generator = torch.Generator().manual_seed(seed)
        posterior = mean + torch.randn(mean.shape, generator=generator) * (0.5 * logvar).exp()
        labels = torch.from_numpy(collator.labels).long()
        for (sampler, steps), scale in [(s, w) for s in SAMPLERS for w in (1.0, 2.0)]:
            z = model.module.sample_latents(labels, guidance_scale=scale, sampler=sampler,
                                            n_steps=steps,
                                            generator=torch.Generator().manual_seed(seed))
            per_label, overall = variance_ratios(z[:, : mean.shape[1]], posterior, labels)
            record = {"seed": seed, "sampler": sampler, "n_steps": steps,
                      "guidance_scale": scale, "per label": per_label, "all cells": overall}
            records.append(record)
            print(json.dumps(record), flush=True)
    return {"dataset": dataset, "seeds": seeds, "records": records, "meta": quality.meta()}


def report(result: dict) -> str:
    records = result["records"]
    lines = [f"Produced by `python benchmarks/latent_spread.py` on {result['dataset']}: the "
             f"LapDDPM models of `quality.py` (seeds {', '.join(map(str, result['seeds']))}); "
             "total variance of generated latents over that of latents drawn from the "
             "training cells' posteriors, same labels (1 is exact); mean ± sd over seeds. "
             f"Code at commit {result['meta']['commit']}.", "",
             "| sampler | steps | guidance | per label | all cells |", "|---|---|---|---|---|"]
    for (sampler, steps), scale in [(s, w) for s in SAMPLERS for w in (1.0, 2.0)]:
        rows = [r for r in records if (r["sampler"], r["n_steps"], r["guidance_scale"])
                == (sampler, steps, scale)]
        lines.append(f"| {sampler} | {steps} | {scale:g} | "
                     + " | ".join(mean_sd(np.array([r[k] for r in rows]))
                                  for k in ("per label", "all cells")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = benchmark_parser(__doc__.splitlines()[0]).parse_args(argv)
    quiet_threads(args.threads)
    result = run(args.dataset, args.seeds, args.data_dir)
    write_results(os.path.join(RESULTS, f"latent_spread_{args.dataset}"), result,
                  report(result))


if __name__ == "__main__":
    main()
