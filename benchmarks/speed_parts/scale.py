"""Atlas sizes: a synthetic atlas made from PBMC3K at 10k to 1M cells, in memory or backed;
setup, the stage-A step and generation, each size in its own process."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import scldiff

from .common import (
    LABELS,
    Measure,
    StepTimer,
    accelerator,
    device,
    median_step,
    pbmc3k,
    rss_bytes,
)
from .training import minibatch_host_times


def synthetic_atlas(n_cells: int, seed: int = 0, n_genes: int = 2000,
                    chunk: int = 20_000) -> ad.AnnData:
    """``n_cells`` drawn from PBMC3K's labels: per-label NB on its most variable genes.

    Each cell takes a label with PBMC3K's proportions and the library size of a random
    real cell of that label. Counts are drawn from a negative binomial whose mean is the
    label's gene proportions times that library, with a per-gene inverse dispersion fitted
    by moments on the real cells (clipped to [0.05, 100]).
    """
    import scanpy as sc

    from scldiff.distributions import CountParams
    from scldiff.metrics._threads import torch_threads_kept
    from scldiff.sampling import draw_counts

    real = pbmc3k()
    with torch_threads_kept():  # numba's OpenMP layer would reset torch's thread count
        hvg = sc.pp.highly_variable_genes(real, flavor="seurat_v3", n_top_genes=n_genes,
                                          inplace=False)["highly_variable"].to_numpy()
    x = sp.csr_matrix(real.X[:, hvg], dtype=np.float64)
    labels = real.obs[LABELS].cat.codes.to_numpy()
    categories = real.obs[LABELS].cat.categories
    library = np.asarray(x.sum(1)).ravel()
    n_labels = len(categories)
    proportions = np.zeros((n_labels, x.shape[1]))
    for code in range(n_labels):
        proportions[code] = np.asarray(x[labels == code].sum(0)).ravel() + 1e-3
    norm = sp.diags(library.mean() / library) @ x  # size-normalised, moments per gene
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    theta = np.clip(mean**2 / np.maximum(var - mean, 1e-8), 0.05, 100.0)
    rng = np.random.default_rng(seed)
    codes = rng.choice(n_labels, n_cells, p=np.bincount(labels, minlength=n_labels) / labels.size)
    libs = np.empty(n_cells)
    for code in range(n_labels):
        where = np.flatnonzero(codes == code)
        libs[where] = library[rng.choice(np.flatnonzero(labels == code), where.size)]
    log_proportions = torch.from_numpy(np.log(proportions)).float()
    log_theta = torch.from_numpy(np.log(theta)).float()
    counts = sp.vstack([draw_counts(CountParams("nb", log_proportions[codes[start:start + chunk]],
                                                log_theta),
                                    torch.from_numpy(libs[start:start + chunk]), rng)
                        for start in range(0, n_cells, chunk)], format="csr")
    obs = pd.DataFrame({LABELS: pd.Categorical.from_codes(codes, categories=categories)},
                       index=pd.Index([f"cell-{i}" for i in range(n_cells)]))
    atlas = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=real.var_names[hvg].astype(str)))
    # a small atlas can miss a rare gene entirely; setup_anndata refuses genes without counts
    expressed = np.asarray(counts.sum(0)).ravel() > 0
    return atlas if expressed.all() else atlas[:, expressed].copy()


def scale_worker(n_cells: int, steps: int, n_generate: int, backed: bool = False,
                 windows: int = 5) -> dict:
    """One atlas size, in its own process so that peak memory is its own.

    ``backed``: the atlas is written to a temporary ``.h5ad`` and read back with
    ``backed="r"``, so that its counts stay on disk through setup, training and generation.
    The stage-A steps after the first ten are timed in ``windows`` windows of ``steps``
    steps; the step time is the smallest of the windows' medians (on a shared virtual
    machine one window's median moved by up to 60% from the next one's).
    """
    import scvi

    from scldiff.model._training import epochs_for_steps

    with Measure() as build:
        adata = synthetic_atlas(n_cells)
    record = {"n_cells": n_cells, "backed": backed, "n_genes": adata.n_vars,
              "nnz": int(adata.X.nnz), "atlas_seconds": build.seconds}
    if backed:
        folder = tempfile.TemporaryDirectory()
        path = os.path.join(folder.name, "atlas.h5ad")
        adata.write_h5ad(path)
        del adata
        gc.collect()
        adata = ad.read_h5ad(path, backed="r")
        record.update(file_gib=os.path.getsize(path) / 2**30,
                      rss_before_setup_gib=rss_bytes() / 2**30)
    with Measure() as setup:
        scldiff.LapDDPM.setup_anndata(adata, labels_key=LABELS)
    record.update(setup_seconds=setup.seconds, setup_peak_gib=setup.peak_gib)
    partial(record)
    scvi.settings.seed = 0
    model = scldiff.LapDDPM(adata)
    warmup = 10
    timer = StepTimer(limit=warmup + windows * steps)
    if device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train(max_epochs_vae=epochs_for_steps(warmup + windows * steps, n_cells, 128) + 1,
                max_epochs_diffusion=1, callbacks=[timer], enable_progress_bar=False,
                accelerator=accelerator())
    times, rss = timer.times["A"], timer.rss["A"]
    warm = min(warmup, len(rss) - 1)
    medians = [median_step(times[start : start + steps], 0)
               for start in range(warm, len(times), steps)
               if len(times[start : start + steps]) == steps] or [median_step(times, warm)]
    # resident memory added over the steps after the first ten: what a step needs beyond
    # the data loaded before it
    record.update(step_seconds=min(medians), step_seconds_windows=medians,
                  step_memory_growth_gib=(max(rss[warm:]) - rss[warm]) / 2**30)
    if device() == "cuda":
        record["train_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    partial(record)
    with Measure() as gen:
        model.generate(n_samples=n_generate, seed=0, progress_bar=False)
    record.update(generate_cells=n_generate, generate_seconds=gen.seconds,
                  generate_peak_gib=gen.peak_gib)
    if device() == "cuda":
        record["generate_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    partial(record)
    # last, so that the full graph's edge list in torch does not weigh on the peaks above
    record.update(minibatch_host_times(model, pyg=True))
    return record


def partial(record: dict) -> None:
    """A worker's record so far, on stderr: kept in a log when a long run is cut short."""
    print("[partial] " + json.dumps(record), file=sys.stderr, flush=True)


def bench_scale(script: str, sizes: list[int], steps: int, n_generate: int, threads: int,
                backed: bool = False, windows: int = 5) -> list[dict]:
    """Each size by ``script --scale-worker`` in a process of its own."""
    records = []
    for n in sizes:
        print(f"[scale] {n:,} cells{' (backed)' if backed else ''} ...", flush=True)
        done = subprocess.run(
            [sys.executable, script, "--scale-worker", str(n), "--steps", str(steps),
             "--windows", str(windows), "--generate-cells", str(n_generate),
             "--threads", str(threads), "--device", device(), *(["--backed"] if backed else [])],
            capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            records.append({"n_cells": n, "backed": backed,
                            "error": done.stderr.strip().splitlines()[-1]})
            continue
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    return relative_steps(records)


def relative_steps(records: list[dict]) -> list[dict]:
    """Each size's step time relative to the smallest in-memory atlas measured."""
    base = next((r for r in records if "step_seconds" in r and not r.get("backed")), None)
    for r in records:
        if base is not None and "step_seconds" in r:
            r["step_time_vs_smallest"] = r["step_seconds"] / base["step_seconds"]
    return records
