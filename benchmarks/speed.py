"""Speed and scale benchmark: generation, training steps, atlas-size setup, against scVI.

Usage (from the repository root, after ``make install``)::

    python benchmarks/speed.py                         # all parts, atlases of 10k and 100k cells
    python benchmarks/speed.py --sizes 10000 100000 1000000
    python benchmarks/speed.py --parts generation training
    python benchmarks/speed.py --parts scale --sizes 1000000 --backed  # counts on disk
    python benchmarks/speed.py --quick                 # small and short: checks the script runs
    python benchmarks/speed.py --device cuda --full-training   # on a GPU, the default runs too

Parts:

* **generation**: 10,000 cells from a PBMC3K model with the default architecture and
  sampler (``generate()``; best of ``--repeats``), split into latent sampling and the
  decoder with the count draws, next to scVI's prior sampling (z ~ N(0, I), decoder,
  Gamma-Poisson counts) in the same process. On a GPU also one batch profiled part by
  part: latents, decoder, dense selection, positive counts, copy to the host. The model's
  weights come from a short training run, since they do not change the cost.
* **training**: time per optimisation step of LapDDPM's stage A (subgraph VAE) and stage B
  (latent diffusion) and of scVI, on PBMC3K, the median over a few epochs after a warm-up,
  and the default run's time estimated from them (LapDDPM's default step counts, scVI's
  400 epochs); also the host's time to build one stage-A minibatch (part of the step) and
  the number of tensor operations a stage-A step dispatches.
* **scale**: a synthetic atlas made from PBMC3K: per-label negative binomial resampling of
  its 2,000 most variable genes, with library sizes of real cells of the label. For each
  size, in a fresh process: wall time and peak resident memory of ``setup_anndata`` (PCA,
  k-NN graph, Laplacian encodings), of stage A's steps (10 warm-up steps, then
  ``--windows`` windows of ``--steps`` steps, 5 of 100 by default; the time per step is
  the smallest window median, since on a shared virtual machine one window's median
  moved by up to 60% from the next one's; "step memory growth" is the resident memory
  added from the end of step 10 to the last step, i.e. what the steps need beyond what
  was loaded before them), and of generating 100,000 cells
  (after 100 steps of stage B). With ``--backed`` the atlas is first written to a
  temporary ``.h5ad`` and opened with ``backed="r"``: its counts stay on disk throughout,
  which the peak memory shows. Last, the host's time to build one stage-A minibatch and
  its subgraph, next to torch_geometric's ``k_hop_subgraph`` finding the same
  neighbourhood (it scans all edges for each batch).

On a GPU (``--device cuda``; ``auto``, the default, takes one where there is one), models
train and generate there, timings wait for the device (``torch.cuda.synchronize``), the
scale part also records the GPU's peak allocated memory, and the results go to
``speed_cuda.json`` and ``speed_cuda.md`` (``--full-training`` adds the wall time of
LapDDPM's and scVI's default training runs, too long to be routine on a CPU).

Peak memory is the process's resident set size, sampled every 20 ms during a stage; "growth"
is the peak minus the resident size when the stage began. Timings depend on the machine and
on what else runs on it. The results are meaningful only on an otherwise idle machine, and
the table records the thread count. Writes ``benchmarks/results/speed.json`` and
``speed.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback

import scldiff

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LABELS = "cell_type"
PARTS = ("generation", "training", "scale")
DEVICE = "cpu"  # where models train and generate; set by main() from --device


def _accelerator() -> str:
    return "gpu" if DEVICE == "cuda" else DEVICE


def _sync() -> None:
    """Wait for the device, so that a host clock read after it counts its work."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- helpers
# labels of the generation parts in the report
PART_NAMES = {"latents": "latent sampling", "decoder": "decoder", "counts": "count sampling",
              "decoder and counts": "decoder and count sampling",
              "decoder products": "of which the decoder's matrix products alone"}

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far, the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Measure:
    """Wall time and peak resident memory of a block (RSS sampled by a thread)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval

    def __enter__(self):
        self.start_rss = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_gib = self.peak / 2**30
        self.growth_gib = (self.peak - self.start_rss) / 2**30
        return False


def processor() -> str:
    """The CPU's model name (``platform.processor()`` is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def meta() -> dict:
    import scvi

    def commit() -> str:
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                  capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {"scldiff": scldiff.__version__, "commit": commit(), "scvi-tools": scvi.__version__,
            "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "machine": platform.platform(), "processor": processor(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
            **({"cuda": torch.version.cuda,
                "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
               if DEVICE == "cuda" else {})}


class StepTimer(Callback):
    """Lightning callback: the wall time of each training step, from the end of the
    previous one (so reading and building the minibatch count, not only the optimisation
    step), and the resident memory after it; stops after ``limit``."""

    def __init__(self, limit: int | None = None):
        self.limit, self.times, self.rss, self._t = limit, {}, {}, None

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        stage = getattr(module, "stage", "scvi")
        _sync()
        now = time.perf_counter()
        self.times.setdefault(stage, []).append(now - self._t)
        self._t = now
        self.rss.setdefault(stage, []).append(_rss_bytes())
        if self.limit is not None and len(self.times[stage]) >= self.limit:
            trainer.should_stop = True


def _median_step(times: list[float], warmup: int) -> float:
    return float(np.median(times[warmup:] if len(times) > warmup else times))


def _minibatch_host_times(model, batches: int = 30, batch_size: int = 128,
                          pyg: bool = False) -> dict:
    """Host-side cost of one stage-A minibatch of ``batch_size`` random seed cells, the
    median over ``batches`` batches after two warm-ups: the whole minibatch (the model's
    collator: subgraph, rows of the counts, encoder input) and the subgraph alone
    (:class:`~scldiff.graph.SubgraphSampler`). ``pyg``: also torch_geometric's
    ``k_hop_subgraph`` on the same seeds and graph, the library's neighbourhood function
    that needs no compiled extension (its ``NeighborSampler`` needs ``pyg-lib`` or
    ``torch-sparse``, which PyPI does not carry as wheels); it scans every edge of the
    graph for each batch."""
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
        del edge_index
    record.update({name: float(np.median(t[2:])) for name, t in times.items()})
    return record


def _ops_per_step(adata: ad.AnnData, epochs: int = 1) -> float:
    """Tensor operations (forward, backward, optimiser) that one stage-A step dispatches:
    the median over the steps of ``epochs`` epochs of training a fresh model on ``adata``,
    counted with a ``TorchDispatchMode``. On a GPU each is at least one kernel launched
    from the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += 1
            return func(*args, **(kwargs or {}))

    class PerStep(Callback):
        def __init__(self):
            self.counts: list[int] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._start = count[0]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.counts.append(count[0] - self._start)

    per_step = PerStep()
    model = scldiff.LapDDPM(adata)
    with Counting():
        model.train(n_epochs_stage_a=epochs, n_epochs_stage_b=0, callbacks=[per_step],
                    enable_progress_bar=False, accelerator=_accelerator())
    return float(np.median(per_step.counts))


# --------------------------------------------------------------------------- generation
def _train_pbmc3k(epochs_a: int, epochs_b: int) -> scldiff.LapDDPM:
    import scanpy as sc
    import scvi

    scvi.settings.seed = 0
    adata = scldiff.datasets.pbmc3k()
    sc.pp.filter_genes(adata, min_counts=1)
    scldiff.LapDDPM.setup_anndata(adata, labels_key=LABELS)
    model = scldiff.LapDDPM(adata)
    model.train(n_epochs_stage_a=epochs_a, n_epochs_stage_b=epochs_b, enable_progress_bar=False,
                accelerator=_accelerator())
    return model


def _scvi_prior_sampler(adata: ad.AnnData, epochs: int):
    """A briefly trained scVI (labels as covariate) and a function sampling its prior."""
    import scvi

    scvi.settings.seed = 0
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data, categorical_covariate_keys=[LABELS])
    model = scvi.model.SCVI(data)
    model.train(max_epochs=epochs, enable_progress_bar=False, accelerator=_accelerator())
    model.module.eval()
    codes_all = data.obs[LABELS].cat.codes.to_numpy()
    library = np.asarray(data.X.sum(1)).ravel()
    device = model.device

    def sample(n: int, seed: int = 0) -> sp.csr_matrix:
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, data.n_obs, n)
        with torch.no_grad():
            z = torch.from_numpy(rng.standard_normal((n, model.module.n_latent))).float()
            out = model.module.generative(
                z=z.to(device),
                library=torch.log(torch.from_numpy(library[pick]).float())[:, None].to(device),
                batch_index=torch.zeros(n, 1, dtype=torch.long, device=device),
                cat_covs=torch.from_numpy(codes_all[pick].astype(np.int64))[:, None].to(device))
            if device.type != "cpu":  # Gamma-Poisson draws on the device, sparse back
                torch.manual_seed(seed)  # torch's Gamma sampler takes no generator
                mu, theta = out["px"].mu, out["px"].theta
                rate = torch.distributions.Gamma(theta.expand_as(mu), theta / mu).sample()
                counts = torch.poisson(rate).to_sparse_csr()
                return sp.csr_matrix((counts.values().cpu().numpy(),
                                      counts.col_indices().cpu().numpy(),
                                      counts.crow_indices().cpu().numpy()), shape=(n, mu.shape[1]))
            mu, theta = out["px"].mu.double().numpy(), out["px"].theta.double().numpy()
        return sp.csr_matrix(rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32))

    return sample


def bench_generation(n_cells: int, repeats: int, epochs: tuple[int, int],
                     other_steps: tuple[int, ...] = (30,)) -> dict:
    """``other_steps``: also time ``generate(n_steps=k)``, for comparison with the default
    (their quality: ``benchmarks/sampler_steps.py``)."""
    target = 1.0 if DEVICE == "cpu" else 0.1  # issue 5: 1 s on 2 CPU cores, 0.1 s on a GPU
    model = _train_pbmc3k(*epochs)
    module = model.module.eval()
    # warm-up (allocator, lazy initialisation), then the best of the repeats
    model.generate(n_samples=min(n_cells, 500), seed=0, progress_bar=False)
    walls = []
    for r in range(repeats):
        start = time.perf_counter()
        generated = model.generate(n_samples=n_cells, seed=r, progress_bar=False)
        walls.append(time.perf_counter() - start)
    # on a GPU, also all cells in one batch explicitly, beside the default batch size
    one_batch = []
    if DEVICE != "cpu":
        for r in range(repeats):
            start = time.perf_counter()
            model.generate(n_samples=n_cells, seed=r, batch_size=n_cells, progress_bar=False)
            one_batch.append(time.perf_counter() - start)
    fewer = {}
    for n_steps in other_steps:
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            model.generate(n_samples=n_cells, seed=r, n_steps=n_steps, progress_bar=False)
            times.append(time.perf_counter() - start)
        fewer[str(n_steps)] = min(times)
    # the same under torch.autocast in bf16: fast only where the CPU computes bf16 natively
    # (benchmarks/precision.py); the network outputs move by about 0.3-0.4%
    autocast, device_type = [], model.device.type
    for r in range(repeats):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            start = time.perf_counter()
            model.generate(n_samples=n_cells, seed=r, progress_bar=False)
            autocast.append(time.perf_counter() - start)
    # the parts, on the same number of cells in one batch: the guided latent diffusion,
    # then the decoder and the count draws (chunked as generate() does), in float32 and
    # under bf16 autocast (best of the repeats, like the totals)
    guidance = inspect.signature(model.generate).parameters["guidance_scale"].default
    parts = _generation_parts(module, n_cells, repeats, guidance, autocast=False)
    parts_bf16 = _generation_parts(module, n_cells, repeats, guidance, autocast=True)
    # on a GPU, one batch profiled part by part (the CPU's draws run in worker threads)
    profile = _draw_profile(module, n_cells, repeats, guidance) if DEVICE != "cpu" else None

    scvi_sample = _scvi_prior_sampler(model.adata, epochs=max(1, epochs[0] // 2))
    scvi_sample(min(n_cells, 500))
    scvi_walls = []
    for r in range(repeats):
        start = time.perf_counter()
        scvi_sample(n_cells, seed=r)
        scvi_walls.append(time.perf_counter() - start)
    best, scvi_best = min(walls), min(scvi_walls)
    return {"n_cells": n_cells, "n_genes": int(generated.n_vars),
            "sampler": generated.uns["scldiff"]["sampler"],
            "n_steps": generated.uns["scldiff"]["n_steps"],
            "lapddpm_seconds": best, "lapddpm_cells_per_second": n_cells / best,
            "lapddpm_all_seconds": walls, "lapddpm_seconds_with_n_steps": fewer,
            "lapddpm_seconds_bf16_autocast": min(autocast), "autocast_device": device_type,
            **({"lapddpm_seconds_one_batch": min(one_batch)} if one_batch else {}),
            "parts_seconds": parts, "parts_seconds_bf16_autocast": parts_bf16,
            **({"draw_profile_seconds": profile} if profile else {}),
            "scvi_prior_seconds": scvi_best, "scvi_cells_per_second": n_cells / scvi_best,
            "target_seconds": target, "met": best <= target,
            "met_bf16_autocast": min(autocast) <= target}


def _generation_parts(module, n_cells: int, repeats: int, guidance: float,
                      autocast: bool) -> dict:
    """Best-of-``repeats`` seconds of the latents, of the decoder with the count draws,
    and of the decoder's dense matrix products alone (a floor of its cost), for
    ``n_cells`` cells of random labels, under bf16 autocast or not."""
    rng = np.random.default_rng(0)
    n_labels = module.score_net.n_labels
    codes = torch.from_numpy(rng.integers(0, n_labels, n_cells))
    # on a GPU the counts are drawn there, from a torch generator, as generate() does
    generator = None if DEVICE == "cpu" else torch.Generator(device=DEVICE).manual_seed(0)
    chunk = 256 if DEVICE == "cpu" else n_cells
    decoder = module.decoder
    # the products without the biases, as the CPU sampler takes them (it adds the biases
    # in its own pass)
    projections = [layer.weight for layer in (decoder.scale, decoder.dropout_logits)
                   if layer is not None]
    library = torch.full((n_cells,), 2000.0)
    t_latents, t_counts, t_products = [], [], []
    device_type = "cpu" if DEVICE == "cpu" else "cuda"
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(repeats):
            with torch.no_grad():
                _sync()
                start = time.perf_counter()
                z = module.sample_latents(codes, guidance_scale=guidance)[:, : module.n_latent]
                _sync()
                t_latents.append(time.perf_counter() - start)
            start = time.perf_counter()
            module.decode_counts(z, library, rng, generator=generator, labels=codes)
            t_counts.append(time.perf_counter() - start)
            # in the chunks decode_counts uses, without softmax, likelihood or draws
            with torch.no_grad():
                hidden = decoder._hidden(z, codes.to(z.device))
                _sync()
                start = time.perf_counter()
                for begin in range(0, n_cells, chunk):
                    for weight in projections:
                        torch.mm(hidden[begin : begin + chunk], weight.t())
                _sync()
                t_products.append(time.perf_counter() - start)
    return {"latents": min(t_latents), "decoder and counts": min(t_counts),
            "decoder products": min(t_products)}


def _draw_profile(module, n_cells: int, repeats: int, guidance: float) -> dict:
    """Where one batch of ``n_cells`` goes when the counts are drawn in torch (a GPU's
    path): the latents, the decoder, the dense selection with the exact zero test, the
    positive counts (inverse CDF and Gamma-Poisson), and the CSR arrays' copy to the host,
    each between two device synchronisations (best of ``repeats`` for each part). The
    positive draws and the copy are timed by wrapping the sampler's functions for them."""
    from scldiff.module import _decoder

    rng = np.random.default_rng(0)
    codes = torch.from_numpy(rng.integers(0, module.score_net.n_labels, n_cells))
    library = torch.full((n_cells, 1), 2000.0, device=module.latent_mean.device)
    generator = torch.Generator(device=module.latent_mean.device).manual_seed(0)
    inside = {"positive draws": 0.0, "CSR to host": 0.0}
    wrapped = {"positive draws": "_positive_draws_torch", "CSR to host": "_csr_from_tensors"}
    originals = {name: getattr(_decoder, name) for name in wrapped.values()}

    def timed(part, function):
        def run(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = function(*args, **kwargs)
            _sync()
            inside[part] += time.perf_counter() - start
            return out
        return run

    parts: dict[str, list[float]] = {}
    try:
        for part, name in wrapped.items():
            setattr(_decoder, name, timed(part, originals[name]))
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first is a warm-up
                inside.update(dict.fromkeys(inside, 0.0))
                _sync()
                start = time.perf_counter()
                z = module.sample_latents(codes, guidance_scale=guidance)[:, : module.n_latent]
                _sync()
                latents = time.perf_counter()
                params = module.decoder.sampling_params(z, codes.to(z.device))
                _sync()
                decoded = time.perf_counter()
                _decoder.sample_counts(module.likelihood, params, library, generator)
                _sync()
                drawn = time.perf_counter()
                times = {"latents": latents - start, "decoder": decoded - latents,
                         "dense selection and exact zero test":
                             drawn - decoded - sum(inside.values()), **inside}
                for part, seconds in times.items():
                    parts.setdefault(part, []).append(seconds)
    finally:
        for name, function in originals.items():
            setattr(_decoder, name, function)
    return {part: min(seconds[1:]) for part, seconds in parts.items()}


# --------------------------------------------------------------------------- training
def bench_training(epochs: int, full: bool = False) -> dict:
    """Step times over ``epochs`` epochs; ``full``: also the wall time of each method's
    default training run (LapDDPM's step counts, scVI's default epochs), from a fresh model."""
    import scanpy as sc
    import scvi

    adata = scldiff.datasets.pbmc3k()
    sc.pp.filter_genes(adata, min_counts=1)
    scvi.settings.seed = 0
    data = adata.copy()
    scldiff.LapDDPM.setup_anndata(data, labels_key=LABELS)
    model = scldiff.LapDDPM(data)
    timer = StepTimer()
    model.train(n_epochs_stage_a=epochs, n_epochs_stage_b=epochs, callbacks=[timer],
                enable_progress_bar=False, accelerator=_accelerator())
    n_train = len(model.train_indices_)
    a_steps_epoch = -(-n_train // 128)
    b_steps_epoch = max(n_train // 256, 1)
    from scldiff.model._lapddpm import STAGE_A_STEPS, STAGE_B_STEPS, _epochs_for_steps

    defaults = (_epochs_for_steps(STAGE_A_STEPS, n_train, 128),
                _epochs_for_steps(STAGE_B_STEPS, n_train, 256))

    scvi_data = adata.copy()
    scvi.model.SCVI.setup_anndata(scvi_data, categorical_covariate_keys=[LABELS])
    scvi_model = scvi.model.SCVI(scvi_data)
    scvi_timer = StepTimer()
    scvi_model.train(max_epochs=epochs, callbacks=[scvi_timer], enable_progress_bar=False,
                     accelerator=_accelerator())
    scvi_steps_epoch = len(scvi_timer.times["scvi"]) // epochs

    warmup = 5
    step_a = _median_step(timer.times["A"], warmup)
    step_b = _median_step(timer.times["B"], warmup)
    step_scvi = _median_step(scvi_timer.times["scvi"], warmup)
    record = {"n_train_cells": n_train,
              "lapddpm_stage_a_step_seconds": step_a, "lapddpm_stage_b_step_seconds": step_b,
              "lapddpm_stage_a_epoch_seconds": step_a * a_steps_epoch,
              "lapddpm_stage_b_epoch_seconds": step_b * b_steps_epoch,
              "scvi_step_seconds": step_scvi,
              "scvi_epoch_seconds": step_scvi * scvi_steps_epoch}
    n_a, n_b = defaults
    record["lapddpm_default_epochs"] = [n_a, n_b]
    record["lapddpm_default_seconds_estimate"] = (n_a * a_steps_epoch * step_a
                                                  + n_b * b_steps_epoch * step_b)
    record["scvi_default_seconds_estimate"] = 400 * scvi_steps_epoch * step_scvi
    # what of a stage-A step is the host building its minibatch (included in the step)
    host = _minibatch_host_times(model)
    record.update(lapddpm_stage_a_batch_seconds=host["batch_seconds"],
                  lapddpm_stage_a_subgraph_seconds=host["subgraph_seconds"],
                  lapddpm_stage_a_subgraph_nodes=host["subgraph_nodes"],
                  lapddpm_stage_a_ops_per_step=_ops_per_step(data))
    if full:  # the default runs themselves, as a user starts them
        scvi.settings.seed = 0
        data = adata.copy()
        scldiff.LapDDPM.setup_anndata(data, labels_key=LABELS)
        model = scldiff.LapDDPM(data)
        _sync()
        start = time.perf_counter()
        model.train(enable_progress_bar=False, accelerator=_accelerator())
        _sync()
        record["lapddpm_default_seconds"] = time.perf_counter() - start
        scvi_data = adata.copy()
        scvi.model.SCVI.setup_anndata(scvi_data, categorical_covariate_keys=[LABELS])
        scvi_model = scvi.model.SCVI(scvi_data)
        start = time.perf_counter()
        scvi_model.train(enable_progress_bar=False, accelerator=_accelerator())
        _sync()
        record["scvi_default_seconds"] = time.perf_counter() - start
        record["scvi_default_epochs"] = int(scvi_model.history["elbo_train"].shape[0])
    return record


# --------------------------------------------------------------------------- scale
def synthetic_atlas(n_cells: int, seed: int = 0, n_genes: int = 2000,
                    chunk: int = 20_000) -> ad.AnnData:
    """``n_cells`` drawn from PBMC3K's labels: per-label NB on its most variable genes.

    Each cell takes a label with PBMC3K's proportions and the library size of a random
    real cell of that label. Counts are drawn from a negative binomial whose mean is the
    label's gene proportions times that library, with a per-gene inverse dispersion fitted
    by moments on the real cells (clipped to [0.05, 100]).
    """
    import scanpy as sc

    from scldiff._threads import torch_threads_kept
    from scldiff.module import sample_counts

    real = scldiff.datasets.pbmc3k()
    sc.pp.filter_genes(real, min_counts=1)
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
        proportions[code] = np.asarray(x[labels == code].sum(0)).ravel()
        proportions[code] = (proportions[code] + 1e-3) / (proportions[code] + 1e-3).sum()
    # moments of the size-normalised counts, per gene (pooled within labels)
    norm = sp.diags(library.mean() / library) @ x
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    theta = np.clip(mean**2 / np.maximum(var - mean, 1e-8), 0.05, 100.0)

    rng = np.random.default_rng(seed)
    weights = np.bincount(labels, minlength=n_labels) / labels.size
    codes = rng.choice(n_labels, n_cells, p=weights)
    by_label = [np.flatnonzero(labels == code) for code in range(n_labels)]
    libs = np.empty(n_cells)
    for code in range(n_labels):
        where = np.flatnonzero(codes == code)
        libs[where] = library[rng.choice(by_label[code], where.size)]
    blocks = []
    theta_t = torch.from_numpy(theta).float()
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        scale = torch.from_numpy(proportions[codes[start:stop]]).float()
        params = {"scale": scale, "theta": theta_t.expand_as(scale)}
        blocks.append(sample_counts("nb", params,
                                    torch.from_numpy(libs[start:stop]).float()[:, None], rng))
    counts = sp.vstack(blocks, format="csr")
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
    steps (over as many epochs as that takes); the step time is the smallest of the
    windows' medians. On a shared virtual machine the median of one window moved by up to
    60% from one window to the next, on the same atlas in the same process.
    """
    import gc
    import tempfile

    import scvi

    from scldiff.model._lapddpm import _epochs_for_steps

    with Measure() as build:
        adata = synthetic_atlas(n_cells)
    record = {"n_cells": n_cells, "backed": backed, "n_genes": adata.n_vars,
              "nnz": int(adata.X.nnz), "atlas_seconds": build.seconds,
              "atlas_peak_gib": build.peak_gib}
    if backed:
        folder = tempfile.TemporaryDirectory()
        path = os.path.join(folder.name, "atlas.h5ad")
        adata.write_h5ad(path)
        del adata
        gc.collect()
        adata = ad.read_h5ad(path, backed="r")
        record.update(file_gib=os.path.getsize(path) / 2**30,
                      rss_before_setup_gib=_rss_bytes() / 2**30)
    with Measure() as setup:
        scldiff.LapDDPM.setup_anndata(adata, labels_key=LABELS)
    record.update(setup_seconds=setup.seconds, setup_peak_gib=setup.peak_gib,
                  setup_growth_gib=setup.growth_gib)
    _partial(record)
    scvi.settings.seed = 0
    model = scldiff.LapDDPM(adata)
    warmup = 10
    timer = StepTimer(limit=warmup + windows * steps)
    # enough epochs for the steps (the timer stops the stage there; the helper rounds)
    epochs_a = _epochs_for_steps(warmup + windows * steps, n_cells, 128) + 1
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Measure() as train:
        model.train(n_epochs_stage_a=epochs_a, n_epochs_stage_b=1, callbacks=[timer],
                    enable_progress_bar=False, accelerator=_accelerator())
    step_times, rss = timer.times["A"], timer.rss["A"]
    warm = min(warmup, len(rss) - 1)
    medians = [_median_step(step_times[start : start + steps], 0)
               for start in range(warm, len(step_times), steps)
               if len(step_times[start : start + steps]) == steps] or [
        _median_step(step_times, warm)]
    record.update(train_steps_a=len(step_times),
                  # resident memory added over the steps after the first ten: what a step
                  # needs beyond the data loaded before it (the atlas-size target)
                  step_memory_growth_gib=(max(rss[warm:]) - rss[warm]) / 2**30,
                  step_seconds=min(medians), step_seconds_windows=medians,
                  first_steps_seconds=float(np.sum(step_times[: warmup + steps])),
                  train_peak_gib=train.peak_gib, train_growth_gib=train.growth_gib,
                  train_seconds_with_stage_b=train.seconds)
    if DEVICE == "cuda":  # the GPU's own peak: what the training steps allocated there
        record["train_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    _partial(record)
    with Measure() as gen:
        model.generate(n_samples=n_generate, seed=0, progress_bar=False)
    record.update(generate_cells=n_generate, generate_seconds=gen.seconds,
                  generate_peak_gib=gen.peak_gib, generate_growth_gib=gen.growth_gib)
    if DEVICE == "cuda":
        record["generate_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    _partial(record)
    # last, so that the full graph's edge list in torch does not weigh on the peaks above
    record.update(_minibatch_host_times(model, pyg=True))
    return record


def _partial(record: dict) -> None:
    """A worker's record so far, on stderr: kept in a log when a long run is cut short."""
    print("[partial] " + json.dumps(record), file=sys.stderr, flush=True)


def bench_scale(sizes: list[int], steps: int, n_generate: int, threads: int,
                backed: bool = False, windows: int = 5) -> list[dict]:
    records = []
    for n in sizes:
        print(f"[scale] {n:,} cells{' (backed)' if backed else ''} ...", flush=True)
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--scale-worker", str(n),
             "--steps", str(steps), "--windows", str(windows),
             "--generate-cells", str(n_generate), "--threads", str(threads), "--device", DEVICE,
             *(["--backed"] if backed else [])],
            capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            records.append({"n_cells": n, "backed": backed,
                            "error": done.stderr.strip().splitlines()[-1]})
            continue
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    return _relative_steps(records)


def _relative_steps(records: list[dict]) -> list[dict]:
    """Each size's step time relative to the smallest in-memory atlas measured."""
    base = next((r for r in records if "step_seconds" in r and not r.get("backed")), None)
    for r in records:
        if base is not None and "step_seconds" in r:
            r["step_time_vs_smallest"] = r["step_seconds"] / base["step_seconds"]
    return records


# --------------------------------------------------------------------------- report
def _fmt(value, digits=3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def report(results: dict) -> str:
    lines = ["Produced by `python benchmarks/speed.py` (`--parts` runs some parts and keeps "
             "the others' earlier results).", ""]

    def measured(part: str) -> list[str]:
        m = results["meta"].get("parts", {}).get(part, results["meta"])
        commits = {r["commit"] for r in results.get(part, []) if isinstance(r, dict)
                   and "commit" in r} if part == "scale" else set()
        commit = ", ".join(sorted(commits)) if len(commits) > 1 else m.get("commit", "?")
        return [f"Measured at commit {commit} on {m.get('processor', '?')} "
                f"({m.get('cpus', '?')} CPUs, {m.get('threads', '?')} torch threads, "
                f"{m.get('device', '?')}).", ""]
    if "generation" in results:
        g = results["generation"]
        d = 3 if g["lapddpm_seconds"] >= 0.5 else 4  # decimals: a GPU's times are small
        lines += ["### Generation", "", *measured("generation"),
                  f"{g['n_cells']:,} cells, {g['n_genes']:,} genes, sampler {g['sampler']} "
                  f"({g['n_steps']} steps); best of {len(g['lapddpm_all_seconds'])}.", "",
                  "| | seconds | cells/s |", "|---|---|---|",
                  f"| LapDDPM `generate()` | {_fmt(g['lapddpm_seconds'], d)} | "
                  f"{_fmt(g['lapddpm_cells_per_second'], 0)} |",
                  *[f"| – {PART_NAMES.get(part, part)} | {_fmt(seconds, d)} | |"
                    for part, seconds in g["parts_seconds"].items()],
                  *[f"| LapDDPM `generate(n_steps={k})` | {_fmt(seconds, d)} | "
                    f"{_fmt(g['n_cells'] / seconds, 0)} |"
                    for k, seconds in g.get("lapddpm_seconds_with_n_steps", {}).items()],
                  *([f"| LapDDPM `generate(batch_size={g['n_cells']})` (one batch) | "
                     f"{_fmt(g['lapddpm_seconds_one_batch'], d)} | "
                     f"{_fmt(g['n_cells'] / g['lapddpm_seconds_one_batch'], 0)} |"]
                    if "lapddpm_seconds_one_batch" in g else []),
                  *([f"| LapDDPM `generate()` under `torch.autocast("
                     f"\"{g.get('autocast_device', 'cpu')}\", "
                     f"dtype=torch.bfloat16)` | {_fmt(g['lapddpm_seconds_bf16_autocast'], d)} | "
                     f"{_fmt(g['n_cells'] / g['lapddpm_seconds_bf16_autocast'], 0)} |"]
                    if "lapddpm_seconds_bf16_autocast" in g else []),
                  *[f"| – {PART_NAMES.get(part, part)} | {_fmt(seconds, d)} | |"
                    for part, seconds in g.get("parts_seconds_bf16_autocast", {}).items()],
                  f"| scVI prior sampling | {_fmt(g['scvi_prior_seconds'], d)} | "
                  f"{_fmt(g['scvi_cells_per_second'], 0)} |", "",
                  f"Target ≤ {g['target_seconds']} s: {'met' if g['met'] else 'not met'}"
                  + ("" if "met_bf16_autocast" not in g else
                     f" in float32; {'met' if g['met_bf16_autocast'] else 'not met'} under "
                     "bf16 autocast") + ".", ""]
        if "draw_profile_seconds" in g:
            lines += [f"One batch of {g['n_cells']:,} cells part by part, each between two "
                      "device synchronisations (best of the repeats for each part):", "",
                      "| part | seconds |", "|---|---|",
                      *[f"| {part} | {_fmt(seconds, 4)} |"
                        for part, seconds in g["draw_profile_seconds"].items()], ""]
    if "training" in results:
        t = results["training"]
        lines += ["### Training (PBMC3K)", "", *measured("training"),
                  "| | s/step | s/epoch | default run, s (est.) |", "|---|---|---|---|",
                  f"| LapDDPM stage A | {_fmt(t['lapddpm_stage_a_step_seconds'], 4)} | "
                  f"{_fmt(t['lapddpm_stage_a_epoch_seconds'])} | "
                  f"{_fmt(t.get('lapddpm_default_seconds_estimate', float('nan')), 0)} |",
                  f"| LapDDPM stage B | {_fmt(t['lapddpm_stage_b_step_seconds'], 4)} | "
                  f"{_fmt(t['lapddpm_stage_b_epoch_seconds'])} | |",
                  f"| scVI | {_fmt(t['scvi_step_seconds'], 4)} | "
                  f"{_fmt(t['scvi_epoch_seconds'])} | "
                  f"{_fmt(t['scvi_default_seconds_estimate'], 0)} |", ""]
        if "lapddpm_stage_a_batch_seconds" in t:
            lines += [f"Building a stage-A minibatch on the host (128 seed cells, a subgraph "
                      f"of {t['lapddpm_stage_a_subgraph_nodes']:,} cells; included in the "
                      f"step above): {_fmt(t['lapddpm_stage_a_batch_seconds'] * 1e3, 1)} ms, "
                      f"of which the subgraph "
                      f"{_fmt(t['lapddpm_stage_a_subgraph_seconds'] * 1e3, 1)} ms (median of "
                      "30 batches). A stage-A step dispatches "
                      f"{t.get('lapddpm_stage_a_ops_per_step', float('nan')):,.0f} tensor "
                      "operations (forward, backward and optimiser; on a GPU each launches "
                      "at least one kernel from the host).", ""]
        if "lapddpm_default_seconds" in t:
            lines += ["Default training runs, measured end to end (`model.train()` with "
                      "its defaults):", "", "| | wall s |", "|---|---|",
                      f"| LapDDPM ({t['lapddpm_default_epochs'][0]} + "
                      f"{t['lapddpm_default_epochs'][1]} epochs) | "
                      f"{_fmt(t['lapddpm_default_seconds'], 1)} |",
                      f"| scVI ({t['scvi_default_epochs']} epochs) | "
                      f"{_fmt(t['scvi_default_seconds'], 1)} |", ""]
    if "scale" in results:
        lines += ["### Scale (synthetic atlas from PBMC3K, 2,000 genes)", "", *measured("scale"),
                  "| cells | counts | setup s | setup peak GiB | step s | step vs smallest | "
                  "step memory growth GiB | generate 100k s | generate peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["scale"]:
            storage = "backed" if r.get("backed") else "in memory"
            if "error" in r:
                lines.append(f"| {r['n_cells']:,} | {storage} | failed: {r['error']} "
                             "| | | | | | |")
                continue
            lines.append(
                f"| {r['n_cells']:,} | {storage} | {_fmt(r['setup_seconds'], 1)} | "
                f"{_fmt(r['setup_peak_gib'], 2)} | {_fmt(r['step_seconds'], 4)} | "
                f"{_fmt(r.get('step_time_vs_smallest', float('nan')), 2)} | "
                f"{_fmt(r.get('step_memory_growth_gib', float('nan')), 2)} | "
                f"{_fmt(r['generate_seconds'], 1)} | "
                f"{_fmt(r['generate_peak_gib'], 2)} |")
        lines.append("")
        sampled = [r for r in results["scale"] if "pyg_k_hop_subgraph_seconds" in r]
        if sampled:
            lines += ["Host time of one stage-A minibatch of 128 random seed cells (median of "
                      "30): the whole minibatch (included in the step above), its subgraph "
                      "alone, and torch_geometric's `k_hop_subgraph` finding the same "
                      "neighbourhood:", "",
                      "| cells | counts | subgraph cells | minibatch ms | subgraph ms | "
                      "`k_hop_subgraph` ms |", "|---|---|---|---|---|---|",
                      *[f"| {r['n_cells']:,} | {'backed' if r.get('backed') else 'in memory'} "
                        f"| {r['subgraph_nodes']:,} | {_fmt(r['batch_seconds'] * 1e3, 1)} | "
                        f"{_fmt(r['subgraph_seconds'] * 1e3, 1)} | "
                        f"{_fmt(r['pyg_k_hop_subgraph_seconds'] * 1e3, 1)} |"
                        for r in sampled], ""]
        on_gpu = [r for r in results["scale"] if "train_gpu_peak_gib" in r]
        if on_gpu:
            lines += ["GPU memory, peak allocated by torch:", "",
                      "| cells | counts | training GiB | generating GiB |", "|---|---|---|---|",
                      *[f"| {r['n_cells']:,} | {'backed' if r.get('backed') else 'in memory'} "
                        f"| {_fmt(r['train_gpu_peak_gib'], 2)} | "
                        f"{_fmt(r.get('generate_gpu_peak_gib', float('nan')), 2)} |"
                        for r in on_gpu], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--generate-cells", type=int, default=100_000,
                        help="cells generated in the scale part")
    parser.add_argument("--steps", type=int, default=100,
                        help="stage-A steps per timing window in the scale part")
    parser.add_argument("--windows", type=int, default=5,
                        help="scale part: timing windows; the step time is the smallest "
                             "window median")
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
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

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
    if "scale" in args.parts:
        results["scale"] = bench_scale(args.sizes, args.steps, args.generate_cells,
                                       args.threads or torch.get_num_threads(), args.backed,
                                       args.windows)
        for record in results["scale"]:  # sizes may later be re-measured one by one
            record["commit"] = results["meta"]["commit"]
    # each part keeps the conditions it was measured under; parts not run this time keep
    # their earlier results
    now = dict(results["meta"])
    results["meta"]["parts"] = {part: now for part in PARTS if part in results}
    # a GPU's results are kept apart from the CPU's
    name = "speed" if DEVICE == "cpu" else f"speed_{DEVICE}"
    path = os.path.join(args.output, f"{name}.json")
    if not args.quick and os.path.exists(path):
        with open(path) as handle:
            previous = json.load(handle)
        parts_meta = previous.get("meta", {}).get("parts", {})
        for part in PARTS:
            if part in previous and part not in results:
                results[part] = previous[part]
                results["meta"]["parts"][part] = parts_meta.get(part, previous.get("meta", {}))
        if "scale" in args.parts and previous.get("scale"):
            # atlas sizes (in memory or backed) not run this time keep their earlier records
            sizes = {(r["n_cells"], r.get("backed", False)) for r in results["scale"]}
            kept = [r for r in previous["scale"]
                    if (r["n_cells"], r.get("backed", False)) not in sizes]
            earlier = parts_meta.get("scale", previous.get("meta", {})).get("commit", "?")
            for record in kept:
                record.setdefault("commit", earlier)
            results["scale"] = _relative_steps(sorted(
                kept + results["scale"], key=lambda r: (r.get("backed", False), r["n_cells"])))
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
