"""``python -m scldiff.demo``: train on the bundled PBMC3K, generate, evaluate, plot.

Holds out 20% of the cells (stratified by cell type), trains LapDDPM with its defaults on
the rest, generates as many cells of each type as the held-out set has, and writes to
``--out``: ``synthetic.h5ad``, ``metrics.csv`` / ``metrics.md`` (LapDDPM next to the
real-vs-real floor: training cells against the same held-out cells), a joint UMAP
(``umap.png``), library sizes and zeros per cell (``counts.png``), zeros per cell by cell
type (``zeros_per_cell.png``), gene mean against variance (``mean_variance.png``), the
training curves (``training.png``) and the saved model (``model/``).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import scvi  # noqa: E402

import scldiff  # noqa: E402
from scldiff.train import quiet_lightning  # noqa: E402


def _plot_history(history: dict, path: str) -> None:
    keys = [k for k in ("reconstruction_loss_train", "kl_local_train", "diffusion_loss_train")
            if k in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(axes, keys, strict=True):
        history[key].plot(ax=ax, legend=False)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs-a", type=int, default=None, help="stage A epochs")
    parser.add_argument("--epochs-b", type=int, default=None, help="stage B epochs")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    with quiet_lightning():  # setting the seed announces itself through Lightning
        scvi.settings.seed = args.seed
    adata = scldiff.datasets.pbmc3k()
    train, test = scldiff.metrics.stratified_split(adata, "cell_type", 0.2, seed=args.seed)
    # setup_anndata refuses genes without counts; compare on the genes the model learns
    sc.pp.filter_genes(train, min_counts=1)
    test = test[:, train.var_names].copy()
    print(f"PBMC3K: {train.n_obs} training cells, {test.n_obs} held-out cells, "
          f"{train.n_vars} genes with counts in the training cells")

    t0 = time.perf_counter()
    scldiff.LapDDPM.setup_anndata(train, labels_key="cell_type")
    setup_s = time.perf_counter() - t0
    model = scldiff.LapDDPM(train)
    t0 = time.perf_counter()
    model.train(max_epochs_vae=args.epochs_a, max_epochs_diffusion=args.epochs_b,
                enable_progress_bar=not args.no_progress)
    train_s = time.perf_counter() - t0

    counts = test.obs["cell_type"].value_counts()
    t0 = time.perf_counter()
    guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    synth = model.generate(labels={k: int(v) for k, v in counts.items() if v > 0},
                           seed=args.seed, progress_bar=not args.no_progress, **guidance)
    generate_s = time.perf_counter() - t0
    synth.write_h5ad(os.path.join(args.out, "synthetic.h5ad"))
    model.save(os.path.join(args.out, "model"), overwrite=True)

    floor = scldiff.metrics.label_matched_sample(train, test, "cell_type", seed=args.seed)
    ours = scldiff.metrics.evaluate(test, synth, labels_key="cell_type")
    real = scldiff.metrics.evaluate(test, floor, labels_key="cell_type")
    table = pd.concat({"LapDDPM": ours, "real-vs-real floor": real}, axis=1)
    table.to_csv(os.path.join(args.out, "metrics.csv"))
    with open(os.path.join(args.out, "metrics.md"), "w") as handle:
        handle.write(scldiff.metrics.to_markdown(table))

    scldiff.pl.real_vs_generated_umap(test, synth, "cell_type",
                                      path=os.path.join(args.out, "umap.png"))
    scldiff.pl.library_and_zeros(test, synth, path=os.path.join(args.out, "counts.png"))
    scldiff.pl.mean_variance(test, synth, path=os.path.join(args.out, "mean_variance.png"))
    scldiff.pl.zeros_per_cell(test, synth, "cell_type",
                              path=os.path.join(args.out, "zeros_per_cell.png"))
    _plot_history(model.history, os.path.join(args.out, "training.png"))

    total = time.perf_counter() - start
    timings = pd.Series({"setup_anndata": setup_s, "train": train_s, "generate": generate_s,
                         "total": total}, name="seconds")
    timings.to_csv(os.path.join(args.out, "timings.csv"))
    print("\nMetrics against held-out real cells (distances: lower is better; RF AUC: 0.5 is "
          "ideal; TSTR F1, marker overlap, correlations: higher is better):")
    print(table.round(3).to_string())
    print(f"\nsetup {setup_s:.0f} s, training {train_s:.0f} s, generating {synth.n_obs} cells "
          f"{generate_s:.1f} s; total {total:.0f} s. Outputs in {args.out}/")
    return table


if __name__ == "__main__":
    main()
