"""Training plan: stage A (graph VAE with spectral adversarial edges), stage B (diffusion)."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from scvi.train import TrainingPlan
from torch import nn

from .._constants import BATCH_KEYS, LATENT_KEYS
from ..graph import (
    perturb_edge_weights,
    principal_eigenvector,
    random_direction,
    spectral_direction,
)
from ..module import LapDDPMModule

Perturbation = Literal["spectral", "random", "none"]


def _fused_kwargs(params) -> dict:
    """``fused=True`` where torch has a fused Adam kernel for all ``params`` (float32 on CPU
    from torch 2.4, on CUDA): one pass over each tensor instead of about ten. On PBMC3K this
    cut the diffusion stage's step time on one CPU thread by a fifth (40 to 32 ms)."""
    params = [p for p in params if p is not None]
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 4) or not params:
        return {}
    if all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {}


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
PERTURBATIONS: tuple[str, ...] = ("spectral", "random", "none")
STAGE_NAMES = {"A": "Stage A (graph VAE)", "B": "Stage B (diffusion)"}
# stage A's forward passes: the loss reads the decoder's logits, not the count
# distribution (``px``) or the dense proportions (LapDDPMModule.generative)
_LOSS_ONLY = {"distribution": False}
# the loss's name among the parameters' in the finiteness check (no parameter's name)
_LOSS = "\0loss"


def non_finite_gradient(named_grads, fused: bool | None = None) -> str | None:
    """The name of the first ``(name, gradient)`` pair whose gradient holds a NaN or an
    infinity, else ``None``, with one host synchronisation.

    ``fused`` (default: off the CPU, as torch's own ``foreach`` defaults): one reduction
    over all gradients, ``torch._foreach_norm`` with ``ord=inf``, a few kernels on a GPU
    instead of two per parameter. The largest absolute entry of a gradient is finite
    exactly when all its entries are: NaN propagates through the maximum, and no square is
    taken that could overflow.

    Otherwise each gradient's sum, one reading pass: a sum is finite only when every
    entry is (NaN propagates, an infinity too or meets its opposite in a NaN). A sum of
    finite entries can still overflow, so only where a sum is not finite are the entries
    themselves tested, ``isfinite(...).all()``. For stage A's gradients on PBMC3K (2
    cores) the sums take 0.7 ms, ``isfinite(...).all()`` per parameter 10.8 ms and the
    maximum norm 8.8 ms.
    """
    named = [(name, grad) for name, grad in named_grads if grad.numel()]
    if not named:
        return None
    grads = [grad for _, grad in named]
    if fused is None:
        fused = grads[0].device.type != "cpu"
    if fused:
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
    else:
        if bool(torch.stack([grad.sum() for grad in grads]).isfinite().all()):
            return None
        finite = torch.stack([torch.isfinite(grad).all() for grad in grads])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a loss or gradient became NaN or infinite.

    The model keeps the weights of the last step whose loss and gradients were finite.
    """


def keep_mask(n: int, fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n,)`` float 0/1 values, each 0 with probability ``fraction``, independently,
    from torch's global generator.

    On a CPU each value takes 16 random bits, four from one 64-bit integer, and is 0 when
    they fall below ``round(fraction * 2**16)``: ``fraction`` resolved to 1/65,536. For
    the 1.6 million inputs of a PBMC3K minibatch that takes 2.5 ms on 2 cores against 5.3
    ms for ``torch.rand(n) >= fraction``: torch's CPU generator (Mersenne Twister) makes
    32 bits at a time, one draw per uniform. On other devices, ``torch.rand``.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return (torch.rand(n, device=device) >= fraction).float()
    # uniform 64-bit integers (from -2**63 to 2**63 - 1, which random_ leaves out), seen as
    # four signed 16-bit integers each
    bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    threshold = round(fraction * 2**16) - 2**15
    return (bits.view(torch.int16)[:n] >= threshold).float()


def step_seed(seed: int, stage: str, step: int, rank: int = 0) -> int:
    """The seed of one training step: a function of the run's seed and the step alone."""
    return int(np.random.SeedSequence([seed, ord(stage), step, rank]).generate_state(1)[0])


class LapDDPMTrainingPlan(TrainingPlan):
    r"""Lightning plan for one stage of LapDDPM training.

    **Stage A** trains encoder and decoder on ``rec_weight * NLL + kl_weight * KL`` with

    - input gene masking: each stored count of the encoder's input is zeroed with
      probability ``mask_fraction`` (the likelihood still sees every count);
    - spectral adversarial perturbation of each batch subgraph's edge weights (paper 001,
      Eq. 1-2): ``power_iterations`` give the principal eigenvector :math:`v_1`; the
      weights move by :math:`\pm\epsilon\lVert W\rVert\, v_1 v_1^\top / \lVert v_1
      v_1^\top\rVert` on the existing edges, signed by one extra gradient so that the loss
      increases, and the encoder is trained on the perturbed graph. The relative change
      actually applied is logged as ``perturbation_relative_change_train``.

    **Stage B** trains the ScoreNet on the frozen encoder's posterior
    (``diffusion_loss_train``), with per-cell label dropout ``p_uncond``, an exponential
    moving average of its weights (copied into the module when training ends) and a cosine
    learning-rate decay.

    Parameters
    ----------
    module
        The :class:`~scldiff.module.LapDDPMModule`.
    stage
        ``"A"`` or ``"B"``.
    lr
        Learning rate.
    eps
        Adam's epsilon. scvi-tools uses 0.01; with it the large sparse input projection
        learns so slowly that stage A needs several times more epochs (measured on PBMC3K).
    weight_decay
        Weight decay.
    kl_weight
        Weight of the KL term after warm-up (stage A).
    n_epochs_kl_warmup
        Epochs over which the KL weight rises linearly from 0 (stage A).
    rec_weight
        Weight of the reconstruction term (stage A).
    perturbation
        ``"spectral"``, ``"random"`` (a random symmetric direction, for ablations) or
        ``"none"``.
    epsilon
        Perturbation radius relative to the subgraph's weight norm.
    power_iterations
        Power-iteration steps for :math:`v_1`.
    mask_fraction
        Input gene masking fraction.
    p_uncond
        Label dropout probability in stage B.
    ema_decay
        Decay of the ScoreNet's weight average in stage B (0 disables it).
    dispersion_lr_factor
        Learning rate of the decoder's gene dispersions relative to ``lr`` (stage A). The
        dispersions start at 1 and their maximum-likelihood values are several times
        larger; at the network's learning rate they stay near the start within the default
        step budget and the generated counts come out overdispersed (``benchmarks/``).
    seed
        Seed of the run. Every random draw of a training step (input masks, perturbation
        directions, dropout, posterior and diffusion noise, label dropout) comes from a
        generator seeded by ``(seed, stage, step, rank)``, so a run resumed from a
        checkpoint continues exactly as an uninterrupted one would.

    Notes
    -----
    A NaN or infinite loss, or gradient, raises :class:`NonFiniteLossError` naming the
    stage and the loss term before the optimiser step, so the weights stay those of the
    last finite step. Checkpoints carry ``checkpoint["scldiff"] = {"stage", "seed"}``.
    """

    def __init__(
        self,
        module: LapDDPMModule,
        *,
        stage: Literal["A", "B"],
        lr: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 1e-6,
        kl_weight: float = 1.0,
        n_epochs_kl_warmup: int | None = None,
        rec_weight: float = 1.0,
        perturbation: Perturbation = "spectral",
        epsilon: float = 0.05,
        power_iterations: int = 3,
        mask_fraction: float = 0.1,
        p_uncond: float = 0.1,
        ema_decay: float = 0.999,
        dispersion_lr_factor: float = 30.0,
        seed: int = 0,
        **kwargs,
    ):
        if stage not in ("A", "B"):
            raise ValueError(f"stage must be 'A' or 'B', got {stage!r}.")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}.")
        if epsilon < 0 or power_iterations < 1:
            raise ValueError("Need epsilon >= 0 and power_iterations >= 1.")
        if not 0.0 <= mask_fraction < 1.0 or not 0.0 <= p_uncond < 1.0:
            raise ValueError("mask_fraction and p_uncond must lie in [0, 1).")
        super().__init__(module, lr=lr, eps=eps, weight_decay=weight_decay,
                         max_kl_weight=kl_weight, n_epochs_kl_warmup=n_epochs_kl_warmup,
                         **kwargs)
        self.stage = stage
        self.loss_kwargs["rec_weight"] = rec_weight
        self.perturbation = perturbation
        self.epsilon = epsilon
        self.power_iterations = power_iterations
        self.mask_fraction = mask_fraction
        self.p_uncond = p_uncond
        self.ema_decay = ema_decay
        if not dispersion_lr_factor > 0:
            raise ValueError(f"dispersion_lr_factor must be > 0, got {dispersion_lr_factor}.")
        self.dispersion_lr_factor = dispersion_lr_factor
        self.seed = int(seed)
        # the last training step's loss and its terms, checked with the gradients
        self._unchecked_loss: tuple[torch.Tensor, dict] | None = None
        self.ema = ExponentialMovingAverage(module.score_net, ema_decay) if (
            stage == "B" and ema_decay > 0) else None

    # ------------------------------------------------------------------ stage A
    def _input_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mask_fraction == 0.0:
            return None
        values = batch[BATCH_KEYS.NODE_INPUT]
        return keep_mask(values.shape[0], self.mask_fraction, values.device)

    def _loss_increasing_sign(self, batch, direction, input_mask,
                              projection: torch.Tensor | None = None) -> torch.Tensor:
        """Sign of the directional derivative of the loss along ``direction`` (FGSM), +1
        or -1 as a tensor on the batch's device (a Python number would wait for it).
        ``projection``: the nodes' input projection with ``input_mask``, if computed."""
        weight = batch[BATCH_KEYS.EDGE_WEIGHT].detach().requires_grad_(True)
        with torch.enable_grad():
            _, _, out = self.module(
                {**batch, BATCH_KEYS.EDGE_WEIGHT: weight},
                inference_kwargs={"input_mask": input_mask, "use_mean": True,
                                  "node_projection": projection},
                generative_kwargs=_LOSS_ONLY, loss_kwargs=self.loss_kwargs,
            )
            (grad,) = torch.autograd.grad(out.loss, weight)
        slope = (grad * direction).sum()
        return torch.where(slope >= 0, 1.0, -1.0).to(slope.dtype)

    def adversarial_edge_weight(
        self, batch: dict[str, torch.Tensor], input_mask: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch subgraph's edge weights after the adversarial perturbation
        (``projection``: the nodes' input projection with ``input_mask``, if computed).

        Returns the perturbed weights and the relative change actually applied.
        """
        weight = batch[BATCH_KEYS.EDGE_WEIGHT]
        if self.perturbation == "none" or self.epsilon == 0.0 or weight.numel() == 0:
            return weight, torch.zeros((), device=weight.device)
        edge_index = batch[BATCH_KEYS.EDGE_INDEX]
        n_nodes = batch[BATCH_KEYS.LPE].shape[0]
        if self.perturbation == "spectral":
            v1 = principal_eigenvector(edge_index, weight, n_nodes, self.power_iterations)
            direction = spectral_direction(edge_index, v1)
        else:
            direction = random_direction(edge_index, n_nodes)
        sign = self._loss_increasing_sign(batch, direction, input_mask, projection)
        return perturb_edge_weights(weight, direction, self.epsilon, sign)

    def _vae_step(self, batch, mode: str) -> torch.Tensor:
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        projection = None
        if mode == "train":
            mask = self._input_mask(batch)
            # the nodes' input projection, once for both passes: it does not depend on the
            # edge weights (the perturbation's gradient does not free it: it reaches only
            # the weights)
            inputs = self.module._get_inference_input(batch)
            projection = self.module.project_nodes(
                inputs["node_crow"], inputs["node_col"], inputs["node_input"],
                inputs["n_seed"], mask, inputs.get("n_seed_entries"))
            weight, applied = self.adversarial_edge_weight(batch, mask, projection)
            batch = {**batch, BATCH_KEYS.EDGE_WEIGHT: weight}
            self.log("perturbation_relative_change_train", applied, on_step=False,
                     on_epoch=True, batch_size=batch[BATCH_KEYS.LABELS].shape[0],
                     sync_dist=self.use_sync_dist)
        else:
            mask = None
        _, _, out = self.forward(batch, inference_kwargs={"input_mask": mask,
                                                          "node_projection": projection},
                                 generative_kwargs=_LOSS_ONLY, loss_kwargs=self.loss_kwargs)
        if mode == "train":  # checked with the gradients (on_before_optimizer_step)
            self._unchecked_loss = (out.loss, {"reconstruction loss": out.reconstruction_loss,
                                               "KL divergence": out.kl_local})
        self.log(f"{'train' if mode == 'train' else 'validation'}_loss", out.loss,
                 on_step=False, on_epoch=True, prog_bar=mode == "train",
                 batch_size=out.n_obs_minibatch, sync_dist=self.use_sync_dist)
        metrics = self.train_metrics if mode == "train" else self.val_metrics
        self.compute_and_log_metrics(out, metrics, "train" if mode == "train" else "validation")
        return out.loss

    # ------------------------------------------------------------------ stage B
    def _diffusion_step(self, batch, mode: str) -> torch.Tensor:
        loss = self.module.diffusion_loss(batch[LATENT_KEYS.QZ_MEAN],
                                          batch[LATENT_KEYS.QZ_LOGVAR],
                                          batch[LATENT_KEYS.LABELS], self.p_uncond)
        if mode == "train":  # checked with the gradients (on_before_optimizer_step)
            self._unchecked_loss = (loss, {"diffusion loss": loss})
        self.log(f"diffusion_loss_{mode}", loss, on_step=False, on_epoch=True,
                 prog_bar=mode == "train", batch_size=batch[LATENT_KEYS.LABELS].shape[0],
                 sync_dist=self.use_sync_dist)
        return loss

    # ------------------------------------------------------------- numerical faults
    def _fault(self, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{STAGE_NAMES[self.stage]}: {what} at epoch {self.current_epoch}, step "
            f"{self.global_step}. Training stopped before the optimiser step, so the model "
            "keeps the weights of the last finite step. Check the input for extreme values, "
            "or lower the learning rate (lr / lr_stage_b)."
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
        """The step's loss and gradients checked together, in one host synchronisation
        (on a GPU, the only one of a training step): a NaN or an infinity stops training
        before the optimiser changes the weights."""
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

    def _trained_here(self) -> list[nn.Module]:
        if self.stage == "A":
            return [self.module.encoder, self.module.decoder]
        return [self.module.score_net]

    def setup(self, stage: str) -> None:
        # Only this stage's networks take gradients: under DDP, whose reducer expects a
        # gradient for every parameter that requires one, the other stage's would stall it.
        # Called before Lightning wraps the plan; teardown() unfreezes everything. The flags
        # are set, not toggled, so a run that crashed before its teardown leaves nothing
        # frozen for the next one.
        trained = {id(p) for net in self._trained_here() for p in net.parameters()}
        for p in self.module.parameters():
            p.requires_grad_(id(p) in trained)

    def teardown(self, stage: str) -> None:
        for p in self.module.parameters():
            p.requires_grad_(True)

    def on_fit_start(self):
        # Lightning keeps the modes it finds, and scvi-tools' runner leaves the module in
        # eval mode after each fit: without this a second train() would run without dropout.
        # (The whole plan, so the EMA's copy of the ScoreNet is included.)
        self.train()

    def training_step(self, batch, batch_idx):
        if self.stage == "A":
            return self._vae_step(batch, "train")
        return self._diffusion_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        if self.stage == "A":
            self._vae_step(batch, "validation")
        else:
            self._diffusion_step(batch, "validation")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update(self.module.score_net)

    def on_train_end(self):
        if self.ema is not None and self.ema.n_updates.item() > 0:
            self.ema.copy_to(self.module.score_net)

    def configure_optimizers(self):
        if self.stage == "A":
            dispersion = self.module.decoder.log_theta
            params = [p for p in (*self.module.encoder.parameters(),
                                  *self.module.decoder.parameters()) if p is not dispersion]
            groups = [{"params": params}]
            if dispersion is not None:
                groups.append({"params": [dispersion], "weight_decay": 0.0,
                               "lr": self.lr * self.dispersion_lr_factor})
            return torch.optim.Adam(groups, lr=self.lr, eps=self.eps,
                                    weight_decay=self.weight_decay,
                                    **_fused_kwargs([*params, dispersion]))
        params = list(self.module.score_net.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                      **_fused_kwargs(params))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total,
                                                               eta_min=0.1 * self.lr)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
