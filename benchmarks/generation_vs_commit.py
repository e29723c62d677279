"""Generation time of this tree against another commit's, side by side on one machine.

Each round trains a PBMC3K model (10 + 20 epochs, seed 0) with each tree's ``src/`` and
times ``generate(n_samples=10_000)`` in float32 and bf16, best of ``--repeats``; the two
trees alternate, ``--rounds`` times, so that a change in the machine's load falls on both.
The other commit is checked out with ``git worktree`` into a temporary folder. Prints a
table and writes ``results/generation_vs_commit.json``. A refactor that should not change
speed is checked with it (``--ref`` the commit before it)::

    python benchmarks/generation_vs_commit.py --ref f5bb688 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKER = r"""
import inspect, json, logging, sys, time, warnings
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
import scanpy as sc, scvi, torch
import scldiff
torch.set_num_threads(int(sys.argv[2]))
scvi.settings.seed = 0
adata = scldiff.datasets.pbmc3k()
sc.pp.filter_genes(adata, min_counts=1)
scldiff.LapDDPM.setup_anndata(adata, labels_key="cell_type")
model = scldiff.LapDDPM(adata)
kw = {"enable_progress_bar": False, "enable_model_summary": False}
arguments = inspect.signature(model.train).parameters
if "max_epochs_vae" in arguments:
    model.train(max_epochs_vae=10, max_epochs_diffusion=20, **kw)
elif "max_epochs_diffusion" in arguments:  # max_epochs was stage A's before the 0.1.0 API
    model.train(max_epochs=10, max_epochs_diffusion=20, **kw)
else:  # the argument names before commit a7bccca
    model.train(n_epochs_stage_a=10, n_epochs_stage_b=20, **kw)
model.generate(n_samples=500, seed=0, progress_bar=False)  # compiles the sampler
out = {}
for precision in ("float32", "bfloat16"):
    times = []
    for r in range(int(sys.argv[1])):
        start = time.perf_counter()
        model.generate(n_samples=10_000, seed=r, progress_bar=False, precision=precision)
        times.append(time.perf_counter() - start)
    out[precision] = min(times)
print(json.dumps(out))
"""


def time_tree(src: str, repeats: int, threads: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=src)
    result = subprocess.run([sys.executable, "-c", WORKER, str(repeats), str(threads)],
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        other = os.path.join(folder, "tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", other, args.ref],
                       check=True, capture_output=True)
        try:
            for round_ in range(args.rounds):
                for name, src in ((args.ref, os.path.join(other, "src")),
                                  ("this tree", os.path.join(ROOT, "src"))):
                    print(f"[round {round_ + 1}] {name} ...", file=sys.stderr)
                    rows.append({"tree": name, "round": round_,
                                 **time_tree(src, args.repeats, args.threads)})
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other],
                           check=True)
    lines = [f"10,000 PBMC3K cells, seconds, best of {args.repeats} per round, "
             f"{args.threads} threads", "", "| tree | float32 | bfloat16 |", "|---|---|---|"]
    for name in (args.ref, "this tree"):
        mine = [r for r in rows if r["tree"] == name]
        lines.append(f"| {name} | " + " | ".join(
            f"{min(r[p] for r in mine):.3f} (rounds: "
            + ", ".join(f"{r[p]:.3f}" for r in mine) + ")"
            for p in ("float32", "bfloat16")) + " |")
    print("\n".join(lines))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "generation_vs_commit.json"), "w") as handle:
        json.dump({"ref": args.ref, "threads": args.threads, "runs": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
