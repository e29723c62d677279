"""Stage A: the graph VAE's training plan, with input masking and the spectral adversarial
perturbation of each minibatch subgraph's edge weights."""

from __future__ import annotations

from typing import Literal

import torch

from ..graph import (
    perturb_edge_weights,
    principal_eigenvector,
    random_direction,
    spectral_direction,
)
from ..module import BATCH_KEYS, LapDDPMModule
from ._plan_base import LapDDPMTrainingPlan, fused_adam_kwargs

Perturbation = Literal["spectral", "random", "none"]
PERTURBATIONS: tuple[str, ...] = ("spectral", "random", "none")


def keep_mask(n: int, fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n,)`` float 0/1 values, each 0 with probability ``fraction``, independently,
    from torch's global generator.

    On a CPU each value takes 16 random bits, four from one 64-bit integer, and is 0 when
    they fall below ``round(fraction * 2**16)``: ``fraction`` resolved to 1/65,536, at
    half the cost of ``torch.rand(n) >= fraction``, whose CPU generator makes 32 bits per
    uniform. On other devices, ``torch.rand``.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return (torch.rand(n, device=device) >= fraction).float()
    # uniform 64-bit integers (from -2**63 to 2**63 - 1, which random_ leaves out), seen as
    # four signed 16-bit integers each
    bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    threshold = round(fraction * 2**16) - 2**15
    return (bits.view(torch.int16)[:n] >= threshold).float()


class GraphVAETrainingPlan(LapDDPMTrainingPlan):
    r"""Stage A: encoder and decoder on ``rec_weight * NLL + kl_weight * KL``, with

    - input gene masking: each stored count of the encoder's input is zeroed with
      probability ``mask_fraction`` (the likelihood still sees every count);
    - the spectral adversarial perturbation of each minibatch subgraph's edge weights
      (Bini & Marchand-Maillet, 2025, Eqs. 1-2): ``power_iterations`` give the principal
      eigenvector :math:`v_1`; the weights move by :math:`\pm\epsilon\lVert W\rVert\, v_1
      v_1^\top / \lVert v_1 v_1^\top\rVert` on the existing edges, signed by one extra
      gradient so that the loss increases (FGSM), and the encoder is trained on the
      perturbed graph. The relative change applied is logged as
      ``perturbation_relative_change_train``.

    Parameters
    ----------
    module
        The :class:`~scldiff.module.LapDDPMModule`.
    lr
        Learning rate.
    eps
        Adam's epsilon. With scvi-tools' 0.01 the large sparse input projection learns so
        slowly that the stage needs several times more steps.
    weight_decay
        Weight decay.
    kl_weight
        Weight of the KL term after warm-up.
    n_epochs_kl_warmup
        Epochs over which the KL weight rises linearly from 0.
    rec_weight
        Weight of the reconstruction term.
    perturbation
        ``"spectral"`` (the paper's), ``"random"`` (a random symmetric direction, the
        ablation's control) or ``"none"``.
    epsilon
        Perturbation radius relative to the subgraph's weight norm.
    power_iterations
        Power-iteration steps for :math:`v_1`.
    mask_fraction
        Input gene masking fraction.
    dispersion_lr_factor
        Learning rate of the decoder's gene dispersions relative to ``lr``. They start at 1
        and their maximum-likelihood values are several times larger: at the network's rate
        they stay near the start and generated counts come out overdispersed.
    seed
        Seed of the run (:class:`~scldiff.train.LapDDPMTrainingPlan`).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    stage = "A"
    stage_name = "Stage A (graph VAE)"

    def __init__(
        self,
        module: LapDDPMModule,
        *,
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
        dispersion_lr_factor: float = 30.0,
        seed: int = 0,
        **kwargs,
    ):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got "
                             f"{perturbation!r}.")
        if epsilon < 0 or power_iterations < 1:
            raise ValueError("Need epsilon >= 0 and power_iterations >= 1.")
        if not 0.0 <= mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must lie in [0, 1), got {mask_fraction}.")
        if not dispersion_lr_factor > 0:
            raise ValueError(f"dispersion_lr_factor must be > 0, got {dispersion_lr_factor}.")
        if perturbation != "none" and module.encoder.cheb_k == 1:
            raise ValueError(
                f"perturbation={perturbation!r} perturbs the graph's edge weights, but this "
                "model has cheb_k=1: its encoder sees each cell without its neighbours and "
                "uses no edge. Train it with plan_kwargs={'perturbation': 'none'}, or build "
                "the model with cheb_k >= 2.")
        super().__init__(module, seed=seed, lr=lr, eps=eps, weight_decay=weight_decay,
                         max_kl_weight=kl_weight, n_epochs_kl_warmup=n_epochs_kl_warmup,
                         **kwargs)
        self.loss_kwargs["rec_weight"] = rec_weight
        self.perturbation = perturbation
        self.epsilon = epsilon
        self.power_iterations = power_iterations
        self.mask_fraction = mask_fraction
        self.dispersion_lr_factor = dispersion_lr_factor

    def trained_networks(self):
        return [self.module.encoder, self.module.decoder]

    def _input_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mask_fraction == 0.0:
            return None
        values = batch[BATCH_KEYS.NODE_INPUT]
        return keep_mask(values.shape[0], self.mask_fraction, values.device)

    def _projection(self, batch, input_mask: torch.Tensor | None) -> torch.Tensor:
        """The nodes' input projection with ``input_mask``
        (:meth:`~scldiff.module.LapDDPMModule.project_nodes`)."""
        return self.module.project_nodes(
            batch[BATCH_KEYS.NODE_CROW], batch[BATCH_KEYS.NODE_COL],
            batch[BATCH_KEYS.NODE_INPUT], batch[BATCH_KEYS.ATTRIBUTES].shape[0], input_mask)

    def _loss_increasing_sign(self, batch, direction, projection) -> torch.Tensor:
        """Sign of the directional derivative of the loss along ``direction`` (FGSM), +1
        or -1, from the nodes' input ``projection``."""
        weight = batch[BATCH_KEYS.EDGE_WEIGHT].detach().requires_grad_(True)
        with torch.enable_grad():
            _, _, out = self.module(
                {**batch, BATCH_KEYS.EDGE_WEIGHT: weight},
                inference_kwargs={"use_mean": True, "node_projection": projection},
                loss_kwargs=self.loss_kwargs)
            (grad,) = torch.autograd.grad(out.loss, weight)
        slope = (grad * direction).sum()
        return torch.where(slope >= 0, 1.0, -1.0).to(slope.dtype)

    def adversarial_edge_weight(self, batch: dict[str, torch.Tensor],
                                projection: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch subgraph's edge weights after the adversarial perturbation, and the
        relative change applied (``projection``: the nodes' input projection, computed
        here without an input mask when not given)."""
        weight = batch[BATCH_KEYS.EDGE_WEIGHT]
        if self.perturbation == "none" or self.epsilon == 0.0 or weight.numel() == 0:
            return weight, torch.zeros((), device=weight.device)
        if projection is None:
            projection = self._projection(batch, None)
        edge_index = batch[BATCH_KEYS.EDGE_INDEX]
        n_nodes = batch[BATCH_KEYS.LPE].shape[0]
        if self.perturbation == "spectral":
            v1 = principal_eigenvector(edge_index, weight, n_nodes, self.power_iterations)
            direction = spectral_direction(edge_index, v1)
        else:
            direction = random_direction(edge_index, n_nodes)
        sign = self._loss_increasing_sign(batch, direction, projection)
        return perturb_edge_weights(weight, direction, self.epsilon, sign)

    def _step(self, batch, mode: str) -> torch.Tensor:
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        projection = None
        if mode == "train":
            # the nodes' input projection, once for both passes: it does not depend on the
            # edge weights, which are all the perturbation's gradient reaches
            projection = self._projection(batch, self._input_mask(batch))
            weight, applied = self.adversarial_edge_weight(batch, projection)
            batch = {**batch, BATCH_KEYS.EDGE_WEIGHT: weight}
            self.log("perturbation_relative_change_train", applied, on_step=False,
                     on_epoch=True, batch_size=batch[BATCH_KEYS.ATTRIBUTES].shape[0],
                     sync_dist=self.use_sync_dist)
        _, _, out = self.forward(batch, inference_kwargs={"node_projection": projection},
                                 loss_kwargs=self.loss_kwargs)
        if mode == "train":  # checked with the gradients (on_before_optimizer_step)
            self._unchecked_loss = (out.loss, {"reconstruction loss": out.reconstruction_loss,
                                               "KL divergence": out.kl_local})
        self.log(f"{mode}_loss", out.loss, on_step=False, on_epoch=True,
                 prog_bar=mode == "train", batch_size=out.n_obs_minibatch,
                 sync_dist=self.use_sync_dist)
        metrics = self.train_metrics if mode == "train" else self.val_metrics
        self.compute_and_log_metrics(out, metrics, mode)
        return out.loss

    def configure_optimizers(self):
        dispersion = self.module.decoder.log_theta
        params = [p for p in (*self.module.encoder.parameters(),
                              *self.module.decoder.parameters()) if p is not dispersion]
        groups = [{"params": params}]
        if dispersion is not None:
            groups.append({"params": [dispersion], "weight_decay": 0.0,
                           "lr": self.lr * self.dispersion_lr_factor})
        return torch.optim.Adam(groups, lr=self.lr, eps=self.eps,
                                weight_decay=self.weight_decay,
                                **fused_adam_kwargs([*params, dispersion]))
