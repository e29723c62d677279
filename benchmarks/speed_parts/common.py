"""What the speed parts share: the device, a timer of wall time and peak memory, the
provenance of a measurement, a per-step timer, a briefly trained PBMC3K model."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import threading
import time

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

import scldiff

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(HERE, "results")
LABELS = "cell_type"
DEVICE = {"name": "cpu"}  # where models train and generate; set by speed.py from --device


def device() -> str:
    return DEVICE["name"]


def accelerator() -> str:
    return "gpu" if device() == "cuda" else device()


def sync() -> None:
    """Wait for the device, so that a host clock read after it counts its work."""
    if device() == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
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
        self.start_rss = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
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
    """Versions, commit, threads, processor and device of a measurement."""
    import scvi

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"scldiff": scldiff.__version__, "commit": commit, "scvi-tools": scvi.__version__,
            "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "machine": platform.platform(), "processor": processor(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if device() == "cuda" else "cpu",
            **({"cuda": torch.version.cuda,
                "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
               if device() == "cuda" else {})}


class StepTimer(Callback):
    """Lightning callback: the wall time of each training step, from the end of the
    previous one (so reading and building the minibatch count, not only the optimisation
    step), and the resident memory after it; stops the stage after ``limit`` steps."""

    def __init__(self, limit: int | None = None):
        self.limit, self.times, self.rss, self._t = limit, {}, {}, None

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        stage = getattr(module, "stage", "scvi")
        sync()
        now = time.perf_counter()
        self.times.setdefault(stage, []).append(now - self._t)
        self._t = now
        self.rss.setdefault(stage, []).append(rss_bytes())
        if self.limit is not None and len(self.times[stage]) >= self.limit:
            trainer.should_stop = True


def median_step(times: list[float], warmup: int) -> float:
    return float(np.median(times[warmup:] if len(times) > warmup else times))


def pbmc3k():
    """PBMC3K's raw counts, the genes with counts."""
    import scanpy as sc

    adata = scldiff.datasets.pbmc3k()
    sc.pp.filter_genes(adata, min_counts=1)
    return adata


def train_pbmc3k(epochs: int, epochs_diffusion: int) -> scldiff.LapDDPM:
    """A PBMC3K model of the default architecture, briefly trained: generation's cost does
    not depend on how well it is trained."""
    import scvi

    scvi.settings.seed = 0
    adata = pbmc3k()
    scldiff.LapDDPM.setup_anndata(adata, labels_key=LABELS)
    model = scldiff.LapDDPM(adata)
    model.train(max_epochs_vae=epochs, max_epochs_diffusion=epochs_diffusion,
                enable_progress_bar=False, accelerator=accelerator())
    return model
