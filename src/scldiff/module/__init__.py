"""LapDDPM networks and losses: pure torch on tensors, no AnnData."""

from ._constants import BATCH_KEYS, LATENT_KEYS
from ._decoder import AccessibilityDecoder, CountDecoder
from ._encoder import FullGraphChebConv, GraphEncoder
from ._module import (
    COUNTERFACTUAL_METHODS,
    PREDICTIONS,
    LapDDPMModule,
    gaussian_kl,
)
from ._scorenet import ScoreNet, drop_attributes, fourier_features, sinusoidal_embedding
from ._scorer import RealnessScorer

__all__ = [
    "BATCH_KEYS",
    "LATENT_KEYS",
    "COUNTERFACTUAL_METHODS",
    "PREDICTIONS",
    "AccessibilityDecoder",
    "CountDecoder",
    "FullGraphChebConv",
    "GraphEncoder",
    "LapDDPMModule",
    "RealnessScorer",
    "ScoreNet",
    "drop_attributes",
    "fourier_features",
    "gaussian_kl",
    "sinusoidal_embedding",
]
