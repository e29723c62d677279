"""Training on PBMC3K: the time of a step of LapDDPM's two stages and of scVI's, the default
runs' estimated (or measured) times, and the host's share of a stage-A step."""

from __future__ import annotations

import time

import numpy as np
import torch

import scldiff

from .common import LABELS, StepTimer, accelerator, median_step, pbmc3k, sync


def minibatch_host_times(model, batches: int = 30, batch_size: int = 128,
                         pyg: bool = False) -> dict:
    """Host-side cost of one stage-A minibatch of ``batch_size`` random seed cells, the
    median over ``batches`` batches after two warm-ups: the whole minibatch (subgraph, rows
    of the counts, encoder input) and the subgraph alone. ``pyg``: also torch_geometric's
    ``k_hop_subgraph`` on the same seeds, which needs no compiled extension (its
    ``NeighborSampler`` needs ``pyg-lib`` or ``torch-sparse``, not on PyPI as wheels) and
    scans every edge of the graph for each batch."""
    collator = model._collator()
    sampler = collator.sampler
    n = sampler.indptr.size - 1
    rng = np.random.default_rng(0)
    seeds = [rng.choice(n, size=min(batch_size, n), replace=False) for _ in range(batches + 2)]
    times: dict[str, list[float]] = {"batch_seconds": [], "subgraph_seconds": []}
    for s in seeds:
        start = time.perf_counter()
        collator(s.tolist())
        middle = time.perf_counter()
        sampler(s)
        times["batch_seconds"].append(middle - start)
        times["subgraph_seconds"].append(time.perf_counter() - middle)
    record = {"subgraph_nodes": int(sampler(seeds[0]).nodes.size)}
    del collator
    if pyg:
        from torch_geometric.utils import k_hop_subgraph

        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(sampler.indptr))
        edge_index = torch.from_numpy(np.stack([rows, sampler.indices]))
        del rows
        times["pyg_k_hop_subgraph_seconds"] = []
        for i, s in enumerate(seeds):
            start = time.perf_counter()
            subset = k_hop_subgraph(torch.from_numpy(s), sampler.n_hops, edge_index,
                                    relabel_nodes=True, num_nodes=n)[0]
            times["pyg_k_hop_subgraph_seconds"].append(time.perf_counter() - start)
            if i == 0 and not np.array_equal(np.sort(subset.numpy()),
                                             np.sort(sampler(s).nodes)):
                raise RuntimeError("k_hop_subgraph and SubgraphSampler found different "
                                   "neighbourhoods")
    record.update({name: float(np.median(t[2:])) for name, t in times.items()})
    return record


def bench_training(epochs: int, full: bool = False) -> dict:
    """Step times over ``epochs`` epochs of each stage and of scVI; ``full``: also the wall
    time of each method's default training run, from a fresh model."""
    import scvi

    from scldiff.model._training import STAGE_A_STEPS, STAGE_B_STEPS, epochs_for_steps

    adata = pbmc3k()
    scvi.settings.seed = 0
    data = adata.copy()
    scldiff.LapDDPM.setup_anndata(data, labels_key=LABELS)
    model = scldiff.LapDDPM(data)
    timer = StepTimer()
    model.train(max_epochs_vae=epochs, max_epochs_diffusion=epochs, callbacks=[timer],
                enable_progress_bar=False, accelerator=accelerator())
    n_train = len(model.train_indices_)
    scvi_data = adata.copy()
    scvi.model.SCVI.setup_anndata(scvi_data, categorical_covariate_keys=[LABELS])
    scvi_model = scvi.model.SCVI(scvi_data)
    scvi_timer = StepTimer()
    scvi_model.train(max_epochs=epochs, callbacks=[scvi_timer], enable_progress_bar=False,
                     accelerator=accelerator())
    scvi_steps_epoch = len(scvi_timer.times["scvi"]) // epochs
    step_a, step_b, step_scvi = (median_step(t, 5) for t in (
        timer.times["A"], timer.times["B"], scvi_timer.times["scvi"]))
    n_a = epochs_for_steps(STAGE_A_STEPS, n_train, 128)
    n_b = epochs_for_steps(STAGE_B_STEPS, n_train, 256)
    a_epoch, b_epoch = -(-n_train // 128), max(n_train // 256, 1)
    host = minibatch_host_times(model)
    record = {"n_train_cells": n_train,
              "lapddpm_stage_a_step_seconds": step_a, "lapddpm_stage_b_step_seconds": step_b,
              "lapddpm_stage_a_epoch_seconds": step_a * a_epoch,
              "lapddpm_stage_b_epoch_seconds": step_b * b_epoch,
              "scvi_step_seconds": step_scvi, "scvi_epoch_seconds": step_scvi * scvi_steps_epoch,
              "lapddpm_default_epochs": [n_a, n_b],
              "lapddpm_default_seconds_estimate": n_a * a_epoch * step_a + n_b * b_epoch * step_b,
              "scvi_default_seconds_estimate": 400 * scvi_steps_epoch * step_scvi,
              "lapddpm_stage_a_batch_seconds": host["batch_seconds"],
              "lapddpm_stage_a_subgraph_seconds": host["subgraph_seconds"],
              "lapddpm_stage_a_subgraph_nodes": host["subgraph_nodes"]}
    if full:
        record.update(_default_runs(adata))
    return record


def _default_runs(adata) -> dict:
    """The default training runs of LapDDPM and scVI, end to end, as a user starts them."""
    import scvi

    scvi.settings.seed = 0
    data = adata.copy()
    scldiff.LapDDPM.setup_anndata(data, labels_key=LABELS)
    model = scldiff.LapDDPM(data)
    sync()
    start = time.perf_counter()
    model.train(enable_progress_bar=False, accelerator=accelerator())
    sync()
    record = {"lapddpm_default_seconds": time.perf_counter() - start}
    scvi_data = adata.copy()
    scvi.model.SCVI.setup_anndata(scvi_data, categorical_covariate_keys=[LABELS])
    scvi_model = scvi.model.SCVI(scvi_data)
    start = time.perf_counter()
    scvi_model.train(enable_progress_bar=False, accelerator=accelerator())
    sync()
    record["scvi_default_seconds"] = time.perf_counter() - start
    record["scvi_default_epochs"] = int(scvi_model.history["elbo_train"].shape[0])
    return record
