"""scvi-tools' train runner, with checkpointing left to the user's callbacks."""

from __future__ import annotations

from scvi.train import SaveCheckpoint, Trainer, TrainRunner


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
    """

    def __init__(self, *args, callbacks=None, **kwargs):
        given = {id(callback) for callback in callbacks or []}
        # the data modules shard each epoch across ranks themselves (EpochBatchSampler),
        # so that every rank draws disjoint seed cells from the same seeded permutation
        kwargs.setdefault("use_distributed_sampler", False)
        super().__init__(*args, callbacks=list(callbacks or []), **kwargs)
        self.callbacks = [c for c in self.callbacks
                          if id(c) in given or type(c) is not SaveCheckpoint]


class LapDDPMTrainRunner(TrainRunner):
    """:class:`~scvi.train.TrainRunner` that builds a :class:`LapDDPMTrainer`."""

    _trainer_cls = LapDDPMTrainer
