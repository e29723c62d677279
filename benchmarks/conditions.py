"""Conditioning benchmark: several attributes, an unseen combination, clusters as labels, the
post-guidance scorer; LapDDPM vs scVI vs the real-vs-real floor, same splits, 3 seeds.

Usage (from the repository root, after ``make install``)::

    python benchmarks/conditions.py                       # every experiment, seeds 0-2
    python benchmarks/conditions.py --experiments unseen --seeds 0
    python benchmarks/conditions.py --report              # tables from finished runs only
    python benchmarks/conditions.py --filter-cost         # the post-guidance filter's time

Experiments:

All on the 2,000 most variable genes (Seurat v3) of each dataset.

* **attributes** (Kang 2018 IFN-β PBMCs, ``cell_type`` × ``condition``): cells split 80/20
  stratified by the combination; every generator produces the held-out cells' combinations
  and is scored by :func:`scldiff.metrics.evaluate` against them with the combination as
  the label (conditional MMD, W2, TSTR per combination; RF AUC on all cells). LapDDPM with
  ``labels_key="cell_type", categorical_covariate_keys=["condition"]`` (joint guidance, the
  default), the same model with compositional guidance (``{"cell_type": 1.5, "condition":
  1.5}``) and with the post-guidance scorer (``keep_fraction=0.5``); scVI with both as
  ``categorical_covariate_keys`` (default epochs, z ~ N(0, I), libraries of the
  combination's training cells); the floor (training cells with the held-out combination
  counts).
* **unseen** (Kang): every stimulated B cell is left out of training; LapDDPM generates as
  many by compositional and by joint guidance, scVI decodes the unseen pair of covariates,
  and the distances to the real stimulated B cells are set beside two baselines made of real
  cells: the B cells' control cells, and the other stimulated cell types.
* **clusters** (Kang and a 1,250-cell PBMC3K sample, labels hidden): the unconditional model
  against ``cluster_labels=True``, n = the held-out cells; unconditional distances, RF AUC,
  and the error of the generated cell-type composition (total variation distance between
  the held-out cells' type proportions and those a 15-nearest-neighbour classifier trained
  on the training cells assigns to the generated ones), with the floor.

Each finished run is written at once to ``benchmarks/results/conditions/<experiment>/
<dataset>/seed<k>/<method>.json``, so an interrupted run resumes where it stopped
(``--force`` refits). The summary goes to ``benchmarks/results/conditions.json`` and
``conditions.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import scldiff

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import (  # noqa: E402
    RESULTS,
    load_dataset,
    mean_sd,
    meta,
    read_shared,
    with_all_genes,
)

RUNS = os.path.join(RESULTS, "conditions")
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "shared", "data")
TYPE, CONDITION, COMBINATION = "cell_type", "condition", "combination"
UNSEEN = ("B", "stimulated")
COMPOSITIONAL = {TYPE: 1.5, CONDITION: 1.5}
EXPERIMENTS = ("attributes", "unseen", "clusters")
# genes of every experiment: scVI's default training on all 13,215 Kang genes takes half an
# hour per fit on 2 cores, and each experiment fits it per seed
N_GENES = 2_000
METRICS = {"cond. MMD": "MMD | conditional", "cond. W2": "W2 | conditional",
           "MMD": "MMD | unconditional", "W2": "W2 | unconditional",
           "RF AUC": "RF AUC | unconditional", "TSTR F1": "TSTR macro F1 | conditional",
           "marker overlap": "marker overlap | conditional",
           "median library": "median library size (generated) | unconditional",
           "median library error": "median library relative error | unconditional",
           "library KS": "library size KS | unconditional",
           "composition error": "composition error"}


def load_kang(data_dir: str) -> ad.AnnData:
    adata = top_genes(read_shared(
        "kang_ifnb_pbmc_seurat.h5ad", data_dir, [TYPE, CONDITION],
        "The Kang 2018 IFN-beta set is read from ../shared/data beside the repository (it may "
        "not be bundled); put it there or pass --data-dir DIR."))
    adata.obs[COMBINATION] = (adata.obs[TYPE].astype(str) + " | "
                              + adata.obs[CONDITION].astype(str)).astype("category")
    return adata


def top_genes(adata: ad.AnnData, n_genes: int = N_GENES) -> ad.AnnData:
    """The ``n_genes`` most variable genes (Seurat v3 on the counts of all cells), the same
    for every method and seed."""
    import scanpy as sc

    flags = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_genes,
                                        inplace=False)["highly_variable"].to_numpy()
    adata = adata[:, flags].copy()
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def expressed(train: ad.AnnData) -> ad.AnnData:
    """The training cells' genes with counts (setup_anndata refuses the others)."""
    return train[:, np.asarray(train.X.sum(0)).ravel() > 0].copy()


# --------------------------------------------------------------------------- generators
def fit_lapddpm(train: ad.AnnData, seed: int, **setup) -> tuple[scldiff.LapDDPM, float]:
    import scvi

    scvi.settings.seed = seed
    data = expressed(train)
    start = time.perf_counter()
    scldiff.LapDDPM.setup_anndata(data, **setup)
    model = scldiff.LapDDPM(data)
    model.train(enable_progress_bar=False)
    return model, time.perf_counter() - start


def generate(model: scldiff.LapDDPM, rows: pd.DataFrame, seed: int, var_names, **kwargs
             ) -> tuple[ad.AnnData, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unseen combination's warning
        out = model.generate(conditions=rows, seed=seed, progress_bar=False, **kwargs)
    seconds = time.perf_counter() - start
    out = with_all_genes(out, var_names)
    out.obs[COMBINATION] = (out.obs[TYPE].astype(str) + " | "
                            + out.obs[CONDITION].astype(str)).astype("category")
    return out, seconds


def fit_scvi(train: ad.AnnData, rows: pd.DataFrame, seed: int) -> tuple[ad.AnnData, float]:
    """scVI (default epochs) with both attributes as decoder covariates; prior samples with
    library sizes of the combination's training cells (of the cell type's, for a
    combination without training cells)."""
    import scvi

    scvi.settings.seed = seed
    data = train.copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(data, categorical_covariate_keys=[TYPE, CONDITION])
    model = scvi.model.SCVI(data)
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    library = np.asarray(data.X.sum(1)).ravel()
    pools = []
    for cell_type, condition in zip(rows[TYPE], rows[CONDITION], strict=True):
        same = (data.obs[TYPE] == cell_type).to_numpy()
        both = same & (data.obs[CONDITION] == condition).to_numpy()
        pools.append(rng.choice(library[both if both.any() else same]))
    codes = np.stack([pd.Categorical(rows[key], categories=data.obs[key].cat.categories).codes
                      for key in (TYPE, CONDITION)], 1)
    model.module.eval()
    with torch.no_grad():
        z = torch.from_numpy(rng.standard_normal((len(rows), model.module.n_latent))).float()
        out = model.module.generative(
            z=z, library=torch.log(torch.tensor(pools, dtype=torch.float32))[:, None],
            batch_index=torch.zeros(len(rows), 1, dtype=torch.long),
            cat_covs=torch.from_numpy(codes.astype(np.int64)))
        mu, theta = out["px"].mu.double().numpy(), out["px"].theta.double().numpy()
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    obs = rows.reset_index(drop=True).copy()
    obs.index = [f"scvi-{i}" for i in range(len(rows))]
    obs[COMBINATION] = (obs[TYPE].astype(str) + " | " + obs[CONDITION].astype(str))
    return ad.AnnData(sp.csr_matrix(counts), obs=obs,
                      var=pd.DataFrame(index=train.var_names)), seconds


# --------------------------------------------------------------------------- scoring
def score(real: ad.AnnData, generated: ad.AnnData, seed: int, labels_key: str | None
          ) -> dict:
    frame = scldiff.metrics.evaluate(real, generated, labels_key=labels_key,
                                     random_state=seed, markers=labels_key is not None)
    return {f"{metric} | {column}": float(value) for metric, row in frame.iterrows()
            for column, value in row.items() if pd.notna(value)}


def composition_error(train: ad.AnnData, test: ad.AnnData, generated: ad.AnnData) -> float:
    """Total variation distance between the held-out cells' cell-type proportions and those a
    15-nearest-neighbour classifier, trained on the training cells' PCA, gives the
    generated cells."""
    from sklearn.neighbors import KNeighborsClassifier

    pcs_train, pcs_gen = scldiff.metrics.shared_pca(train, generated, 2000, 30, None, 0)
    knn = KNeighborsClassifier(15).fit(pcs_train, train.obs[TYPE].astype(str))
    assigned = pd.Series(knn.predict(pcs_gen)).value_counts(normalize=True)
    truth = test.obs[TYPE].astype(str).value_counts(normalize=True)
    every = truth.index.union(assigned.index)
    return float(0.5 * (truth.reindex(every, fill_value=0)
                        - assigned.reindex(every, fill_value=0)).abs().sum())


def save(experiment: str, dataset: str, seed: int, method: str, metrics: dict,
         extra: dict) -> None:
    path = os.path.join(RUNS, experiment, dataset, f"seed{seed}",
                        method.replace(" ", "_") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"experiment": experiment, "dataset": dataset, "seed": seed, "method": method,
              "metrics": metrics, "meta": meta(), **extra}
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    shown = ", ".join(f"{name} {metrics[key]:.3f}" for name, key in METRICS.items()
                      if key in metrics)
    print(f"[{experiment} {dataset} seed {seed}] {method}: {shown}", flush=True)


def done(experiment: str, dataset: str, seed: int, method: str) -> bool:
    return os.path.exists(os.path.join(RUNS, experiment, dataset, f"seed{seed}",
                                       method.replace(" ", "_") + ".json"))


# --------------------------------------------------------------------------- experiments
def attributes(adata: ad.AnnData, seed: int, force: bool) -> None:
    train, test = scldiff.metrics.stratified_split(adata, COMBINATION, 0.2, seed=seed)
    rows = test.obs[[TYPE, CONDITION]].astype(str).reset_index(drop=True)
    run = lambda generated, method, extra: save(
        "attributes", "kang", seed, method, score(test, generated, seed, COMBINATION), extra)
    if force or not done("attributes", "kang", seed, "floor"):
        run(scldiff.metrics.label_matched_sample(train, test, COMBINATION, seed=seed),
            "floor", {})
    if force or not done("attributes", "kang", seed, "scvi"):
        generated, seconds = fit_scvi(train, rows, seed)
        run(generated, "scvi", {"fit_seconds": seconds})
    variants = {"lapddpm": {}, "lapddpm compositional": {"guidance_scale": COMPOSITIONAL},
                "lapddpm keep 0.5": {"keep_fraction": 0.5}}
    if not force and all(done("attributes", "kang", seed, m) for m in variants):
        return
    model, fit_seconds = fit_lapddpm(train, seed, labels_key=TYPE,
                                     categorical_covariate_keys=[CONDITION])
    for method, kwargs in variants.items():
        generated, seconds = generate(model, rows, seed, test.var_names, **kwargs)
        run(generated, method, {"fit_seconds": fit_seconds, "generate_seconds": seconds,
                                "scorer_accuracy": float(model.history[
                                    "scorer_accuracy_validation"].iloc[-1, 0])})


def unseen(adata: ad.AnnData, seed: int, force: bool) -> None:
    held = ((adata.obs[TYPE] == UNSEEN[0]) & (adata.obs[CONDITION] == UNSEEN[1])).to_numpy()
    target = adata[held].copy()
    train = adata[~held].copy()
    n = target.n_obs
    rows = pd.DataFrame({TYPE: [UNSEEN[0]] * n, CONDITION: [UNSEEN[1]] * n})
    rng = np.random.default_rng(seed)
    run = lambda generated, method, extra: save(
        "unseen", "kang", seed, method, score(target, generated, seed, None), extra)
    if force or not done("unseen", "kang", seed, "control B cells"):
        control = np.flatnonzero(((train.obs[TYPE] == UNSEEN[0])
                                  & (train.obs[CONDITION] != UNSEEN[1])).to_numpy())
        run(train[control].copy(), "control B cells", {})
        others = np.flatnonzero((train.obs[CONDITION] == UNSEEN[1]).to_numpy())
        run(train[rng.choice(others, n, replace=False)].copy(), "other stimulated types", {})
    if force or not done("unseen", "kang", seed, "scvi"):
        generated, seconds = fit_scvi(train, rows, seed)
        run(generated, "scvi", {"fit_seconds": seconds})
    if not force and done("unseen", "kang", seed, "lapddpm joint"):
        return
    model, fit_seconds = fit_lapddpm(train, seed, labels_key=TYPE,
                                     categorical_covariate_keys=[CONDITION])
    for method, kwargs in (("lapddpm compositional", {"guidance_scale": COMPOSITIONAL}),
                           ("lapddpm joint", {})):
        generated, _ = generate(model, rows, seed, target.var_names, **kwargs)
        run(generated, method, {"fit_seconds": fit_seconds})


def clusters(dataset: str, adata: ad.AnnData, seed: int, force: bool) -> None:
    train, test = scldiff.metrics.stratified_split(adata, TYPE, 0.2, seed=seed)

    def run(generated, method, extra):
        metrics = score(test, generated, seed, None)
        metrics["composition error"] = composition_error(train, test, generated)
        save("clusters", dataset, seed, method, metrics, extra)

    if force or not done("clusters", dataset, seed, "floor"):
        run(scldiff.metrics.label_matched_sample(train, test, TYPE, seed=seed), "floor", {})
    hidden = ad.AnnData(train.X, obs=pd.DataFrame(index=train.obs_names), var=train.var)
    for method, setup in (("unconditional", {}), ("clusters", {"cluster_labels": True})):
        if not force and done("clusters", dataset, seed, method):
            continue
        model, fit_seconds = fit_lapddpm(hidden, seed, **setup)
        start = time.perf_counter()
        generated = model.generate(n_samples=test.n_obs, seed=seed, progress_bar=False)
        seconds = time.perf_counter() - start
        extra = {"fit_seconds": fit_seconds, "generate_seconds": seconds}
        if setup:
            extra["n_clusters"] = len(model.label_categories)
        run(with_all_genes(generated, test.var_names), method, extra)


# --------------------------------------------------------------------------- report
ORDER = {"attributes": ["floor", "scvi", "lapddpm", "lapddpm compositional", "lapddpm keep 0.5"],
         "unseen": ["control B cells", "other stimulated types", "scvi",
                    "lapddpm compositional", "lapddpm joint"],
         "clusters": ["floor", "unconditional", "clusters"]}


def report() -> None:
    records = []
    for root, _, files in os.walk(RUNS):
        for name in files:
            with open(os.path.join(root, name)) as handle:
                records.append(json.load(handle))
    summary, lines = {}, ["Mean ± sd over seeds. Produced by `python benchmarks/conditions.py`; "
                          "fit and generation times are in the runs' JSON files."]
    for experiment in EXPERIMENTS:
        for dataset in sorted({r["dataset"] for r in records if r["experiment"] == experiment}):
            chosen = [r for r in records
                      if r["experiment"] == experiment and r["dataset"] == dataset]
            keys = [n for n, k in METRICS.items() if any(k in r["metrics"] for r in chosen)]
            extra = [k for k in ("scorer_accuracy",) if any(k in r for r in chosen)]
            header = ["method", "seeds", *keys, *[k.replace("_", " ") for k in extra]]
            lines += ["", f"### {experiment}: {dataset}", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)]
            for method in ORDER[experiment]:
                rows = [r for r in chosen if r["method"] == method]
                if not rows:
                    continue
                cells = [method, ",".join(str(r["seed"]) for r in sorted(
                    rows, key=lambda r: r["seed"]))]
                stats = {}
                for name in keys:
                    values = pd.Series([r["metrics"].get(METRICS[name]) for r in rows],
                                       dtype=float)
                    cells.append(mean_sd(values))
                    stats[name] = values.dropna().tolist()
                for k in extra:
                    values = pd.Series([r.get(k) for r in rows], dtype=float)
                    cells.append(mean_sd(values))
                    stats[k] = values.dropna().tolist()
                lines.append("| " + " | ".join(cells) + " |")
                summary.setdefault(experiment, {}).setdefault(dataset, {})[method] = stats
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "conditions.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(RESULTS, "conditions.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(text)


def filter_cost(adata: ad.AnnData, n_cells: int = 10_000) -> None:
    """Seconds of ``generate()`` for ``n_cells`` Kang combinations with the post-guidance
    filter at q = 1, 0.5 and 0.25 (best of two), on a briefly trained model: the time does
    not depend on how well it is trained."""
    import scvi

    scvi.settings.seed = 0
    data = expressed(adata)
    scldiff.LapDDPM.setup_anndata(data, labels_key=TYPE, categorical_covariate_keys=[CONDITION])
    model = scldiff.LapDDPM(data)
    model.train(max_epochs_vae=2, max_epochs_diffusion=2, enable_progress_bar=False)
    rows = data.obs[[TYPE, CONDITION]].astype(str).sample(
        n_cells, replace=True, random_state=0).reset_index(drop=True)
    for q in (1.0, 0.5, 0.25):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            model.generate(conditions=rows, seed=0, progress_bar=False, keep_fraction=q)
            times.append(time.perf_counter() - start)
        print(f"keep_fraction={q}: {min(times):.2f} s for {n_cells:,} cells", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                        choices=EXPERIMENTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--filter-cost", action="store_true",
                        help="time generate() with the post-guidance filter, then stop")
    args = parser.parse_args()
    if args.report:
        report()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    kang = load_kang(args.data_dir)
    if args.filter_cost:
        filter_cost(kang)
        return
    for seed in args.seeds:
        if "attributes" in args.experiments:
            attributes(kang, seed, args.force)
        if "unseen" in args.experiments:
            unseen(kang, seed, args.force)
        if "clusters" in args.experiments:
            clusters("kang", kang, seed, args.force)
            clusters("pbmc3k_1k", top_genes(load_dataset("pbmc3k_1k", args.data_dir)), seed,
                     args.force)
    report()


if __name__ == "__main__":
    main()
