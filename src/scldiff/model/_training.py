"""``LapDDPM.train()``: the graph VAE (stage A), then the latent diffusion (stage B), then the
library-size model, with Lightning through scvi-tools' runner."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scvi.train._trainrunner import _safe_load_logger_history

from ..train import (
    DiffusionTrainingPlan,
    GraphVAETrainingPlan,
    LapDDPMTrainRunner,
    LatentDataModule,
    StageProgressBar,
    SubgraphDataModule,
)
from ._library import LibrarySizeModel
from ._serialization import ModelFileError

logger = logging.getLogger(__name__)

# Default lengths of the two stages in optimisation steps: twice 1,000 steps of stage A
# brought generated cells closer to held-out ones on both benchmark datasets (docs
# "Benchmarks").
STAGE_A_STEPS = 2_000
STAGE_B_STEPS = 4_000


def epochs_for_steps(steps: int, n_cells: int, batch_size: int) -> int:
    """Epochs giving about ``steps`` minibatches (at least one epoch)."""
    per_epoch = max(1, math.ceil(n_cells / batch_size))
    return max(1, round(steps / per_epoch))


def _read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``scldiff`` entry and module weights of a Lightning checkpoint, without pickle:
    ``torch.load(weights_only=True)`` rebuilds tensors and plain containers only, so a
    checkpoint carrying code is refused rather than run."""
    if not os.path.isfile(path):
        raise ValueError(f"ckpt_path {path!r} is not a file; pass a checkpoint written by "
                         "a ModelCheckpoint callback during train().")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: refuse
        raise ModelFileError(
            f"{path} cannot be read as a plain checkpoint ({type(err).__name__}: {err}); "
            "checkpoints that need code to load are refused.") from err
    meta = checkpoint.get("scldiff") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or meta.get("stage") not in ("A", "B") or not isinstance(
            meta.get("seed"), int):
        raise ModelFileError(f"{path} is not a checkpoint of LapDDPM.train().")
    prefix = "module."
    return meta, {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items()
                  if k.startswith(prefix)}


def _merge_history(old: dict | None, new: dict | None) -> dict:
    """Append a training run's per-epoch history to the model's, continuing the epochs."""
    old, new = dict(old or {}), dict(new or {})
    offset = max((int(frame.index.max()) + 1 for frame in old.values() if len(frame)),
                 default=0)
    for key, frame in new.items():
        frame = frame.copy()
        frame.index = np.arange(offset, offset + len(frame))
        frame.index.name = "epoch"
        old[key] = pd.concat([old[key], frame]) if key in old else frame
    return old


def _check_epochs(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


class TrainingMixin:
    """:meth:`train` of :class:`~scldiff.LapDDPM`."""

    def train(
        self,
        max_epochs: int | None = None,
        max_epochs_diffusion: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 1.0,
        validation_size: float | None = None,
        batch_size: int = 128,
        batch_size_diffusion: int = 256,
        plan_kwargs: dict | None = None,
        diffusion_plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train in two stages: the graph VAE (A), then the latent diffusion (B).

        Stage A minibatches are subgraphs (seed cells and their graph neighbourhood), so a
        step costs O(batch_size * n_neighbors) whatever the number of cells. Stage B trains
        the ScoreNet on the frozen encoder's posteriors. Then the library-size model is fit
        to the training cells. Both stages' losses are appended to :attr:`history`
        (``elbo_train``, ``reconstruction_loss_train``, ``kl_local_train``,
        ``perturbation_relative_change_train``, then ``diffusion_loss_train``).

        Parameters
        ----------
        max_epochs
            Epochs of stage A; by default about 2,000 optimisation steps (at least one
            epoch).
        max_epochs_diffusion
            Epochs of stage B; by default about 4,000 steps (at least one epoch).
        accelerator, devices
            Lightning's accelerator and devices.
        train_size
            Fraction of cells used for training.
        validation_size
            Fraction used for validation (default: the rest).
        batch_size
            Seed cells per stage-A minibatch.
        batch_size_diffusion
            Cells per stage-B minibatch.
        plan_kwargs
            Keyword arguments of stage A's :class:`~scldiff.train.GraphVAETrainingPlan`
            (``lr``, ``kl_weight``, ``perturbation``, ``epsilon``, ``mask_fraction``, ...);
            ``n_epochs_kl_warmup`` defaults to a quarter of stage A.
        diffusion_plan_kwargs
            Keyword arguments of stage B's :class:`~scldiff.train.DiffusionTrainingPlan`
            (``lr``, ``p_uncond``, ``ema_decay``, ...).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar=False``,
            ``callbacks=[ModelCheckpoint(dirpath=..., save_last=True)]``), and
            ``ckpt_path``: a checkpoint written by such a callback during an earlier call
            with the same arguments; training resumes from it (in stage A or B, whichever
            it was written in) and ends as the uninterrupted run would have.

        Notes
        -----
        A run draws one seed from torch's global generator (set by ``scvi.settings.seed``);
        the split, the batch order of each epoch and every random draw of each step derive
        from it, so the same seed gives the same weights on a CPU (on GPUs, to
        floating-point tolerance: some scatter-adds are non-deterministic there). The
        global generator's state is restored when training returns. A NaN or infinite
        loss or gradient stops training with :class:`~scldiff.train.NonFiniteLossError`,
        naming the stage and the loss term; the model keeps the weights of the last finite
        step.
        """
        if self.adata is None:
            raise ValueError("This model was loaded without an AnnData; pass adata to "
                             "LapDDPM.load(dir_path, adata) to train it.")
        resume = trainer_kwargs.pop("ckpt_path", None)
        if resume is not None:
            meta, module_state = _read_checkpoint(resume)
            seed, resume_stage = meta["seed"], meta["stage"]
        else:  # one draw from the global generator (scvi.settings.seed) seeds the run
            seed, resume_stage = int(torch.randint(0, 2**31 - 1, ()).item()), None
        # the split derives from the run's seed, so a resumed run trains on the same cells
        train_idx, val_idx = self._split(train_size, validation_size, seed)
        n_a = epochs_for_steps(STAGE_A_STEPS, train_idx.size, batch_size) \
            if max_epochs is None else max_epochs
        n_b = epochs_for_steps(STAGE_B_STEPS, train_idx.size, batch_size_diffusion) \
            if max_epochs_diffusion is None else max_epochs_diffusion
        _check_epochs("max_epochs", n_a)
        _check_epochs("max_epochs_diffusion", n_b)
        if n_a + n_b == 0:
            raise ValueError("Both stages have 0 epochs; nothing to train.")
        if len(val_idx):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        # both plans first, so that bad arguments are refused before anything changes
        plan_a = GraphVAETrainingPlan(self.module, **{
            "n_epochs_kl_warmup": max(n_a // 4, 1), **(plan_kwargs or {}), "seed": seed})
        plan_b = DiffusionTrainingPlan(self.module, **{
            "p_uncond": 0.1 if self.is_conditional else 0.0, **(diffusion_plan_kwargs or {}),
            "seed": seed})
        collator = self._collator()
        if resume_stage == "B":  # stage A had finished: its weights are in the checkpoint
            missing = set(self.module.state_dict()) - set(module_state)
            if missing:
                raise ValueError(f"The checkpoint {resume} does not fit this model (missing "
                                 f"{sorted(missing)[:5]}); resume with the same model.")
            self.module.load_state_dict(module_state)
            n_a = 0
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            if n_a > 0:
                logger.info("Stage A: graph VAE, %d epochs.", n_a)
                data_a = SubgraphDataModule(collator, train_idx, val_idx, batch_size, seed=seed)
                self._fit(plan_a, data_a, n_a, accelerator, devices, trainer_kwargs,
                          resume if resume_stage == "A" else None)
            bar = bool(trainer_kwargs.get("enable_progress_bar", True))
            posterior = self._posterior(collator, train_idx, progress_bar=bar)
            if n_b > 0:
                logger.info("Stage B: latent diffusion, %d epochs.", n_b)
                self.module.set_latent_statistics(*posterior)
                labels = torch.from_numpy(collator.labels)
                val = None
                if len(val_idx):
                    val = (*self._posterior(collator, val_idx, progress_bar=bar),
                           labels[val_idx])
                data_b = LatentDataModule((*posterior, labels[train_idx]), val,
                                          batch_size_diffusion, seed=seed)
                self._fit(plan_b, data_b, n_b, accelerator, devices, trainer_kwargs,
                          resume if resume_stage == "B" else None)
        codes = collator.labels[train_idx]
        self.library_model_ = LibrarySizeModel.fit(
            collator.library[train_idx], codes, len(self.label_categories),
            posterior[0].numpy(), posterior[1].exp().numpy())
        counts = np.bincount(codes, minlength=len(self.label_categories))
        self.label_proportions_ = (counts / counts.sum()).tolist()
        self.train_indices_, self.validation_indices_ = train_idx, val_idx
        self.test_indices_ = np.zeros(0, dtype=np.int64)
        self.is_trained_ = True
        self.module.eval()

    def _split(self, train_size: float, validation_size: float | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
        n = self.adata.n_obs
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must lie in (0, 1], got {train_size}.")
        n_train = round(train_size * n)
        n_val = n - n_train if validation_size is None else round(validation_size * n)
        if n_train < 1 or n_train + n_val > n:
            raise ValueError(f"train_size={train_size}, validation_size={validation_size} do "
                             f"not split {n} cells.")
        permutation = np.random.default_rng(seed).permutation(n)
        return np.sort(permutation[:n_train]), np.sort(permutation[n_train:n_train + n_val])

    def _fit(self, plan, datamodule, max_epochs: int, accelerator, devices,
             trainer_kwargs: dict, ckpt_path: str | None = None) -> None:
        """One stage through scvi-tools' runner, its history appended to the model's."""
        previous = dict(self.history_ or {})  # the runner appends to the dict in place
        trainer_kwargs = dict(trainer_kwargs)
        if trainer_kwargs.get("enable_progress_bar", True) and trainer_kwargs.get(
                "simple_progress_bar", True):
            trainer_kwargs["simple_progress_bar"] = False
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []),
                                           StageProgressBar(plan.stage_name)]
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path
        if any(isinstance(c, ModelCheckpoint) for c in trainer_kwargs.get("callbacks", [])):
            trainer_kwargs.setdefault("enable_checkpointing", True)  # scvi's default is off
        runner = LapDDPMTrainRunner(self, training_plan=plan, data_splitter=datamodule,
                                    max_epochs=max_epochs, accelerator=accelerator,
                                    devices=devices, **trainer_kwargs)
        try:
            runner()
        except BaseException:
            self.is_trained_ = False  # an unfinished run: generate() refuses until trained
            self.module.eval()
            raise
        if runner.trainer.is_global_zero:  # under DDP only rank 0's logger has a history
            self.history_ = _merge_history(previous, _safe_load_logger_history(runner.trainer))
        else:
            self.history_ = previous
