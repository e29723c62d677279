"""scvi-tools' train runner, with checkpointing left to the user's callbacks, and Lightning's
console notices kept out of a default run."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import scvi
import torch
from lightning.pytorch.callbacks import Callback
from scvi.train import SaveCheckpoint, Trainer, TrainRunner

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's notices (accelerators found, tips, "fit stopped", the loader's step
    estimate) and its deprecation warnings silenced for the block, unless
    ``scvi.settings.verbosity`` is ``logging.DEBUG`` or lower; the loggers' levels and the
    warning filters are restored when it ends. A default ``train()`` shows its progress
    bar and nothing else; Lightning's warnings about the user's own arguments still show.
    """
    if scvi.settings.verbosity <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"lightning\.")
            # the per-epoch history logs on epochs; step logging's interval is moot
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class CpuDeterminism(Callback):
    """Deterministic torch algorithms while training on a CPU, restored afterwards.

    Some CPU kernels (scatter/index accumulation) pick a parallel, order-dependent
    algorithm for large inputs by default, so two runs with the same seed could end with
    slightly different weights, even on one thread. Their deterministic versions cost no
    measurable time on a CPU; on a GPU they can be much slower, so nothing changes there.
    """

    def __init__(self):
        self._previous: tuple[bool, bool] | None = None

    def on_fit_start(self, trainer, pl_module):
        if trainer.strategy.root_device.type == "cpu":
            self._previous = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())
            torch.use_deterministic_algorithms(True)

    def on_exception(self, trainer, pl_module, exception):
        self._restore()  # a failed run does not always reach teardown

    def teardown(self, trainer, pl_module, stage):
        self._restore()

    def _restore(self):
        if self._previous is not None:
            enabled, warn_only = self._previous
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            self._previous = None


class LapDDPMTrainer(Trainer):
    """scvi-tools' :class:`~scvi.train.Trainer` without its default checkpoint callback.

    When checkpointing is on and no :class:`~scvi.train.SaveCheckpoint` was passed,
    scvi-tools adds one that monitors ``validation_loss`` and writes into
    ``scvi.settings.logging_dir``. Stage B logs ``diffusion_loss_validation`` instead, so
    that callback would stop a run that has a validation split, and it would write files
    the user did not ask for. Checkpoints here are exactly the user's
    :class:`~lightning.pytorch.callbacks.ModelCheckpoint` callbacks.

    Lightning's distributed sampler is off: under DDP the data modules give each rank a
    disjoint share of every epoch through :class:`~scldiff.train.EpochBatchSampler`.
    On a CPU, training uses torch's deterministic algorithms (:class:`CpuDeterminism`).
    """

    def __init__(self, *args, callbacks=None, **kwargs):
        given = {id(callback) for callback in callbacks or []}
        # the data modules shard each epoch across ranks themselves (EpochBatchSampler),
        # so that every rank draws disjoint seed cells from the same seeded permutation
        kwargs.setdefault("use_distributed_sampler", False)
        callbacks = [*(callbacks or []), CpuDeterminism()]
        given.add(id(callbacks[-1]))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.callbacks = [c for c in self.callbacks
                          if id(c) in given or type(c) is not SaveCheckpoint]


class LapDDPMTrainRunner(TrainRunner):
    """:class:`~scvi.train.TrainRunner` that builds a :class:`LapDDPMTrainer`."""

    _trainer_cls = LapDDPMTrainer
