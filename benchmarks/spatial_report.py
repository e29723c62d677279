"""Tables and figures of ``benchmarks/spatial.py`` from its finished runs."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd

from scldiff.metrics import to_markdown

SHOWN = ("Moran's I correlation", "Moran's I MAD", "Moran's I (generated)", "domain ARI",
         "spectral mismatch", "MMD (per layer)", "RF AUC", "RF AUC (per layer)",
         "gene-gene correlation error")
MORAN_R = "Moran's I correlation"
DEFAULT = "LapDDPM, spatial graph, coupling 0.5"
FIGURE_METHODS = ("scVI, layer covariate", "LapDDPM, expression graph", DEFAULT)


def collect(runs: str) -> pd.DataFrame:
    """One row per (dataset, hold-out, seed, method, metric)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(runs, "*", "*", "seed*.json"))):
        with open(path) as f:
            run = json.load(f)
        for method, values in run["scores"].items():
            for metric, value in values.items():
                if isinstance(value, (int, float)):
                    rows.append({"dataset": run["dataset"], "holdout": run["holdout"],
                                 "seed": run["seed"], "method": method, "metric": metric,
                                 "value": value})
    return pd.DataFrame(rows)


def tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Mean ± standard deviation over seeds, a table per (dataset, hold-out)."""
    out = {}
    for (dataset, holdout), part in frame.groupby(["dataset", "holdout"], sort=True):
        stats = part.groupby(["method", "metric"])["value"].agg(["mean", "std", "count"])
        table = pd.DataFrame({metric: {
            method: f"{row['mean']:.3f} ± {0.0 if np.isnan(row['std']) else row['std']:.3f}"
            for (method, m), row in stats.iterrows() if m == metric} for metric in SHOWN})
        n_seeds = int(stats["count"].max())
        out[f"{dataset}, {holdout} hold-out ({n_seeds} seeds)"] = table
    return out


def figures(runs: str, static: str) -> None:
    """Moran's I of generated against real spots per gene, and maps of spatially variable
    genes on the tissue, from DLPFC's first random hold-out run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(runs, "dlpfc", "random", "seed0.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        scores = json.load(f)["scores"]
    real = np.asarray(scores["real section (floor)"]["Moran's I per gene"])
    fig, axes = plt.subplots(1, len(FIGURE_METHODS), figsize=(4 * len(FIGURE_METHODS), 3.8),
                             sharex=True, sharey=True)
    for ax, method in zip(axes, FIGURE_METHODS, strict=True):
        generated = np.asarray(scores[method]["Moran's I per gene"])
        ax.scatter(real, generated, s=6, alpha=0.6)
        ax.plot([0, real.max()], [0, real.max()], color="grey", lw=0.8)
        r = scores[method][MORAN_R]
        ax.set_title(f"{method}\nr = {r:.2f}", fontsize=9)
        ax.set_xlabel("Moran's I, real section")
    axes[0].set_ylabel("Moran's I, generated section")
    fig.suptitle("DLPFC 151673: the 200 most spatially variable genes", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(static, "spatial_moran.png"), dpi=120)
    plt.close(fig)
    maps = np.load(path.replace(".json", "_maps.npz"))
    names = list(maps["names"])
    shown = ["real", *FIGURE_METHODS]
    genes = maps["genes"][:2]
    fig, axes = plt.subplots(len(genes), len(shown), figsize=(3.2 * len(shown),
                                                              3.0 * len(genes)))
    xy = maps["coordinates"]
    for g, gene in enumerate(genes):
        values = maps["values"][:, :, g]
        top = np.quantile(values[names.index("real")], 0.99)
        for c, method in enumerate(shown):
            ax = axes[g, c]
            ax.scatter(xy[:, 0], -xy[:, 1], c=values[names.index(method)], s=2,
                       cmap="viridis", vmin=0, vmax=top)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if g == 0:
                ax.set_title(method, fontsize=9)
            if c == 0:
                ax.set_ylabel(gene, fontsize=8)
    fig.suptitle("Log-normalised expression on the tissue (held-out spots included)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(static, "spatial_maps.png"), dpi=110)
    plt.close(fig)


def report(runs: str, results: str, static: str, data_dir: str) -> None:
    frame = collect(runs)
    if frame.empty:
        print("No finished spatial runs.")
        return
    parts = tables(frame)
    text = ["# Spatial benchmark (benchmarks/spatial.py)\n",
            "Mean ± standard deviation over seeds. Moran's I on the 200 genes of highest real "
            "Moran's I, on the real section's graph; domain ARI of k-means on the whole "
            "section; spectral mismatch (total variation between graph-Fourier energy "
            "spectra, 50 modes and the rest); MMD per layer, RF AUC (pooled, and "
            "within each layer of at least 20 held-out spots) and gene-gene "
            "correlation error on the held-out spots only.\n"]
    for title, table in parts.items():
        text += [f"## {title}\n", to_markdown(table), ""]
    with open(os.path.join(results, "spatial.md"), "w") as f:
        f.write("\n".join(text))
    summary = frame.groupby(["dataset", "holdout", "method", "metric"])["value"].agg(
        ["mean", "std"]).reset_index()
    with open(os.path.join(results, "spatial.json"), "w") as f:
        json.dump(summary.to_dict(orient="records"), f, indent=1)
    print("\n".join(text))
    figures(runs, static)
