"""Speed and scale benchmark: generation, training steps, atlas-size setup, against scVI.

Usage (from the repository root, after ``make install``)::

    python benchmarks/speed.py                         # all parts, atlases of 10k and 100k cells
    python benchmarks/speed.py --parts generation training tricks
    python benchmarks/speed.py --parts scale --sizes 10000 100000 1000000 [--backed]
    python benchmarks/speed.py --quick                 # small and short: checks the script runs
    python benchmarks/speed.py --device cuda --full-training   # on a GPU, the default runs too

Parts (``speed_parts/``):

* **generation**: 10,000 cells from a PBMC3K model of the default architecture
  (``generate()``, best of ``--repeats``, in float32 and in bf16), split into the latents,
  the decoder with the count draws and the decoder's products alone, next to scVI's prior
  sampling in the same process; on a GPU also one batch profiled part by part.
* **training**: time per optimisation step of LapDDPM's two stages and of scVI on PBMC3K,
  the default runs' times estimated from them (``--full-training``: measured), and the
  host's time to build a stage-A minibatch.
* **tricks**: each speed trick against the plain path it replaces, in one process (docs
  "Performance").
* **scale**: a synthetic atlas made from PBMC3K (per-label negative binomial resampling of
  its 2,000 most variable genes), each size in a fresh process: setup's time and peak
  memory, the stage-A step (the smallest median of ``--windows`` windows of ``--steps``
  steps) and its memory growth, generating 100,000 cells, and a minibatch's host time next
  to torch_geometric's ``k_hop_subgraph``; ``--backed`` reads the atlas from a backed
  ``.h5ad``.

Timings mean something only on an otherwise idle machine; the results record the thread
count, processor and commit. Writes ``results/speed.json`` and ``speed.md``
(``speed_cuda.*`` on a GPU), keeping the earlier results of the parts not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings

import torch
from speed_parts.common import DEVICE, RESULTS, meta
from speed_parts.generation import bench_generation
from speed_parts.report import report
from speed_parts.scale import bench_scale, relative_steps, scale_worker
from speed_parts.training import bench_training
from speed_parts.tricks import bench_tricks

PARTS = ("generation", "training", "scale", "tricks")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--generate-cells", type=int, default=100_000,
                        help="cells generated in the scale part")
    parser.add_argument("--steps", type=int, default=100,
                        help="stage-A steps per timing window in the scale part")
    parser.add_argument("--windows", type=int, default=5,
                        help="scale part: timing windows; the step time is the smallest median")
    parser.add_argument("--backed", action="store_true",
                        help="scale part: read each atlas from a backed .h5ad (counts on disk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short runs: checks that the script works")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where models train and generate (auto: a GPU if there is one)")
    parser.add_argument("--full-training", action="store_true",
                        help="training part: also run each method's default training to the end")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--scale-worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _merge(results: dict, path: str, scale_run: bool) -> dict:
    """``results`` with the earlier results of the parts (and atlas sizes) not run now."""
    if not os.path.exists(path):
        return results
    with open(path) as handle:
        previous = json.load(handle)
    parts_meta = previous.get("meta", {}).get("parts", {})
    for part in PARTS:
        if part in previous and part not in results:
            results[part] = previous[part]
            results["meta"]["parts"][part] = parts_meta.get(part, previous.get("meta", {}))
    if scale_run and previous.get("scale"):
        sizes = {(r["n_cells"], r.get("backed", False)) for r in results["scale"]}
        kept = [r for r in previous["scale"]
                if (r["n_cells"], r.get("backed", False)) not in sizes]
        earlier = parts_meta.get("scale", previous.get("meta", {})).get("commit", "?")
        for record in kept:
            record.setdefault("commit", earlier)
        results["scale"] = relative_steps(sorted(
            kept + results["scale"], key=lambda r: (r.get("backed", False), r["n_cells"])))
    return results


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    DEVICE["name"] = ("cuda" if torch.cuda.is_available() else "cpu") \
        if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.scale_worker is not None:
        print(json.dumps(scale_worker(args.scale_worker, args.steps, args.generate_cells,
                                      args.backed, args.windows)))
        return
    n_gen, epochs, gen_epochs = 10_000, 3, (10, 20)
    if args.quick:
        n_gen, epochs, gen_epochs = 2_000, 1, (1, 1)
        args.sizes, args.steps, args.generate_cells, args.repeats = [3_000], 20, 5_000, 1
        args.windows = 2
    results: dict = {"meta": meta()}
    if "generation" in args.parts:
        print("[generation] ...", flush=True)
        results["generation"] = bench_generation(n_gen, args.repeats, gen_epochs)
    if "training" in args.parts:
        print("[training] ...", flush=True)
        results["training"] = bench_training(epochs, args.full_training)
    if "tricks" in args.parts:
        print("[tricks] ...", flush=True)
        results["tricks"] = bench_tricks(args.repeats)
    if "scale" in args.parts:
        results["scale"] = bench_scale(os.path.abspath(__file__), args.sizes, args.steps,
                                       args.generate_cells,
                                       args.threads or torch.get_num_threads(), args.backed,
                                       args.windows)
        for record in results["scale"]:  # sizes may later be re-measured one by one
            record["commit"] = results["meta"]["commit"]
    now = dict(results["meta"])
    results["meta"]["parts"] = {part: now for part in PARTS if part in results}
    name = "speed" if DEVICE["name"] == "cpu" else f"speed_{DEVICE['name']}"
    path = os.path.join(args.output, f"{name}.json")
    if not args.quick:
        results = _merge(results, path, "scale" in args.parts)
    text = report(results)
    print(text)
    if args.quick:
        return  # a check, not a measurement: nothing is written
    os.makedirs(args.output, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(args.output, f"{name}.md"), "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
