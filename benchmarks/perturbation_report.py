"""Tables and the figure of ``benchmarks/perturbation.py`` from its finished folds."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
from quality import mean_sd

SCORES = ("R2 top DE", "R2 all genes", "Pearson delta", "E-distance", "DE overlap",
          "direction agreement")
BASELINES = ("control", "mean shift", "scVI latent arithmetic", "LapDDPM generated")
FLOOR = "real-vs-real floor"
# lower is better for these scores
LOWER = ("E-distance",)


def load(runs: str) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Long frames of the scores and the calibration of every finished fold."""
    records, calibration, folds = [], [], []
    for path in sorted(glob.glob(os.path.join(runs, "seed*", "*.json"))):
        with open(path) as handle:
            fold = json.load(handle)
        folds.append(fold)
        for method, scores in fold["scores"].items():
            records.append({"cell type": fold["cell_type"], "seed": fold["seed"],
                            "method": method, **scores})
        for method, values in fold["calibration"].items():
            calibration.append({"cell type": fold["cell_type"], "seed": fold["seed"],
                                "method": method, **values})
    return pd.DataFrame(records), pd.DataFrame(calibration), folds


def _table(frame: pd.DataFrame, methods: list[str], score: str) -> pd.DataFrame:
    rows = {}
    for method in methods:
        part = frame[frame["method"] == method]
        rows[method] = {t: mean_sd(g[score]) for t, g in part.groupby("cell type")}
        rows[method]["mean over types"] = f"{part.groupby('cell type')[score].mean().mean():.3f}"
    return pd.DataFrame(rows).T


def _markdown(frame: pd.DataFrame) -> str:
    columns = [str(c) for c in frame.columns]
    lines = ["| method | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, row in frame.iterrows():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def _wins(frame: pd.DataFrame, method: str, score: str) -> tuple[int, int]:
    """Held-out types on which ``method``'s seed mean beats every baseline's on ``score``."""
    means = frame.groupby(["cell type", "method"])[score].mean().unstack()
    baselines = [b for b in BASELINES if b in means and b != method]
    ours = means[method]
    others = means[baselines]
    better = ours < others.min(1) if score in LOWER else ours > others.max(1)
    return int(better.sum()), int(len(means))


def figure(folds: list[dict], path: str, method: str, cell_type: str = "CD14 Mono") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [f for f in folds if f["cell_type"] == cell_type and f["seed"] == 0] or folds[:1]
    fold = chosen[0]
    shown = [m for m in ("mean shift", "scVI latent arithmetic", method) if m in fold["lfc"]]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), sharey=True)
    real = np.asarray(fold["lfc"]["real"])
    for ax, name in zip(np.atleast_1d(axes), shown, strict=True):
        pred = np.asarray(fold["lfc"][name])
        ax.scatter(real, pred, s=10, alpha=0.7)
        low, high = min(real.min(), pred.min()), max(real.max(), pred.max())
        ax.plot([low, high], [low, high], color="grey", lw=1)
        r2 = np.corrcoef(real, pred)[0, 1] ** 2
        slope = np.polyfit(real, pred, 1)[0]
        ax.set_title(f"{name}\nr² of the changes {r2:.2f}, slope {slope:.2f}", fontsize=10)
        ax.set_xlabel("real log fold change")
    np.atleast_1d(axes)[0].set_ylabel("predicted log fold change")
    fig.suptitle(f"{fold['cell_type']} held out, top 100 DE genes (seed {fold['seed']})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: str, results: str, figure_path: str) -> None:
    frame, calibration, folds = load(runs)
    if frame.empty:
        print("No finished folds yet.")
        return
    ours = sorted(m for m in frame["method"].unique() if m.startswith("LapDDPM ")
                  and m != "LapDDPM generated")
    mean_over = frame.groupby(["method", "cell type"])[list(SCORES)].mean() \
        .groupby("method").mean()
    best = mean_over.loc[ours, "R2 top DE"].idxmax()
    shown = [FLOOR, *BASELINES, best] if FLOOR in frame["method"].values else \
        [*BASELINES, best]
    parts = ["# Perturbation benchmark (Kang 2018, leave one cell type out)", "",
             f"Folds: {len(folds)} ({frame['seed'].nunique()} seeds × "
             f"{frame['cell type'].nunique()} held-out types). Mean ± sd over seeds. The "
             "real-vs-real floor scores one half of the real stimulated cells against the "
             "other: a ceiling for R² and the DE scores, but not a floor for the E-distance, "
             "whose V-statistic adds each set's mean within-set distance over its size, "
             "twice as much for halves.", ""]
    for score in SCORES:
        parts += [f"## {score}", "", _markdown(_table(frame, shown, score)), ""]
    parts += ["## Every LapDDPM variant, mean over held-out types and seeds", "",
              _markdown(mean_over.loc[[m for m in [*ours, *BASELINES, FLOOR]
                                       if m in mean_over.index]].round(3)), ""]
    wins = {score: _wins(frame, best, score) for score in ("R2 top DE", "E-distance")}
    parts += [f"Types where {best} beats every baseline (seed means): "
              + ", ".join(f"{s} {w}/{n}" for s, (w, n) in wins.items()), ""]
    if not calibration.empty:
        cal = calibration.groupby("method")[["coverage top DE", "coverage all genes",
                                            "median interval width top DE"]].mean()
        parts += ["## Calibration of the 95% intervals (20 draws)", "",
                  _markdown(cal.round(3)), ""]
    seconds = pd.DataFrame([f["seconds"] for f in folds]).median()
    parts += ["Median fit time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(results, "perturbation.md"), "w") as handle:
        handle.write(text)
    summary = {"best variant": best, "mean over types": mean_over.round(4).to_dict("index"),
               "wins": {s: list(w) for s, w in wins.items()},
               "calibration": calibration.groupby("method").mean(numeric_only=True)
               .drop(columns="seed").round(4).to_dict("index") if not calibration.empty
               else {}, "folds": len(folds)}
    with open(os.path.join(results, "perturbation.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    figure(folds, figure_path, best)
    print(text)
