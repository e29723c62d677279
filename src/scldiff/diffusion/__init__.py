"""Latent diffusion: VP-SDE schedule, samplers as pure functions, classifier-free guidance."""

from ._guidance import (
    ClassifierFreeGuidance,
    check_guidance_interval,
    compositional_epsilon,
    guided_epsilon,
)
from ._noise import coupled_noise, smoothing_operator
from ._samplers import (
    DEFAULT_STEPS,
    SAMPLERS,
    invert_ddim,
    sample_ddim,
    sample_ode,
    sample_sde,
)
from ._schedule import VPSchedule

__all__ = [
    "ClassifierFreeGuidance",
    "DEFAULT_STEPS",
    "SAMPLERS",
    "VPSchedule",
    "check_guidance_interval",
    "compositional_epsilon",
    "coupled_noise",
    "guided_epsilon",
    "invert_ddim",
    "sample_ddim",
    "sample_ode",
    "sample_sde",
    "smoothing_operator",
]
