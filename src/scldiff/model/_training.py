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
    fit_scorer,
    quiet_lightning,
)
from ._attributes import combination_index, combination_table
from ._constants import DEFAULT_GUIDANCE_SCALE, REGISTRY_KEYS, SCORER_MAX_CELLS
from ._library import LibrarySizeModel
from ._serialization import ModelFileError
from ._validation import resolve_seed

logger = logging.getLogger(__name__)

# Default lengths of the two stages in optimisation steps: twice 1,000 steps of stage A
# brought generated cells closer to held-out ones on both benchmark datasets (docs
# "Benchmarks").
STAGE_A_STEPS = 2_000
STAGE_B_STEPS = 4_000
# ... and at most this many epochs: below 2,000 cells the steps would take more epochs,
# and cost more than scVI's default training, which grows with the cells (400 epochs); the
# caps keep a default run below scVI's default at any size (docs "Benchmarks").
STAGE_A_MAX_EPOCHS = 128
STAGE_B_MAX_EPOCHS = 512


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


def _run_seed(ckpt_path: str | None) -> tuple[int, str | None, dict | None]:
    """The run's seed, the stage it resumes in and the checkpoint's module weights (``None``
    and ``None`` for a new run, whose seed is one draw from torch's global generator, which
    ``scvi.settings.seed`` sets)."""
    if ckpt_path is None:
        return resolve_seed(None), None, None
    meta, module_state = _read_checkpoint(ckpt_path)
    return meta["seed"], meta["stage"], module_state


def _check_epochs(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(
            value, (int, np.integer)) or value < 0):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def stage_epochs(max_epochs, max_epochs_vae, max_epochs_diffusion, n_cells: int,
                 batch_size: int, batch_size_diffusion: int) -> tuple[int, int]:
    r"""The two stages' epochs.

    By default those of ``STAGE_A_STEPS`` and ``STAGE_B_STEPS`` optimisation steps, at most
    ``STAGE_A_MAX_EPOCHS`` and ``STAGE_B_MAX_EPOCHS``, so that the steps scale with the cells
    below 2,000 of them.
    ``max_epochs`` is the whole budget, split in the defaults' proportion, at least one
    epoch each (:math:`n_A = \max(1, \mathrm{round}(E\, d_A / (d_A + d_B)))`, :math:`n_B =
    \max(1, E - n_A)`); a stage-specific argument sets its stage whatever ``max_epochs``
    says."""
    for name, value in (("max_epochs", max_epochs), ("max_epochs_vae", max_epochs_vae),
                        ("max_epochs_diffusion", max_epochs_diffusion)):
        _check_epochs(name, value)
    n_a = min(epochs_for_steps(STAGE_A_STEPS, n_cells, batch_size), STAGE_A_MAX_EPOCHS)
    n_b = min(epochs_for_steps(STAGE_B_STEPS, n_cells, batch_size_diffusion),
              STAGE_B_MAX_EPOCHS)
    if max_epochs is not None:
        share = max(1, round(max_epochs * n_a / (n_a + n_b)))
        n_a, n_b = share, max(1, max_epochs - share)
    n_a = n_a if max_epochs_vae is None else max_epochs_vae
    n_b = n_b if max_epochs_diffusion is None else max_epochs_diffusion
    if n_a + n_b == 0:
        raise ValueError("Both stages have 0 epochs; nothing to train.")
    return n_a, n_b


def _validation_kwargs(trainer_kwargs: dict, early_stopping: bool, n_val: int) -> dict:
    """The trainer's arguments with validation every epoch when there are validation
    cells, and ``early_stopping`` (refused without them)."""
    if early_stopping and not n_val:
        raise ValueError("early_stopping=True needs validation cells to watch; pass "
                         "train_size < 1 (e.g. train_size=0.9, as scvi-tools' default).")
    kwargs = dict(trainer_kwargs, early_stopping=early_stopping)
    if n_val:
        kwargs.setdefault("check_val_every_n_epoch", 1)
    return kwargs


class TrainingMixin:
    """:meth:`train` of :class:`~scldiff.LapDDPM`."""

    def train(
        self,
        max_epochs: int | None = None,
        max_epochs_vae: int | None = None,
        max_epochs_diffusion: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 1.0,
        validation_size: float | None = None,
        batch_size: int = 128,
        batch_size_diffusion: int = 256,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        diffusion_plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the graph VAE (stage A; subgraph minibatches, a step costs O(batch_size *
        n_neighbors) on any atlas), the latent diffusion on its posteriors (stage B), the
        post-guidance scorer and the library-size model; the losses go to :attr:`history`.

        Parameters
        ----------
        max_epochs
            Epochs of both stages, as scvi-tools takes it: split in the defaults' proportion
            (about one in five to stage A), at least one each. Default: about 2,000 steps
            of stage A and 4,000 of stage B, at most 128 and 512 epochs.
        max_epochs_vae, max_epochs_diffusion
            Epochs of stage A and of stage B, overriding their share of ``max_epochs``.
        accelerator, devices
            Lightning's.
        train_size, validation_size
            Fractions of the cells to train and to validate on (default: the rest).
        batch_size, batch_size_diffusion
            Seed cells per stage-A minibatch; cells per stage-B minibatch.
        early_stopping
            Stop each stage when its validation loss (``elbo_validation``,
            ``diffusion_loss_validation``) stops improving, as scvi-tools does
            (``early_stopping_patience``, ...). Needs ``train_size < 1``.
        plan_kwargs, diffusion_plan_kwargs
            Keyword arguments of :class:`~scldiff.train.GraphVAETrainingPlan` (``lr``,
            ``kl_weight``, ``perturbation``, ``epsilon``, ``mask_fraction``, ...;
            ``n_epochs_kl_warmup`` defaults to a quarter of stage A) and of
            :class:`~scldiff.train.DiffusionTrainingPlan` (``lr``, ``p_uncond``, ...).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (``enable_progress_bar=False``,
            ``callbacks=[ModelCheckpoint(...)]``, ...), and ``ckpt_path``: a checkpoint
            such a callback wrote during an earlier call with the same arguments, from
            which training resumes to end as the uninterrupted run would have.

        Notes
        -----
        A run's seed is one draw from torch's global generator (``scvi.settings.seed``);
        the split, the batches and every step's draws derive from it, so a seed gives the
        same weights on a CPU (on GPUs to floating-point tolerance). A non-finite loss or
        gradient raises :class:`~scldiff.train.NonFiniteLossError`, keeping the last
        finite step's weights.
        """
        resume, seed, resume_stage, module_state = self._run_start(trainer_kwargs)
        train_idx, val_idx = self._split(train_size, validation_size, seed)
        n_a, n_b = stage_epochs(max_epochs, max_epochs_vae, max_epochs_diffusion,
                                train_idx.size, batch_size, batch_size_diffusion)
        trainer_kwargs = _validation_kwargs(trainer_kwargs, early_stopping, len(val_idx))
        plan_a, plan_b = self._plans(n_a, seed, plan_kwargs, diffusion_plan_kwargs)  # refuse early
        collator = self._collator()
        if resume_stage == "B":  # stage A had finished: its weights are in the checkpoint
            self._load_checkpoint_weights(resume, module_state)
            n_a = 0
        fit = {"accelerator": accelerator, "devices": devices, "trainer_kwargs": trainer_kwargs}
        bar = bool(trainer_kwargs.get("enable_progress_bar", True))
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            if n_a > 0:
                data_a = SubgraphDataModule(collator, train_idx, val_idx, batch_size, seed=seed)
                self._fit(plan_a, data_a, n_a, resume if resume_stage == "A" else None, **fit)
            posterior = self._posterior(collator, train_idx, progress_bar=bar)
            if self.module.accessibility is not None:
                self._fit_accessibility(collator, posterior, train_idx, val_idx, seed)
            if n_b > 0:
                data_b = self._latent_data(collator, posterior, train_idx, val_idx,
                                           batch_size_diffusion, seed, bar)
                self._fit(plan_b, data_b, n_b, resume if resume_stage == "B" else None, **fit)
                self._fit_scorer(posterior, collator.attributes[train_idx], seed)
        self._finish(collator, train_idx, val_idx, posterior)

    def _fit_scorer(self, posterior: tuple[torch.Tensor, torch.Tensor], rows: np.ndarray,
                    seed: int) -> None:
        """The post-guidance scorer (:func:`~scldiff.train.fit_scorer`) on at most
        ``SCORER_MAX_CELLS`` training cells: each cell's posterior draw against a latent
        generated for its attributes with the default guidance; its held-out accuracy goes
        to :attr:`history` as ``scorer_accuracy_validation``."""
        generator = torch.Generator().manual_seed(seed)
        n = rows.shape[0]
        pick = torch.randperm(n, generator=generator)[:SCORER_MAX_CELLS]
        mean, logvar = posterior[0][pick], posterior[1][pick]
        real = mean + torch.randn(mean.shape, generator=generator) * (0.5 * logvar).exp()
        attributes = torch.from_numpy(np.asarray(rows))[pick]
        self.module.eval()
        sampling = torch.Generator(device=self.device).manual_seed(seed)
        fake = self.module.sample_latents(attributes, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                                          generator=sampling).cpu()
        scorer = self.module.scorer.cpu()
        standardize = lambda z: (z - self.module.latent_mean.cpu()) / \
            self.module.latent_std.cpu()
        accuracy = fit_scorer(scorer, standardize(real), standardize(fake), attributes,
                              generator=generator)
        self.module.scorer.to(self.device)
        history = dict(self.history_ or {})
        history["scorer_accuracy_validation"] = pd.DataFrame(
            {"scorer_accuracy_validation": [accuracy]})
        self.history_ = history
        logger.info("Post-guidance scorer: held-out accuracy %.3f.", accuracy)

    def _plans(self, n_a: int, seed: int, plan_kwargs: dict | None,
               diffusion_plan_kwargs: dict | None
               ) -> tuple[GraphVAETrainingPlan, DiffusionTrainingPlan]:
        """The two stages' plans, with the defaults that depend on the run."""
        plan_a = GraphVAETrainingPlan(self.module, **{
            "n_epochs_kl_warmup": max(n_a // 4, 1), **(plan_kwargs or {}), "seed": seed})
        plan_b = DiffusionTrainingPlan(self.module, **{
            "p_uncond": 0.1 if self.module.score_net.n_columns else 0.0,
            **(diffusion_plan_kwargs or {}),
            "seed": seed})
        return plan_a, plan_b

    def _latent_data(self, collator, posterior: tuple[torch.Tensor, torch.Tensor],
                     train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int, seed: int,
                     progress_bar: bool) -> LatentDataModule:
        """Stage B's data: the training cells' posteriors (whose statistics standardise the
        latents) and those of the validation cells, with their attribute rows (and, on a
        spatial graph, their positions: the LPE times ``lpe_scale``; with paired ATAC, their
        chromatin: the standardised LSI embedding)."""
        self.module.set_latent_statistics(*posterior)
        val = self._posterior(collator, val_idx, progress_bar=progress_bar) \
            if len(val_idx) else None
        rows = collator.attributes
        if self.module.n_position:
            rows = np.concatenate([rows, self._positions(collator.lpe)], axis=1)
        if self.module.n_chromatin:
            manager = self.get_anndata_manager(self.adata, required=True)
            rows = np.concatenate(
                [rows, self._chromatin(manager.get_from_registry(REGISTRY_KEYS.LSI_KEY))], 1)
        return LatentDataModule.of_cells(posterior, val, rows, train_idx, val_idx,
                                         batch_size, seed)

    def _positions(self, lpe: np.ndarray) -> np.ndarray:
        """Spots' positions as the diffusion reads them: their LPE times ``lpe_scale``
        (entries of order 1)."""
        return (np.asarray(lpe, dtype=np.float32)
                * float(self.module.lpe_scale)).astype(np.float32)

    def _run_start(self, trainer_kwargs: dict) -> tuple[str | None, int, str | None,
                                                        dict | None]:
        """The checkpoint to resume from (popped from ``trainer_kwargs``) and
        :func:`_run_seed`'s seed, stage and weights; refused, before any draw, for a model
        without data."""
        if self.adata is None:
            raise ValueError("This model was loaded without an AnnData; pass adata to "
                             "LapDDPM.load(dir_path, adata) to train it.")
        resume = trainer_kwargs.pop("ckpt_path", None)
        return (resume, *_run_seed(resume))  # resumed: the same seed, so the same split

    def _load_checkpoint_weights(self, path: str, module_state: dict) -> None:
        missing = set(self.module.state_dict()) - set(module_state)
        if missing:
            raise ValueError(f"The checkpoint {path} does not fit this model (missing "
                             f"{sorted(missing)[:5]}); resume with the same model.")
        self.module.load_state_dict(module_state)

    def _finish(self, collator, train_idx: np.ndarray, val_idx: np.ndarray,
                posterior: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The training cells' combinations of categorical attributes, the library-size model
        (one group per combination and one, without cells, for combinations unseen in
        training), and the split, of a finished run."""
        rows = collator.attributes[train_idx]
        n_cat = self.module.n_categorical
        self.combinations_ = combination_table(rows, n_cat)
        groups = combination_index(rows[:, :n_cat], self.combinations_)
        self.library_model_ = LibrarySizeModel.fit(
            collator.library[train_idx], groups, len(self.combinations_["codes"]) + 1,
            posterior[0].numpy(), posterior[1].exp().numpy(), codes=rows[:, :n_cat],
            n_categories=self.module.score_net.n_categories)
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

    def _fit(self, plan, datamodule, max_epochs: int, ckpt_path: str | None, accelerator,
             devices, trainer_kwargs: dict) -> None:
        """One stage through scvi-tools' runner, its history appended to the model's. (Its
        steps seed torch's global generator: :meth:`train` restores that afterwards.)"""
        logger.info("%s, %d epochs.", plan.stage_name, max_epochs)
        previous = dict(self.history_ or {})  # the runner appends to the dict in place
        trainer_kwargs = dict(trainer_kwargs)
        if trainer_kwargs.get("early_stopping"):  # each stage watches its own loss
            trainer_kwargs["early_stopping_monitor"] = (
                "elbo_validation" if plan.stage == "A" else "diffusion_loss_validation")
        if trainer_kwargs.get("enable_progress_bar", True) and trainer_kwargs.get(
                "simple_progress_bar", True):
            trainer_kwargs["simple_progress_bar"] = False
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []),
                                           StageProgressBar(plan.stage_name)]
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path
        if any(isinstance(c, ModelCheckpoint) for c in trainer_kwargs.get("callbacks", [])):
            trainer_kwargs.setdefault("enable_checkpointing", True)  # scvi's default is off
        try:
            with quiet_lightning():
                runner = LapDDPMTrainRunner(self, training_plan=plan, data_splitter=datamodule,
                                            max_epochs=max_epochs, accelerator=accelerator,
                                            devices=devices, **trainer_kwargs)
                runner()
        except BaseException:
            self.is_trained_ = False  # an unfinished run: generate() refuses until trained
            self.module.eval()
            raise
        if runner.trainer.is_global_zero:  # under DDP only rank 0's logger has a history
            self.history_ = _merge_history(previous, _safe_load_logger_history(runner.trainer))
        else:
            self.history_ = previous
