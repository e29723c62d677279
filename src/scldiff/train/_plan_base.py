"""What both training stages' plans share: the seed of each step, the check for NaN and
infinite losses and gradients, the checkpoint's stage, and freezing the other stage's
networks."""

from __future__ import annotations

import numpy as np
import torch
from scvi.train import TrainingPlan
from torch import nn

from ..module import LapDDPMModule

# the loss's name among the parameters' in the finiteness check (no parameter's name)
_LOSS = "\0loss"


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a loss or gradient became NaN or infinite.

    The model keeps the weights of the last step whose loss and gradients were finite.
    """


def step_seed(seed: int, stage: str, step: int, rank: int = 0) -> int:
    """The seed of one training step: a function of the run's seed and the step alone."""
    return int(np.random.SeedSequence([seed, ord(stage), step, rank]).generate_state(1)[0])


def non_finite_gradient(named_grads) -> str | None:
    """The name of the first ``(name, gradient)`` pair whose gradient holds a NaN or an
    infinity, else ``None``, with one host synchronisation.

    Each gradient's sum is finite only when every entry is (NaN propagates, an infinity too
    or meets its opposite in a NaN), so one reading pass over the gradients decides. A sum
    of finite entries can still overflow: only where a sum is not finite are the entries
    themselves tested.
    """
    named = [(name, grad) for name, grad in named_grads if grad.numel()]
    if not named:
        return None
    grads = [grad for _, grad in named]
    if bool(torch.stack([grad.sum() for grad in grads]).isfinite().all()):
        return None
    finite = torch.stack([torch.isfinite(grad).all() for grad in grads])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def fused_adam_kwargs(params) -> dict:
    """``fused=True`` where torch has a fused Adam kernel for all ``params`` (float32 on a
    CPU or a CUDA device): one pass over each tensor instead of about ten."""
    params = [p for p in params if p is not None]
    if params and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda")
                      for p in params):
        return {"fused": True}
    return {}


class LapDDPMTrainingPlan(TrainingPlan):
    """Base of the two stages' Lightning plans (:class:`~scldiff.train.GraphVAETrainingPlan`,
    :class:`~scldiff.train.DiffusionTrainingPlan`).

    Every random draw of a training step comes from torch's generator seeded by ``(seed,
    stage, step, rank)``, so a run resumed from a checkpoint continues exactly as an
    uninterrupted one would; checkpoints carry ``checkpoint["scldiff"] = {"stage",
    "seed"}``. A NaN or infinite loss or gradient raises :class:`NonFiniteLossError`
    naming the stage and the loss term before the optimiser step, so the weights stay those
    of the last finite step. Only the stage's own networks take gradients.

    Parameters
    ----------
    module
        The :class:`~scldiff.module.LapDDPMModule`.
    seed
        Seed of the run.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    stage: str = ""  # "A" or "B"
    stage_name: str = ""

    def __init__(self, module: LapDDPMModule, *, seed: int = 0, **kwargs):
        super().__init__(module, **kwargs)
        self.seed = int(seed)
        # the last training step's loss and its terms, checked with the gradients
        self._unchecked_loss: tuple[torch.Tensor, dict] | None = None

    def trained_networks(self) -> list[nn.Module]:
        """The networks this stage trains."""
        raise NotImplementedError

    def _step(self, batch: dict, mode: str) -> torch.Tensor:
        """The loss of a minibatch, logged; ``mode``: ``"train"`` or ``"validation"``."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "validation")

    # ------------------------------------------------------------- numerical faults
    def _fault(self, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{self.stage_name}: {what} at epoch {self.current_epoch}, step "
            f"{self.global_step}. Training stopped before the optimiser step, so the model "
            "keeps the weights of the last finite step. Check the input for extreme values, "
            "or lower the learning rate (plan_kwargs={'lr': ...})."
        )

    def _loss_fault(self, loss: torch.Tensor, terms: dict) -> NonFiniteLossError:
        """The error for a non-finite ``loss``, naming its non-finite ``terms``."""
        def finite(value) -> bool:  # scvi's LossOutput keeps its terms as dicts of tensors
            if isinstance(value, dict):
                return all(finite(v) for v in value.values())
            return not isinstance(value, torch.Tensor) or bool(torch.isfinite(value).all())

        bad = [name for name, value in terms.items() if not finite(value)]
        return self._fault(f"the {' and the '.join(bad) or 'loss'} became "
                           f"{'NaN' if bool(torch.isnan(loss).any()) else 'infinite'}")

    def on_before_optimizer_step(self, optimizer):
        """The step's loss and gradients checked together, in one host synchronisation: a
        NaN or an infinity stops training before the optimiser changes the weights."""
        unchecked, self._unchecked_loss = self._unchecked_loss, None
        named = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if unchecked is not None:  # first, so that a bad loss is named before its gradients
            named.insert(0, (_LOSS, unchecked[0].detach().reshape(-1)))
        name = non_finite_gradient(named)
        if name == _LOSS:
            raise self._loss_fault(*unchecked)
        if name is not None:
            raise self._fault(f"the gradient of {name} became NaN or infinite")

    # --------------------------------------------------------------- lightning hooks
    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed(step_seed(self.seed, self.stage, self.global_step, self.global_rank))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["scldiff"] = {"stage": self.stage, "seed": self.seed}

    def setup(self, stage: str) -> None:
        # Only this stage's networks take gradients: under DDP, whose reducer expects a
        # gradient for every parameter that requires one, the other stage's would stall it.
        # Called before Lightning wraps the plan; teardown() unfreezes everything. The flags
        # are set, not toggled, so a run that crashed before its teardown leaves nothing
        # frozen for the next one.
        trained = {id(p) for net in self.trained_networks() for p in net.parameters()}
        for p in self.module.parameters():
            p.requires_grad_(id(p) in trained)

    def teardown(self, stage: str) -> None:
        for p in self.module.parameters():
            p.requires_grad_(True)

    def on_fit_start(self):
        # Lightning keeps the modes it finds, and scvi-tools' runner leaves the module in
        # eval mode after each fit: without this a second train() would run without dropout
        self.train()
