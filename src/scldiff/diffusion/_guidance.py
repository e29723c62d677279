r"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper around the noise predictor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def guided_epsilon(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    r""":math:`\tilde\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u)`.

    ``scale`` :math:`w = 0` is the unconditional model, :math:`w = 1` the conditional one,
    :math:`w > 1` sharpens the condition. SCLD (Wang et al., 2023, Eq. 13) writes the same as
    :math:`(1 + \omega)\epsilon_c - \omega \epsilon_u` with :math:`\omega = w - 1`.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


class ClassifierFreeGuidance:
    r"""Noise predictor ``eps(z, t)`` guided towards fixed labels.

    Parameters
    ----------
    network
        ``network(z, t, labels) -> eps`` trained with label dropout to ``null_label``.
    labels
        ``(batch,)`` integer labels, one per sample.
    null_label
        Index of the "no label" token.
    scale
        Guidance scale :math:`w`; for 0 and 1 a single network evaluation is made.
    interval
        ``(t_low, t_high)``: guide only at times :math:`t_{low} \le t \le t_{high}`, and
        use the conditional prediction (:math:`w = 1`) elsewhere, with one network
        evaluation (Kynkäänniemi et al., 2024, "Applying guidance in a limited interval
        improves sample and distribution quality in diffusion models"). ``None``: guide at
        every time.
    """

    def __init__(
        self,
        network: Callable[[Tensor, Tensor, Tensor], Tensor],
        labels: Tensor,
        null_label: int,
        scale: float = 1.0,
        interval: tuple[float, float] | None = None,
    ):
        self.network = network
        self.labels = labels
        self.null = torch.full_like(labels, null_label)
        self.scale = float(scale)
        self.interval = check_guidance_interval(interval)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        """The guided noise at ``z`` and time ``t`` (0-d, shared by all rows, or one per
        row)."""
        if self.scale == 1.0:
            return self.network(z, t, self.labels)
        inside = None
        if self.interval is not None:
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not bool(inside.any()):
                return self.network(z, t, self.labels)
        eps_cond = None
        if self.scale == 0.0:
            eps = self.network(z, t, self.null)
        else:
            times = t if t.dim() == 0 else torch.cat([t, t])
            eps_cond, eps_uncond = self.network(
                torch.cat([z, z]), times, torch.cat([self.labels, self.null])).chunk(2)
            eps = guided_epsilon(eps_cond, eps_uncond, self.scale)
        if inside is not None and not bool(inside.all()):  # rows at times outside
            if eps_cond is None:
                eps_cond = self.network(z, t, self.labels)
            eps = torch.where(inside.reshape(-1, 1), eps, eps_cond)
        return eps


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """``interval`` as a pair of floats ``0 <= t_low <= t_high <= 1``, or ``None``; a
    ``ValueError`` naming the problem otherwise."""
    if interval is None:
        return None
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be None or a pair (t_low, t_high) of "
                         f"times in [0, 1], got {interval!r}.") from None
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"guidance_interval must satisfy 0 <= t_low <= t_high <= 1, got "
                         f"{interval!r}.")
    return low, high
