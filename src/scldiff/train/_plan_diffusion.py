"""Stage B: the latent diffusion's training plan, on the frozen encoder's posteriors, with an
exponential moving average of the ScoreNet's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..module import LATENT_KEYS, LapDDPMModule
from ._plan_base import LapDDPMTrainingPlan, fused_adam_kwargs


class ExponentialMovingAverage(nn.Module):
    r"""Exponential moving average of a network's weights, with warm-up.

    After the :math:`n`-th update the decay is :math:`\min(d, (1 + n)/(10 + n))`, so the
    average forgets the initial weights quickly when training is short (a plain decay of
    0.999 would still hold 37% of the initialisation after 1,000 steps).
    """

    def __init__(self, network: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay}.")
        self.decay = decay
        self.shadow = copy.deepcopy(network).requires_grad_(False)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.n_updates += 1
        n = float(self.n_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        for average, current in zip(self.shadow.parameters(), network.parameters(),
                                    strict=True):
            average.lerp_(current.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> None:
        network.load_state_dict(self.shadow.state_dict())


class DiffusionTrainingPlan(LapDDPMTrainingPlan):
    """Stage B: the ScoreNet on the frozen encoder's posteriors (``diffusion_loss_train``),
    with per-cell label dropout ``p_uncond`` (classifier-free guidance), an exponential
    moving average of its weights (copied into the module when training ends) and a cosine
    learning-rate decay to a tenth of ``lr``.

    Parameters
    ----------
    module
        The :class:`~scldiff.module.LapDDPMModule`.
    lr
        Learning rate.
    weight_decay
        Weight decay (AdamW).
    p_uncond
        Probability of dropping a cell's label (unconditional models: 0).
    ema_decay
        Decay of the ScoreNet's weight average (0 disables it).
    seed
        Seed of the run (:class:`~scldiff.train.LapDDPMTrainingPlan`).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    stage = "B"
    stage_name = "Stage B (diffusion)"

    def __init__(
        self,
        module: LapDDPMModule,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        p_uncond: float = 0.1,
        ema_decay: float = 0.999,
        seed: int = 0,
        **kwargs,
    ):
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}.")
        super().__init__(module, seed=seed, lr=lr, weight_decay=weight_decay, **kwargs)
        self.p_uncond = p_uncond
        self.ema = ExponentialMovingAverage(module.score_net, ema_decay) if ema_decay > 0 \
            else None

    def trained_networks(self):
        return [self.module.score_net]

    def _step(self, batch, mode: str) -> torch.Tensor:
        loss = self.module.diffusion_loss(batch[LATENT_KEYS.QZ_MEAN],
                                          batch[LATENT_KEYS.QZ_LOGVAR],
                                          batch[LATENT_KEYS.ATTRIBUTES], self.p_uncond)
        if mode == "train":  # checked with the gradients (on_before_optimizer_step)
            self._unchecked_loss = (loss, {"diffusion loss": loss})
        self.log(f"diffusion_loss_{mode}", loss, on_step=False, on_epoch=True,
                 prog_bar=mode == "train", batch_size=batch[LATENT_KEYS.ATTRIBUTES].shape[0],
                 sync_dist=self.use_sync_dist)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update(self.module.score_net)

    def on_train_end(self):
        if self.ema is not None and self.ema.n_updates.item() > 0:
            self.ema.copy_to(self.module.score_net)

    def configure_optimizers(self):
        params = list(self.module.score_net.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                      **fused_adam_kwargs(params))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total,
                                                               eta_min=0.1 * self.lr)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
