"""Quality benchmark: LapDDPM vs scVI vs the real-vs-real floor, same splits, several seeds.

Usage (from the repository root, after ``make install``)::

    python benchmarks/quality.py                              # everything (hours on 2 cores)
    python benchmarks/quality.py --datasets pbmc3k --seeds 0  # one dataset, one seed
    python benchmarks/quality.py --ablations                  # and every ablation
    python benchmarks/quality.py --report                     # tables from finished runs only
    python benchmarks/quality.py --methods GPU "GPU bf16"     # the defaults on a CUDA GPU

For each dataset and seed the cells are split 80/20, stratified by cell type
(:func:`scldiff.metrics.stratified_split`); every generator produces the held-out label
counts and is scored by :func:`scldiff.metrics.evaluate` against the held-out cells:

* **LapDDPM** with its defaults (``setup_anndata`` + ``train()`` + ``generate()``).
* **scVI** with its default epochs, the label as a decoder covariate
  (``categorical_covariate_keys``), z ~ N(0, I) and library sizes drawn from the label's
  training cells, counts sampled from its negative binomial.
* **floor**: training cells with the held-out label counts (real vs real).

Datasets: ``pbmc3k`` (bundled with scldiff) and ``zheng17`` (``zheng17_pbmc_facs.h5ad`` read
from ``--data-dir``, by default ``../shared/data`` beside the repository; the script stops
with a message naming the file when it is absent).

Every finished run is written at once to ``benchmarks/results/runs/<dataset>/seed<k>/
<method>.json`` (metrics, fit time, versions), and the generated cells to
``benchmarks/.cache/`` (not committed), so an interrupted benchmark resumes where it stopped
(``--force`` refits) and a change of metrics re-scores without refitting (``--rescore``).
The summary (mean ± sd over seeds, the share of the scVI-to-floor gap LapDDPM closes, and the
quality targets) goes to ``benchmarks/results/quality.json`` and ``quality.md``; ablations
to ``ablations.json`` / ``ablations.md``.

Fit times are only comparable inside one invocation with one ``--threads`` setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import scldiff

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join(RESULTS, "runs")
CACHE = os.path.join(HERE, ".cache")
DEFAULT_DATA_DIR = os.path.join(HERE, "..", "..", "shared", "data")
LABELS = "cell_type"
DATASETS = ("pbmc3k", "zheng17", "pbmc3k_1k")
# pbmc3k_1k: 1,250 PBMC3K cells (1,000 to train on), the default training's size scaling

# LapDDPM variants: (setup kwargs, train kwargs, generate kwargs), all at the current defaults
# otherwise. The paper's claims (spectral perturbation against none and a random direction,
# Laplacian positional encodings, input masking) and its noise-predicting ScoreNet, each
# trained; then choices made at generation time, from the defaults' trained model.
ABLATIONS: dict[str, tuple[dict, dict, dict]] = {
    "lapddpm": ({}, {}, {}),
    "no perturbation": ({}, {"plan_kwargs": {"perturbation": "none"}}, {}),
    "random perturbation": ({}, {"plan_kwargs": {"perturbation": "random"}}, {}),
    "no LPE": ({"n_lpe": 0}, {}, {}),
    "no masking": ({}, {"plan_kwargs": {"mask_fraction": 0.0}}, {}),
    "epsilon prediction": ({}, {}, {}),
    "guidance 1": ({}, {}, {"guidance_scale": 1.0}),
    "guidance 2": ({}, {}, {"guidance_scale": 2.0}),
    "library by label": ({}, {}, {"library_size": "label"}),
    # the step budget without the epoch caps (on fewer than 2,000 cells); --methods only
    "fixed steps": ({}, {"steps": (2_000, 4_000)}, {}),
    # the defaults, trained (and generating) on a GPU; needs CUDA, never run by --ablations
    "GPU": ({}, {"accelerator": "gpu"}, {}),
    "GPU bf16": ({}, {"accelerator": "gpu", "precision": "bf16-mixed"}, {}),
}
GPU_VARIANTS = ("GPU", "GPU bf16")
EXPLICIT_ONLY = (*GPU_VARIANTS, "fixed steps")  # not among --ablations
# variants that change the model's constructor arguments
MODEL_KWARGS = {"epsilon prediction": {"prediction": "epsilon"}}
GENERATE_FROM = {name: "lapddpm" for name in ("guidance 1", "guidance 2", "library by label")}


# --------------------------------------------------------------------------- data
def load_dataset(name: str, data_dir: str) -> ad.AnnData:
    if name == "pbmc3k":
        return scldiff.datasets.pbmc3k()
    if name == "pbmc3k_1k":  # a fixed stratified sample, the same for every seed
        adata = scldiff.datasets.pbmc3k()
        _, sample = scldiff.metrics.stratified_split(adata, LABELS, 1_250 / adata.n_obs,
                                                     seed=12_345)
        return sample
    if name == "zheng17":
        return read_shared("zheng17_pbmc_facs.h5ad", data_dir, [LABELS],
                           "The Zheng 2017 FACS PBMC set is read from ../shared/data beside the "
                           "repository; put it there, pass --data-dir DIR, or run with "
                           "--datasets pbmc3k.")
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}.")


def read_shared(filename: str, data_dir: str, obs_keys: list[str], hint: str) -> ad.AnnData:
    """Raw counts (CSR, float32) and the ``obs_keys`` columns of ``data_dir/filename``; the
    script stops with ``hint`` when the file is absent."""
    path = os.path.join(data_dir, filename)
    if not os.path.exists(path):
        sys.exit(f"benchmarks/{os.path.basename(sys.argv[0])}: {os.path.abspath(path)} not "
                 f"found. {hint}")
    adata = ad.read_h5ad(path)
    return ad.AnnData(sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs[obs_keys].copy(),
                      var=pd.DataFrame(index=adata.var_names))


def cache_path(dataset: str, seed: int, method: str) -> str:
    return os.path.join(CACHE, dataset, f"seed{seed}", method.replace(" ", "_") + ".h5ad")


def model_path(dataset: str, seed: int, method: str) -> str:
    return os.path.join(CACHE, dataset, f"seed{seed}", method.replace(" ", "_") + "_model")


def cache_model(dataset: str, seed: int, method: str, model: scldiff.LapDDPM,
                fit_seconds: float) -> None:
    """Keep a trained model, so variants that only generate differently reuse it."""
    path = model_path(dataset, seed, method)
    model.save(path, overwrite=True)
    with open(os.path.join(path, "fit.json"), "w") as handle:
        json.dump({"fit_seconds": fit_seconds, "commit": meta()["commit"]}, handle)


def cached_model(dataset: str, seed: int, method: str
                 ) -> tuple[scldiff.LapDDPM, float] | None:
    """The model ``cache_model`` kept for this run, if the same ``src/`` trained it."""
    path = model_path(dataset, seed, method)
    try:
        with open(os.path.join(path, "fit.json")) as handle:
            fit = json.load(handle)
    except OSError:
        return None
    if not same_source(fit.get("commit", "unknown"), meta()["commit"]):
        return None
    return scldiff.LapDDPM.load(path, adata=False), fit["fit_seconds"]


def same_source(commit: str, current: str) -> bool:
    """Whether ``commit`` and ``current`` (``_code_commit`` values) ran the same ``src/``:
    equal commits, or clean ones whose ``src/`` trees are identical (a commit that changed
    only benchmarks or docs keeps the cached models)."""
    if commit == current:
        return True
    if "unknown" in (commit, current) or commit.endswith("-dirty") or current.endswith("-dirty"):
        return False
    try:
        trees = [subprocess.run(["git", "rev-parse", f"{c}:src"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip() for c in (commit, current)]
    except (OSError, subprocess.CalledProcessError):
        return False
    return trees[0] == trees[1]


def run_path(dataset: str, seed: int, method: str) -> str:
    return os.path.join(RUNS, dataset, f"seed{seed}", method.replace(" ", "_") + ".json")


# --------------------------------------------------------------------------- generators
def fit_scvi(train: ad.AnnData, label_counts: dict, seed: int) -> tuple[ad.AnnData, float]:
    """scVI (default epochs), labels as decoder covariate; prior samples with label libraries."""
    import scvi

    scvi.settings.seed = seed
    data = train.copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(data, categorical_covariate_keys=[LABELS])
    model = scvi.model.SCVI(data)
    model.train(enable_progress_bar=False)
    fit_seconds = time.perf_counter() - start

    rng = np.random.default_rng(seed)
    labels = np.concatenate([[label] * n for label, n in label_counts.items()])
    categories = list(data.obs[LABELS].cat.categories)
    train_labels = data.obs[LABELS].astype(str).to_numpy()
    library = np.asarray(data.X.sum(1)).ravel()
    libs = np.array([rng.choice(library[train_labels == label]) for label in labels])
    codes = np.array([categories.index(label) for label in labels])
    model.module.eval()
    with torch.no_grad():
        z = torch.from_numpy(rng.standard_normal((len(labels), model.module.n_latent))).float()
        out = model.module.generative(
            z=z, library=torch.log(torch.from_numpy(libs).float())[:, None],
            batch_index=torch.zeros(len(labels), 1, dtype=torch.long),
            cat_covs=torch.from_numpy(codes)[:, None])
        mu = out["px"].mu.double().numpy()
        theta = out["px"].theta.double().numpy()
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    obs = pd.DataFrame({LABELS: pd.Categorical(labels, categories=categories)},
                       index=[f"scvi-{i}" for i in range(len(labels))])
    generated = ad.AnnData(sp.csr_matrix(counts), obs=obs,
                           var=pd.DataFrame(index=train.var_names))
    history = next((model.history[k] for k in ("elbo_train", "train_loss_epoch")
                    if k in model.history), None)
    generated.uns["epochs"] = -1 if history is None else int(len(history))
    return generated, fit_seconds


def fit_lapddpm(train: ad.AnnData, label_counts: dict, seed: int, setup_kwargs: dict,
                train_kwargs: dict, model_kwargs: dict | None = None
                ) -> tuple[scldiff.LapDDPM, float]:
    import scvi

    scvi.settings.seed = seed
    # genes without a count in the training cells are refused by setup_anndata; the
    # generated cells get zeros for them (lapddpm_generate), as any generator would
    expressed = np.asarray(train.X.sum(0)).ravel() > 0
    data = train[:, expressed].copy()
    start = time.perf_counter()
    setup = {"labels_key": LABELS, **setup_kwargs}
    scldiff.LapDDPM.setup_anndata(data, **setup)
    model = scldiff.LapDDPM(data, **(model_kwargs or {}))
    train_kwargs = dict(train_kwargs)
    if "steps" in train_kwargs:  # optimisation steps of the two stages, as epochs here
        from scldiff.model._training import epochs_for_steps

        steps_a, steps_b = train_kwargs.pop("steps")
        train_kwargs["max_epochs_vae"] = epochs_for_steps(steps_a, data.n_obs, 128)
        train_kwargs["max_epochs_diffusion"] = epochs_for_steps(steps_b, data.n_obs, 256)
    model.train(enable_progress_bar=False, **train_kwargs)
    return model, time.perf_counter() - start


def lapddpm_generate(model: scldiff.LapDDPM, label_counts: dict, seed: int,
                     generate_kwargs: dict, test: ad.AnnData) -> ad.AnnData:
    if model.registry_["setup_args"].get("labels_key") is None:
        generated = model.generate(n_samples=test.n_obs, seed=seed, progress_bar=False,
                                   **generate_kwargs)
    else:
        generated = model.generate(labels=label_counts, seed=seed, progress_bar=False,
                                   **generate_kwargs)
    return with_all_genes(generated, test.var_names)


def with_all_genes(generated: ad.AnnData, var_names: pd.Index) -> ad.AnnData:
    """``generated`` with zero columns for the genes the model was not trained on."""
    columns = var_names.get_indexer(generated.var_names)
    if (columns < 0).any():
        raise ValueError("the generated cells have genes the data lacks.")
    x = sp.csr_matrix(generated.X)
    coo = x.tocoo()
    full = sp.csr_matrix((coo.data, (coo.row, columns[coo.col])),
                         shape=(generated.n_obs, len(var_names)), dtype=x.dtype)
    return ad.AnnData(full, obs=generated.obs.copy(), var=pd.DataFrame(index=var_names),
                      uns=dict(generated.uns))


# --------------------------------------------------------------------------- scoring
def score(test: ad.AnnData, generated: ad.AnnData, seed: int) -> dict:
    has_labels = LABELS in generated.obs
    frame = scldiff.metrics.evaluate(test, generated, labels_key=LABELS if has_labels else None,
                                     random_state=seed)
    return {f"{metric} | {column}": float(value)
            for metric, row in frame.iterrows() for column, value in row.items()
            if pd.notna(value)}


def _code_commit() -> str:
    """The commit of the code this process runs, ``-dirty`` if ``src/`` had changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--", "../src") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# taken when the process starts: a run that lasts an hour records the code it ran, not the
# commit the repository has reached when it ends
CODE_COMMIT = _code_commit()


def meta() -> dict:
    import scvi

    commit = CODE_COMMIT
    return {"scldiff": scldiff.__version__, "commit": commit, "scvi-tools": scvi.__version__,
            "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "machine": platform.platform(), "processor": platform.processor() or "unknown",
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save_run(dataset: str, seed: int, method: str, test: ad.AnnData, generated: ad.AnnData,
             fit_seconds: float | None, extra: dict | None = None) -> dict:
    path = cache_path(dataset, seed, method)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    generated = generated.copy()
    generated.uns = {}
    generated.write_h5ad(path)
    record = {"dataset": dataset, "seed": seed, "method": method, "fit_seconds": fit_seconds,
              "n_test": test.n_obs, "metrics": score(test, generated, seed), "meta": meta(),
              **(extra or {})}
    path = run_path(dataset, seed, method)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"[{dataset} seed {seed}] {method}: fit {fit_seconds or 0:.0f} s, "
          f"cond W2 {record['metrics'].get('W2 | conditional', float('nan')):.3f}, "
          f"cond MMD {record['metrics'].get('MMD | conditional', float('nan')):.3f}, "
          f"RF AUC {record['metrics'].get('RF AUC | unconditional', float('nan')):.3f}",
          flush=True)
    return record


def rescore(dataset: str, seed: int, method: str, test: ad.AnnData) -> None:
    path = run_path(dataset, seed, method)
    with open(path) as handle:
        record = json.load(handle)
    generated = ad.read_h5ad(cache_path(dataset, seed, method))
    record["metrics"] = score(test, generated, seed)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)


def run_dataset(dataset: str, seeds: list[int], methods: list[str], args) -> None:
    adata = load_dataset(dataset, args.data_dir)
    for seed in seeds:
        train, test = scldiff.metrics.stratified_split(adata, LABELS, 0.2, seed=seed)
        label_counts = {k: int(v) for k, v in test.obs[LABELS].value_counts().items() if v}

        def todo(method: str, seed: int = seed, test: ad.AnnData = test) -> bool:
            done = os.path.exists(run_path(dataset, seed, method))
            if done and args.rescore and os.path.exists(cache_path(dataset, seed, method)):
                rescore(dataset, seed, method, test)
                print(f"[{dataset} seed {seed}] {method}: re-scored", flush=True)
            return args.force or not done

        if "floor" in methods and todo("floor"):
            floor = scldiff.metrics.label_matched_sample(train, test, LABELS, seed=seed)
            save_run(dataset, seed, "floor", test, floor, None)
        if "scvi" in methods and todo("scvi"):
            generated, seconds = fit_scvi(train, label_counts, seed)
            save_run(dataset, seed, "scvi", test, generated, seconds,
                     {"epochs": generated.uns["epochs"]})
        trained: dict[str, tuple[scldiff.LapDDPM, float]] = {}
        for method in [m for m in methods if m in ABLATIONS]:
            if not todo(method):
                continue
            setup_kwargs, train_kwargs, generate_kwargs = ABLATIONS[method]
            source = GENERATE_FROM.get(method, method)
            if source not in trained:
                trained[source] = cached_model(dataset, seed, source)
            if trained[source] is None or (source == method and args.force):
                s_setup, s_train, _ = ABLATIONS[source]
                trained[source] = fit_lapddpm(train, label_counts, seed, s_setup, s_train,
                                              MODEL_KWARGS.get(source))
                cache_model(dataset, seed, source, *trained[source])
            model, seconds = trained[source]
            start = time.perf_counter()
            generated = lapddpm_generate(model, label_counts, seed, generate_kwargs, test)
            save_run(dataset, seed, method, test, generated, seconds,
                     {"generate_seconds": time.perf_counter() - start,
                      "trained_as": source})


# --------------------------------------------------------------------------- report
SUMMARY_METRICS = {
    "cond. W2": "W2 | conditional",
    "cond. MMD": "MMD | conditional",
    "cond. W1": "W1 | conditional",
    "W2": "W2 | unconditional",
    "MMD": "MMD | unconditional",
    "RF AUC": "RF AUC | unconditional",
    "TSTR F1": "TSTR macro F1 | conditional",
    "marker overlap": "marker overlap | conditional",
    "median library": "median library size (generated) | unconditional",
    "zero fraction": "mean zero fraction (generated) | unconditional",
    "gene corr. error": "gene-gene correlation error | unconditional",
    "library–expression R²": "library-expression R2 (generated) | conditional",
}


def load_runs() -> pd.DataFrame:
    rows = []
    for root, _, files in os.walk(RUNS):
        for name in files:
            if name.endswith(".json"):
                with open(os.path.join(root, name)) as handle:
                    record = json.load(handle)
                row = {"dataset": record["dataset"], "seed": record["seed"],
                       "method": record["method"], "fit seconds": record["fit_seconds"]}
                row.update(record["metrics"])
                row["median library (real)"] = record["metrics"].get(
                    "median library size (real) | unconditional")
                rows.append(row)
    return pd.DataFrame(rows)


def mean_sd(values: pd.Series, digits: int = 3) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f} (n=1)"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def summarise(runs: pd.DataFrame, methods: list[str]) -> tuple[dict, str]:
    summary: dict = {}
    lines: list[str] = []
    for dataset in [d for d in DATASETS if d in set(runs["dataset"])]:
        sub = runs[runs["dataset"] == dataset]
        present = [m for m in methods if m in set(sub["method"])]
        columns = ["seeds"] + list(SUMMARY_METRICS) + ["fit seconds"]
        table = pd.DataFrame(index=present, columns=columns, dtype=object)
        stats: dict = {}
        for method in present:
            rows = sub[sub["method"] == method]
            table.loc[method, "seeds"] = ",".join(str(s) for s in sorted(rows["seed"]))
            stats[method] = {"seeds": sorted(int(s) for s in rows["seed"])}
            for name, key in {**SUMMARY_METRICS, "fit seconds": "fit seconds"}.items():
                if key in rows:
                    table.loc[method, name] = mean_sd(rows[key], 1 if "seconds" in name else 3)
                    values = rows[key].dropna().astype(float)
                    if not values.empty:
                        stats[method][name] = {"mean": values.mean(),
                                               "sd": values.std(ddof=1) if len(values) > 1
                                               else None, "values": values.tolist()}
        summary[dataset] = {"methods": stats}
        lines += [f"### {dataset}", "", scldiff.metrics.to_markdown(table.fillna("")), ""]
        if {"lapddpm", "scvi", "floor"} <= set(present):
            # gap closed and targets on the seeds all three share
            seeds = sorted(set.intersection(*(set(sub[sub["method"] == m]["seed"])
                                              for m in ("lapddpm", "scvi", "floor"))))
            mean = {m: sub[(sub["method"] == m) & sub["seed"].isin(seeds)].mean(numeric_only=True)
                    for m in ("lapddpm", "scvi", "floor")}
            checks = {}
            for name in ("cond. W2", "cond. MMD"):
                key = SUMMARY_METRICS[name]
                gap = (mean["scvi"][key] - mean["lapddpm"][key]) / (
                    mean["scvi"][key] - mean["floor"][key])
                checks[f"{name}: gap closed (target >= 0.75)"] = (gap, gap >= 0.75)
            auc = mean["lapddpm"][SUMMARY_METRICS["RF AUC"]]
            checks["RF AUC (target <= 0.65)"] = (auc, auc <= 0.65)
            f1, f1_scvi = (mean[m][SUMMARY_METRICS["TSTR F1"]] for m in ("lapddpm", "scvi"))
            checks["TSTR F1 (target >= scVI's)"] = (f1, f1 >= f1_scvi)
            lib = mean["lapddpm"][SUMMARY_METRICS["median library"]]
            lib_real = mean["floor"]["median library (real)"]
            rel = abs(lib / lib_real - 1)
            checks["median library, relative error (target <= 0.05)"] = (rel, rel <= 0.05)
            fit, fit_scvi = mean["lapddpm"]["fit seconds"], mean["scvi"]["fit seconds"]
            checks["fit seconds (target <= scVI's)"] = (fit, fit <= fit_scvi)
            summary[dataset]["targets"] = {k: {"value": float(v), "met": bool(ok)}
                                           for k, (v, ok) in checks.items()}
            summary[dataset]["targets_seeds"] = seeds
            lines += [f"Targets (means over seeds {', '.join(map(str, seeds))}):", ""]
            lines += ["| target | value | met |", "|---|---|---|"]
            lines += [f"| {k} | {v:.3f} | {'yes' if ok else 'no'} |"
                      for k, (v, ok) in checks.items()]
            lines.append("")
    return summary, "\n".join(lines)


def headline_figure(runs: pd.DataFrame, path: str) -> None:
    """The headline as a figure: conditional MMD and RF AUC of scVI, LapDDPM and the
    real-vs-real floor per dataset, mean and sd over seeds, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [("floor", "real vs real (floor)", "#9e9e9e"), ("scvi", "scVI", "#d95f02"),
               ("lapddpm", "scldiff", "#1b9e77")]
    datasets = sorted(set(runs["dataset"]))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(8, 2.4 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, (name, key) in enumerate((("conditional MMD (lower is better)",
                                            SUMMARY_METRICS["cond. MMD"]),
                                           ("RF AUC (0.5 is ideal)", SUMMARY_METRICS["RF AUC"]))):
            ax = axes[row, col]
            for i, (method, _, colour) in enumerate(methods):
                values = runs[(runs["dataset"] == dataset) & (runs["method"] == method)][key]
                if values.empty:
                    continue
                ax.barh(i, values.mean(), xerr=values.std() if len(values) > 1 else None,
                        color=colour, alpha=0.8)
                ax.plot(values, [i] * len(values), "k.", ms=4)
            ax.set_yticks(range(len(methods)), [label for _, label, _ in methods])
            ax.set_title(f"{dataset}: {name}", fontsize=9)
            if "AUC" in name:
                ax.axvline(0.5, color="k", lw=0.8, ls=":")
                ax.set_xlim(0.4, 1.0)
            else:
                low = runs[runs["dataset"] == dataset][key].min()
                ax.set_xlim(low * 0.95, None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report() -> None:
    runs = load_runs()
    if runs.empty:
        print("no finished runs under", RUNS)
        return
    headline_figure(runs[runs["method"].isin(["floor", "scvi", "lapddpm"])],
                    os.path.join(RESULTS, "quality.png"))
    ablation_runs = runs[runs["method"].isin([m for m in ABLATIONS if m != "lapddpm"])]
    for stem, methods in (("quality", ["floor", "scvi", "lapddpm"]),
                          ("ablations", list(ABLATIONS))):
        if stem == "ablations" and ablation_runs.empty:
            with open(os.path.join(RESULTS, "ablations.md"), "w") as handle:
                handle.write("No ablation has been run yet: `python benchmarks/quality.py "
                             "--ablations` runs them.\n")
            continue
        summary, markdown = summarise(runs, methods)
        header = ("Mean ± sd over seeds (n=1: a single seed). Lower is better except TSTR F1 "
                  "and marker overlap (higher) and RF AUC (0.5 is ideal). Produced by "
                  "`python benchmarks/quality.py" + (" --ablations" if stem == "ablations"
                                                     else "") + "`.\n\n")
        if stem == "ablations":  # only datasets with an ablation run
            ablated = set(ablation_runs["dataset"])
            summary = {k: v for k, v in summary.items() if k in ablated}
            markdown = "".join(part if i == 0 else "### " + part
                                  for i, part in enumerate(markdown.split("### "))
                                  if i == 0 or part.split("\n", 1)[0].strip() in ablated)
        with open(os.path.join(RESULTS, f"{stem}.md"), "w") as handle:
            handle.write(header + markdown)
        with open(os.path.join(RESULTS, f"{stem}.json"), "w") as handle:
            json.dump({"summary": summary, "runs": runs[runs["method"].isin(methods)]
                       .to_dict(orient="records")}, handle, indent=2, default=float)
        print(markdown)


def per_label(datasets: list[str], seeds: list[int], methods: list[str], data_dir: str) -> None:
    """Conditional MMD per cell type, from the cached cells of finished runs.

    The conditional MMD is an unweighted mean over cell types, so a type with a handful of
    held-out cells (PBMC3K's megakaryocytes: 3) weighs as much as one with hundreds, and
    its value is mostly sampling noise. This table shows where each method's distance comes
    from. Writes ``results/quality_per_label.{json,md}``.
    """
    rows, lines = [], ["Conditional MMD per cell type (held-out cells in brackets), from the "
                       "cached cells of each run (a run whose cells are no longer cached keeps "
                       "its column from the previous table). Produced by "
                       "`python benchmarks/quality.py --per-label`.", ""]
    path = os.path.join(RESULTS, "quality_per_label.json")
    previous: dict[tuple, dict[str, float]] = {}
    if os.path.exists(path):
        with open(path) as handle:
            for row in json.load(handle):
                if row["mmd"] is not None:
                    key = (row["dataset"], row["seed"], row["method"])
                    previous.setdefault(key, {})[row["label"]] = row["mmd"]
    for dataset in datasets:
        adata = None
        for seed in seeds:
            found = [m for m in methods if os.path.exists(cache_path(dataset, seed, m))
                     or (dataset, seed, m) in previous]
            if not found:
                continue
            if adata is None:
                adata = load_dataset(dataset, data_dir)
            _, test = scldiff.metrics.stratified_split(adata, LABELS, 0.2, seed=seed)
            real_labels = test.obs[LABELS].astype(str).to_numpy()
            table: dict[str, dict[str, float]] = {}
            for method in found:
                if not os.path.exists(cache_path(dataset, seed, method)):
                    table[method] = previous[(dataset, seed, method)]
                    continue
                generated = with_all_genes(ad.read_h5ad(cache_path(dataset, seed, method)),
                                           test.var_names)
                if LABELS not in generated.obs:
                    continue
                x_real, x_gen = scldiff.metrics.shared_pca(test, generated, random_state=seed)
                gen_labels = generated.obs[LABELS].astype(str).to_numpy()
                table[method] = {
                    label: scldiff.metrics.mmd_rbf(x_real[real_labels == label],
                                                   x_gen[gen_labels == label])
                    for label in np.unique(real_labels) if (gen_labels == label).any()}
            labels = sorted(np.unique(real_labels),
                            key=lambda label: -(real_labels == label).sum())
            lines += [f"### {dataset}, seed {seed}", "",
                      "| cell type | " + " | ".join(table) + " |",
                      "|---|" + "---|" * len(table)]
            for label in labels:
                n = int((real_labels == label).sum())
                lines.append(f"| {label} ({n}) | " + " | ".join(
                    f"{table[m][label]:.3f}" if label in table[m] else "–" for m in table) + " |")
                rows += [{"dataset": dataset, "seed": seed, "method": m, "label": label,
                          "n_test": n, "mmd": table[m].get(label)} for m in table]
            lines.append("| mean | " + " | ".join(
                f"{np.mean(list(table[m].values())):.3f}" for m in table) + " |")
            lines.append("")
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(rows, handle, indent=2)
    with open(os.path.join(RESULTS, "quality_per_label.md"), "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc3k", "zheng17"],
                        choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["floor", "scvi", "lapddpm"],
                        choices=["floor", "scvi", *ABLATIONS])
    parser.add_argument("--ablations", action="store_true",
                        help="also run every LapDDPM ablation (not the GPU ones)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--force", action="store_true", help="refit finished runs")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the metrics of finished runs from cached cells")
    parser.add_argument("--report", action="store_true", help="only write the tables")
    parser.add_argument("--per-label", action="store_true",
                        help="only write the per-cell-type MMD table of finished runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_label:
        per_label(args.datasets, args.seeds, args.methods, args.data_dir)
        return
    gpu_asked = [m for m in args.methods if m in GPU_VARIANTS]
    if gpu_asked and not args.report and not torch.cuda.is_available():
        sys.exit(f"benchmarks/quality.py: {', '.join(gpu_asked)} train on a GPU, and torch sees "
                 "no CUDA device here; run them on a machine with one.")
    if not args.report:
        for dataset in args.datasets:
            methods = list(args.methods)
            if args.ablations:
                methods += [m for m in ABLATIONS if m not in methods and m not in EXPLICIT_ONLY]
            run_dataset(dataset, args.seeds, methods, args)
    report()


if __name__ == "__main__":
    main()
