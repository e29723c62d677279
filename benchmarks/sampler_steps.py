"""How many ODE steps does generation need? Quality against the number of sampler steps.

Usage (from the repository root, after ``python benchmarks/quality.py --datasets pbmc3k``)::

    python benchmarks/sampler_steps.py                    # 10, 15, 20, 30 steps, 3 seeds
    python benchmarks/sampler_steps.py --steps 5 10 30 --seeds 0 --draws 1
    python benchmarks/sampler_steps.py --steps 10 --guidance 1 1.5 2 --draws 3 --name guidance
    python benchmarks/sampler_steps.py --steps 10 --draws 3 --library-size latent label \
        --name library_latent
    python benchmarks/sampler_steps.py --steps 10 --draws 3 --guidance 1.5 2 \
        --interval all 0,0.8 0.05,1 --name interval

The latent ODE (DPM-Solver++ 2M) is three quarters of the generation time on a CPU, and
its cost is proportional to the number of steps. This script takes the LapDDPM models that
``quality.py`` trained and kept (``benchmarks/.cache/<dataset>/seed<k>/lapddpm_model``, the
default settings), generates the held-out label counts of each split with each number of
steps, each guidance scale (``--guidance``, default generate()'s) and each way of drawing
library sizes (``--library-size``, default the model's), each interval of guided times
(``--interval``, default all; ``--draws`` draws each, different
generation seeds, the same for every setting), and scores them with
:func:`scldiff.metrics.evaluate` as ``quality.py`` does. The floor and scVI rows of the
same splits are read from ``quality.py``'s finished runs, for scale.

Writes ``benchmarks/results/sampler_steps_<dataset>[_<name>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import sys

import numpy as np
import torch

import scldiff

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import quality  # noqa: E402  (the benchmark's split, scoring and cache)

METRICS = {"cond. MMD": "MMD | conditional", "cond. W2": "W2 | conditional",
           "RF AUC": "RF AUC | unconditional", "TSTR F1": "TSTR macro F1 | conditional"}
RESULTS = os.path.join(HERE, "results")


def cached_split(adata, dataset: str, seed: int):
    """``quality.py``'s split of this seed (train, test, test label counts) and the path of
    the LapDDPM model it trained on it (an error naming the command when there is none)."""
    path = quality.model_path(dataset, seed, "lapddpm")
    if not os.path.isdir(path):
        raise SystemExit(f"No trained LapDDPM model at {path}: run "
                         f"`python benchmarks/quality.py --datasets {dataset} --seeds "
                         f"{seed}` first.")
    train, test = scldiff.metrics.stratified_split(adata, quality.LABELS, 0.2, seed=seed)
    label_counts = {k: int(v) for k, v in test.obs[quality.LABELS].value_counts().items()
                    if v}
    return train, test, label_counts, path


def cached_model_with_data(adata, dataset: str, seed: int):
    """``quality.py``'s split of this seed (train, test, test label counts) and the LapDDPM
    model it trained there, loaded with the training cells (set up as ``quality.py`` set
    them up), so that it can encode them."""
    train, test, label_counts, path = cached_split(adata, dataset, seed)
    data = train[:, np.asarray(train.X.sum(0)).ravel() > 0].copy()  # as quality.fit_lapddpm
    scldiff.LapDDPM.setup_anndata(data, labels_key=quality.LABELS)
    return train, test, label_counts, scldiff.LapDDPM.load(path, adata=data)


def benchmark_parser(description: str, draws: int | None = None) -> argparse.ArgumentParser:
    """The options every script on ``quality.py``'s cached models takes: ``--dataset``,
    ``--seeds``, ``--threads``, ``--data-dir`` and, with a default, ``--draws``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="pbmc3k", choices=quality.DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    if draws is not None:
        parser.add_argument("--draws", type=int, default=draws)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=quality.DEFAULT_DATA_DIR)
    return parser


def source_rows(records: list[dict], sources: tuple[str, ...], names: list[str]) -> list[str]:
    """One markdown row per source: ``mean ± sd`` of each metric over its records."""
    lines = []
    for source in sources:
        rows = [r for r in records if r["source"] == source]
        cells = [mean_sd(np.array([r[n] for r in rows if r.get(n) is not None], dtype=float))
                 for n in names]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return lines


def quiet_threads(threads: int | None) -> None:
    """Set torch's CPU threads (when given) and silence library warnings."""
    import warnings

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")


def mean_sd(values: np.ndarray) -> str:
    """``mean ± sd`` of a table cell (the mean alone for one value or equal values)."""
    if values.size > 1 and np.ptp(values) > 0:
        return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
    return f"{values.mean():.3f}" if values.size else ""


# generate()'s guidance scale
DEFAULT_GUIDANCE = inspect.signature(scldiff.LapDDPM.generate).parameters["guidance_scale"].default


def run(dataset: str, seeds: list[int], steps: list[int], draws: int, data_dir: str,
        guidance: tuple[float, ...] = (DEFAULT_GUIDANCE,),
        library_sizes: tuple[str | None, ...] = (None,),
        intervals: tuple[tuple[float, float] | None, ...] = (None,)) -> dict:
    adata = quality.load_dataset(dataset, data_dir)
    records = []
    for seed in seeds:
        _, test, label_counts, path = cached_split(adata, dataset, seed)
        model = scldiff.LapDDPM.load(path, adata=False)
        for n_steps, scale, library, interval, draw in itertools.product(
                steps, guidance, library_sizes, intervals, range(draws)):
            generated = quality.lapddpm_generate(
                model, label_counts, seed + 100 * draw,
                {"n_steps": n_steps, "guidance_scale": scale, "library_size": library,
                 "guidance_interval": interval}, test)
            metrics = quality.score(test, generated, seed)
            record = {"seed": seed, "n_steps": n_steps, "guidance_scale": scale,
                      "library_size": library or model.library_size,
                      "guidance_interval": list(interval or (0.0, 1.0)), "draw": draw,
                      **{name: metrics.get(key) for name, key in METRICS.items()}}
            records.append(record)
            print(json.dumps(record), flush=True)
    references = {}
    for method in ("floor", "scvi"):
        rows = []
        for seed in seeds:
            try:
                with open(quality.run_path(dataset, seed, method)) as handle:
                    rows.append(json.load(handle)["metrics"])
            except OSError:
                continue
        if rows:
            references[method] = {name: float(np.mean([r[key] for r in rows if key in r]))
                                  for name, key in METRICS.items()
                                  if any(key in r for r in rows)}
    return {"dataset": dataset, "seeds": seeds, "draws": draws, "records": records,
            "references": references, "meta": quality.meta()}


def report(result: dict) -> str:
    records = result["records"]
    lines = [f"Produced by `python benchmarks/sampler_steps.py` on {result['dataset']}: the "
             f"LapDDPM models of `quality.py` (seeds {', '.join(map(str, result['seeds']))}), "
             f"{result['draws']} generation draw(s) per seed and step count; mean ± sd over "
             f"all draws. Code at commit {result['meta']['commit']}.", "",
             "| sampler steps | guidance scale | guided times t | library size | "
             + " | ".join(METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    # runs before --guidance existed used generate()'s default scale, 2, and runs before
    # --library-size the label's training libraries, and before --interval guided all times
    def setting(r: dict) -> tuple:
        return (r["n_steps"], r.get("guidance_scale", 2.0),
                tuple(r.get("guidance_interval", (0.0, 1.0))), r.get("library_size", "label"))

    for n_steps, scale, interval, library in sorted({setting(r) for r in records}):
        rows = [r for r in records if setting(r) == (n_steps, scale, interval, library)]
        cells = [mean_sd(np.array([r[name] for r in rows if r[name] is not None],
                                  dtype=float)) for name in METRICS]
        lines.append(f"| {n_steps} | {scale:g} | {interval[0]:g}–{interval[1]:g} | {library} | "
                     + " | ".join(cells) + " |")
    for method, values in result["references"].items():
        lines.append(f"| {method} (quality.py runs) | | | | "
                     + " | ".join(f"{values[name]:.3f}" if name in values else ""
                                  for name in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _interval(text: str) -> tuple[float, float] | None:
    """``--interval`` values: ``all`` or ``T_LOW,T_HIGH``."""
    if text == "all":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected T_LOW,T_HIGH or 'all', got {text!r}") from None
    return low, high


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pbmc3k", choices=quality.DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 15, 20, 30])
    parser.add_argument("--guidance", nargs="+", type=float, default=[DEFAULT_GUIDANCE],
                        help=f"guidance scales (default: generate()'s {DEFAULT_GUIDANCE})")
    parser.add_argument("--library-size", nargs="+", default=[None],
                        choices=["latent", "label"],
                        help="generate()'s library_size (default: the model's)")
    parser.add_argument("--interval", nargs="+", type=_interval, default=[None],
                        help="generate()'s guidance_interval, as T_LOW,T_HIGH, or 'all' "
                        "(the default: guidance at every step)")
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--name", default=None, help="suffix of the output files")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=quality.DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.dataset, args.seeds, args.steps, args.draws, args.data_dir,
                 tuple(args.guidance), tuple(args.library_size), tuple(args.interval))
    stem = f"sampler_steps_{args.dataset}" + (f"_{args.name}" if args.name else "")
    write_results(os.path.join(RESULTS, stem), result, report(result))


def write_results(stem: str, result: dict, table: str) -> None:
    """``<stem>.json`` and ``<stem>.md``; the table is printed too."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
