"""How large must the ScoreNet be? Quality and sampling time against its width and depth.

Usage (from the repository root, after ``python benchmarks/quality.py --datasets pbmc3k``)::

    python benchmarks/scorenet_size.py                          # 256x3, 128x3, 128x2; 3 seeds
    python benchmarks/scorenet_size.py --sizes 256x3 64x2 --seeds 0 --draws 1

The guided latent ODE is most of the generation time on a CPU, and nearly all of it is the
ScoreNet's matrix products, whose cost grows with the square of its width. This script
keeps stage A fixed and varies only the ScoreNet: for each split it takes the LapDDPM
model ``quality.py`` trained (``benchmarks/.cache/<dataset>/seed<k>/lapddpm_model``),
copies its encoder and decoder into a model with another ScoreNet, and trains stage B
alone (``train(n_epochs_stage_a=0)``, default stage-B length). The default size is
retrained the same way, so that every row has had the same stage-B training. Each model
generates the held-out label counts (``--draws`` draws), scored as ``quality.py`` does.
The time of 10,000 cells' latents (default sampler) is measured on an untrained ScoreNet
of each size (the cost does not depend on the weights); ``--retime`` measures it again
into the existing results, for an idle machine.

Writes ``benchmarks/results/scorenet_size_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import scldiff

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's split, scoring and cache)
from sampler_steps import METRICS, RESULTS, cached_split, mean_sd, write_results  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    width, _, depth = text.partition("x")
    try:
        return int(width), int(depth)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes look like 128x2 (width x blocks), got "
                                         f"{text!r}") from None


def with_scorenet(base: scldiff.LapDDPM, data, width: int, blocks: int) -> scldiff.LapDDPM:
    """A model on ``data`` with ``base``'s stage A and an untrained ScoreNet of this size."""
    model = scldiff.LapDDPM(data, score_hidden=width, score_blocks=blocks)
    state = {k: v for k, v in base.module.state_dict().items() if not k.startswith("score_net.")}
    missing, unexpected = model.module.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("score_net.") for k in missing):
        raise RuntimeError(f"stage-A weights do not fit: {missing}, {unexpected}")
    return model


def latent_seconds(width: int, blocks: int, n_labels: int, n_cells: int = 10_000,
                   repeats: int = 3) -> float:
    """Best time of the guided latents of ``n_cells`` cells (default sampler, guidance 2).

    The cost does not depend on the weights, so an untrained module of the same size is
    timed, apart from the training runs and at a fixed thread count.
    """
    from scldiff.module import LapDDPMModule

    torch.manual_seed(0)
    module = LapDDPMModule(n_input=10, n_labels=n_labels, n_lpe=0, score_hidden=width,
                           score_blocks=blocks).eval()
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, n_labels, n_cells))
    times = []
    with torch.no_grad():
        module.sample_latents(codes[:500], guidance_scale=2.0)
        for _ in range(repeats):
            start = time.perf_counter()
            module.sample_latents(codes, guidance_scale=2.0)
            times.append(time.perf_counter() - start)
    return min(times)


def retime(result: dict) -> dict:
    """Measure each size's latent time again (``--retime``), on an idle machine."""
    n_labels = result.get("n_labels", 8)
    timings = {}
    for size in dict.fromkeys(r["size"] for r in result["records"]):
        width, blocks = parse_size(size)
        timings[size] = latent_seconds(width, blocks, n_labels)
        print(f"{size}: {timings[size]:.2f} s", flush=True)
    for record in result["records"]:
        record["latents_10k_seconds"] = timings[record["size"]]
    result["threads"] = torch.get_num_threads()
    result["timing_meta"] = quality.meta()
    return result


def run(dataset: str, seeds: list[int], sizes: list[tuple[int, int]], draws: int,
        data_dir: str) -> dict:
    adata = quality.load_dataset(dataset, data_dir)
    records = []
    for seed in seeds:
        train, test, label_counts, path = cached_split(adata, dataset, seed)
        expressed = np.asarray(train.X.sum(0)).ravel() > 0  # as quality.fit_lapddpm
        data = train[:, expressed].copy()
        scldiff.LapDDPM.setup_anndata(data, labels_key=quality.LABELS)
        base = scldiff.LapDDPM.load(path, adata=False)
        for width, blocks in sizes:
            import scvi

            scvi.settings.seed = seed
            model = with_scorenet(base, data, width, blocks)
            start = time.perf_counter()
            model.train(n_epochs_stage_a=0, enable_progress_bar=False)
            fit_seconds = time.perf_counter() - start
            seconds = latent_seconds(width, blocks, len(model.label_categories))
            for draw in range(draws):
                generated = quality.lapddpm_generate(model, label_counts, seed + 100 * draw,
                                                     {}, test)
                metrics = quality.score(test, generated, seed)
                record = {"seed": seed, "size": f"{width}x{blocks}", "draw": draw,
                          "stage_b_seconds": fit_seconds, "latents_10k_seconds": seconds,
                          **{name: metrics.get(key) for name, key in METRICS.items()}}
                records.append(record)
                print(json.dumps(record), flush=True)
    return {"dataset": dataset, "seeds": seeds, "draws": draws, "records": records,
            "n_labels": int(adata.obs[quality.LABELS].nunique()),
            "threads": torch.get_num_threads(), "meta": quality.meta()}


def report(result: dict) -> str:
    records = result["records"]
    names = list(METRICS) + ["latents_10k_seconds"]
    lines = [f"Produced by `python benchmarks/scorenet_size.py` on {result['dataset']}: the "
             f"stage A of `quality.py`'s LapDDPM models (seeds "
             f"{', '.join(map(str, result['seeds']))}), stage B retrained for each ScoreNet "
             f"size (width x blocks), {result['draws']} generation draw(s) per seed; mean ± "
             f"sd over all draws. Latents: 10,000 cells, default sampler, guidance 2, "
             f"{result['threads']} threads, best of 3, timed at commit "
             f"{result.get('timing_meta', result['meta'])['commit']}. Code at commit "
             f"{result['meta']['commit']}.", "",
             "| ScoreNet | " + " | ".join(METRICS) + " | latents, 10k cells (s) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for size in dict.fromkeys(r["size"] for r in records):
        rows = [r for r in records if r["size"] == size]
        cells = [mean_sd(np.array([r[name] for r in rows if r[name] is not None],
                                  dtype=float)) for name in names]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pbmc3k", choices=quality.DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        default=[(256, 3), (128, 3), (128, 2)])
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=quality.DEFAULT_DATA_DIR)
    parser.add_argument("--retime", action="store_true",
                        help="only measure the latent times again, into the existing results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    stem = os.path.join(RESULTS, f"scorenet_size_{args.dataset}")
    if args.retime:
        with open(stem + ".json") as handle:
            result = retime(json.load(handle))
    else:
        result = run(args.dataset, args.seeds, args.sizes, args.draws, args.data_dir)
    write_results(stem, result, report(result))


if __name__ == "__main__":
    main()
