r"""Classifier-free guidance (Ho & Salimans, 2022), joint or compositional over a cell's
attributes, as a wrapper around the noise predictor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def guided_epsilon(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    r""":math:`\tilde\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u)`.

    ``scale`` :math:`w = 0` is the unconditional model, :math:`w = 1` the conditional one,
    :math:`w > 1` sharpens the condition. SCLD (Wang et al., 2023, Eq. 13) writes the same as
    :math:`(1 + \omega)\epsilon_c - \omega \epsilon_u` with :math:`\omega = w - 1`.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def compositional_epsilon(eps_each: Sequence[Tensor], eps_uncond: Tensor,
                          scales: Sequence[float]) -> Tensor:
    r""":math:`\tilde\epsilon = \epsilon_\varnothing + \sum_a w_a(\epsilon_a -
    \epsilon_\varnothing)`, :math:`\epsilon_a` conditioned on attribute :math:`a` alone
    (compositional guidance, Liu et al., 2022; CFGen, Palma et al., 2025): each attribute
    with its own strength, and combinations never seen together in training composed from
    the attributes seen apart."""
    out = eps_uncond
    for eps, scale in zip(eps_each, scales, strict=True):
        out = out + scale * (eps - eps_uncond)
    return out


def only_attribute(attributes: Tensor, a: int | Sequence[int]) -> Tensor:
    """``attributes`` with every column but ``a`` (one column or several) set to NaN
    (null)."""
    out = torch.full_like(attributes, float("nan"))
    out[:, a] = attributes[:, a]
    return out


class ClassifierFreeGuidance:
    r"""Noise predictor ``eps(z, t)`` guided towards fixed attributes.

    Parameters
    ----------
    network
        ``network(z, t, attributes) -> eps`` trained with each attribute dropped to null
        (NaN) at random.
    attributes
        ``(batch, A)`` attribute values, one row per sample, NaN where unconditioned.
    scale
        One number, the joint guidance :math:`w` of :func:`guided_epsilon` (the
        conditional on all given attributes against the unconditional; for 0 and 1 a single
        network evaluation is made), or one scale per attribute, the compositional guidance
        of :func:`compositional_epsilon` (one evaluation per attribute with a non-zero
        scale, and the unconditional).
    groups
        The columns of each attribute of the compositional guidance (an attribute may span
        several, as a spot's position does); ``None``: one column each.
    interval
        ``(t_low, t_high)``: guide only at times :math:`t_{low} \le t \le t_{high}`, and
        use the joint conditional prediction (:math:`w = 1`) elsewhere, with one network
        evaluation (Kynkäänniemi et al., 2024, "Applying guidance in a limited interval
        improves sample and distribution quality in diffusion models"). ``None``: guide at
        every time.
    """

    def __init__(
        self,
        network: Callable[[Tensor, Tensor, Tensor], Tensor],
        attributes: Tensor,
        scale: float | Sequence[float] = 1.0,
        interval: tuple[float, float] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
    ):
        self.network = network
        self.attributes = attributes
        self.null = torch.full_like(attributes, float("nan"))
        if isinstance(scale, (int, float)):
            self.scale, self.scales = float(scale), None
        else:
            self.scales = [float(s) for s in scale]
            self.groups = [[a] for a in range(attributes.shape[1])] if groups is None \
                else [list(g) for g in groups]
            if len(self.scales) != len(self.groups):
                raise ValueError(f"{len(self.scales)} guidance scales for "
                                 f"{len(self.groups)} attributes.")
            self.scale = None
        self.interval = check_guidance_interval(interval)

    def _conditions(self) -> tuple[list[Tensor], list[float]]:
        """The attribute rows of each network evaluation besides the unconditional one, and
        their scales."""
        if self.scales is None:
            return [self.attributes], [self.scale]
        used = [a for a, s in enumerate(self.scales) if s != 0.0]
        return [only_attribute(self.attributes, self.groups[a]) for a in used], \
            [self.scales[a] for a in used]

    def _guided(self, z: Tensor, t: Tensor) -> Tensor:
        if self.scales is None and self.scale == 1.0:
            return self.network(z, t, self.attributes)
        if self.scales is None and self.scale == 0.0:
            return self.network(z, t, self.null)
        conditions, scales = self._conditions()
        k = len(conditions) + 1
        times = t if t.dim() == 0 else t.repeat(k)
        eps = self.network(z.repeat(k, 1), times, torch.cat([self.null, *conditions]))
        eps_uncond, *eps_each = eps.chunk(k)
        if self.scales is None:
            return guided_epsilon(eps_each[0], eps_uncond, self.scale)
        return compositional_epsilon(eps_each, eps_uncond, scales)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        """The guided noise at ``z`` and time ``t`` (0-d, shared by all rows, or one per
        row)."""
        if self.interval is None:
            return self._guided(z, t)
        inside = (t >= self.interval[0]) & (t <= self.interval[1])
        if not bool(inside.any()):
            return self.network(z, t, self.attributes)
        eps = self._guided(z, t)
        if not bool(inside.all()):  # rows at times outside: the joint conditional
            eps = torch.where(inside.reshape(-1, 1), eps,
                              self.network(z, t, self.attributes))
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
