"""Worker of ``test_distributed``: train on 2 CPU processes (DDP, gloo) and record.

Run as a script; Lightning's launcher starts the second rank by running it again. Each rank
writes the seed cells of its first stage-A and stage-B epoch and its final weights to the
output directory; rank 0 also generates cells.
"""

from __future__ import annotations

import json
import os
import sys

import scvi
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import small_pbmc  # noqa: E402

from scldiff import LapDDPM  # noqa: E402


class RecordBatches(Callback):
    """The seed cells each rank draws in its first epoch of each stage."""

    def __init__(self):
        self.batches = {}

    def on_train_epoch_start(self, trainer, plan):
        if trainer.current_epoch == 0:
            loader = trainer.train_dataloader  # stage B batches through its sampler
            batches = loader.batch_sampler or loader.sampler
            self.batches[plan.stage] = [list(map(int, b)) for b in batches]


def main(out: str) -> None:
    scvi.settings.seed = 0
    adata = small_pbmc(400, 120)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=4)
    model = LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
    record = RecordBatches()
    model.train(max_epochs_vae=2, max_epochs_diffusion=2, batch_size=32, batch_size_diffusion=32,
                accelerator="cpu", devices=2, strategy="ddp", callbacks=[record],
                enable_progress_bar=False, enable_model_summary=False)
    rank = model.trainer.global_rank
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": model.trainer.world_size, "n_train": len(model.train_indices_),
                   "batches": record.batches}, handle)
    torch.save(model.module.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    if rank == 0:
        generated = model.generate(labels={"B cells": 10}, seed=0, progress_bar=False)
        generated.write_h5ad(os.path.join(out, "generated.h5ad"))


if __name__ == "__main__":
    main(sys.argv[1])
