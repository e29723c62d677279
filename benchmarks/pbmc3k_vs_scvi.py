"""LapDDPM (defaults) vs scVI (defaults) vs the real-vs-real floor on PBMC3K, one split.

Run ``python benchmarks/pbmc3k_vs_scvi.py [--seed 0]`` (about 40 min on 2 CPU cores, most of
it scVI's 400 epochs). Uses the bundled PBMC3K only. Prints a table and writes
``benchmarks/results/pbmc3k_vs_scvi_seed<seed>.json`` and ``.md``.

Protocol (``scldiff.metrics.evaluate``): 20% of the cells held out, stratified by cell type;
each generator produces the held-out label counts; distances in the PCA space of the
held-out cells. scVI gets the labels as a decoder covariate (``categorical_covariate_keys``),
z ~ N(0, I), and library sizes resampled from the label's training cells. The floor is
training cells with the held-out label counts. LapDDPM is evaluated at guidance 1 and 2
over three generation seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData

import scldiff

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def scvi_generate(model: scvi.model.SCVI, train: AnnData, labels: np.ndarray,
                  rng: np.random.Generator) -> AnnData:
    """scVI's prior with the label as decoder covariate and resampled library sizes."""
    categories = list(train.obs["cell_type"].cat.categories)
    codes = np.array([categories.index(label) for label in labels])
    train_labels = train.obs["cell_type"].astype(str).to_numpy()
    library = np.asarray(train.X.sum(1)).ravel()
    libs = np.array([rng.choice(library[train_labels == label]) for label in labels])
    model.module.eval()
    with torch.no_grad():
        z = torch.from_numpy(rng.standard_normal((len(labels), model.module.n_latent)))
        out = model.module.generative(
            z=z.float(), library=torch.log(torch.from_numpy(libs).float())[:, None],
            batch_index=torch.zeros(len(labels), 1, dtype=torch.long),
            cat_covs=torch.from_numpy(codes)[:, None])
        mu = out["px"].mu.double().numpy()
        theta = out["px"].theta.double().numpy()
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels, categories=categories)},
                       index=[f"scvi-{i}" for i in range(len(labels))])
    return AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=train.var_names))


def summary(frame: pd.DataFrame) -> dict:
    return {"conditional_MMD": frame.loc["MMD", "conditional"],
            "conditional_W2": frame.loc["W2", "conditional"],
            "unconditional_MMD": frame.loc["MMD", "unconditional"],
            "unconditional_W2": frame.loc["W2", "unconditional"],
            "median_library": frame.loc["median library size (generated)", "unconditional"],
            "zero_fraction": frame.loc["mean zero fraction (generated)", "unconditional"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scvi.settings.seed = args.seed
    adata = scldiff.datasets.pbmc3k()
    train, test = scldiff.metrics.stratified_split(adata, "cell_type", 0.2, seed=args.seed)
    label_counts = {k: int(v) for k, v in test.obs["cell_type"].value_counts().items() if v}
    test_labels = test.obs["cell_type"].astype(str).to_numpy()
    rows, fits = {}, {}

    floor = scldiff.metrics.label_matched_sample(train, test, "cell_type", seed=args.seed)
    rows["real-vs-real floor"] = summary(scldiff.metrics.evaluate(test, floor, "cell_type"))

    lap_train = train.copy()
    start = time.perf_counter()
    scldiff.LapDDPM.setup_anndata(lap_train, labels_key="cell_type")
    model = scldiff.LapDDPM(lap_train)
    model.train(enable_progress_bar=False)
    fits["LapDDPM"] = time.perf_counter() - start
    for scale in (1.0, 2.0):
        per_seed = [summary(scldiff.metrics.evaluate(
            test, model.generate(labels=label_counts, guidance_scale=scale, seed=s,
                                 progress_bar=False), "cell_type")) for s in (0, 1, 2)]
        frame = pd.DataFrame(per_seed)
        rows[f"LapDDPM w={scale:g}"] = frame.mean().to_dict()
        rows[f"LapDDPM w={scale:g}"].update(
            {f"{k}_sd": v for k, v in frame.std(ddof=0).to_dict().items()
             if k.startswith("conditional")})

    scvi_train = train.copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(scvi_train, categorical_covariate_keys=["cell_type"])
    baseline = scvi.model.SCVI(scvi_train)
    baseline.train(enable_progress_bar=False)
    fits["scVI"] = time.perf_counter() - start
    rng = np.random.default_rng(args.seed)
    rows["scVI (400 epochs)"] = summary(scldiff.metrics.evaluate(
        test, scvi_generate(baseline, scvi_train, test_labels, rng), "cell_type"))

    table = pd.DataFrame(rows).T
    table["fit_seconds"] = [fits.get(name.split(" ")[0], np.nan) for name in table.index]
    print(table.round(3).to_string())
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"pbmc3k_vs_scvi_seed{args.seed}")
    meta = {"seed": args.seed, "n_train": train.n_obs, "n_test": test.n_obs,
            "scldiff": scldiff.__version__, "scvi-tools": scvi.__version__,
            "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "machine": platform.platform(), "processor": platform.processor()}
    with open(stem + ".json", "w") as handle:
        json.dump({"meta": meta, "rows": table.to_dict(orient="index")}, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(scldiff.metrics.to_markdown(table))


if __name__ == "__main__":
    main()
