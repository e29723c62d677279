"""LapDDPM networks and losses: pure torch on tensors, no AnnData."""

from ._constants import BATCH_KEYS, LATENT_KEYS
from ._decoder import CountDecoder
from ._encoder import FullGraphChebConv, GraphEncoder
from ._module import PREDICTIONS, LapDDPMModule, gaussian_kl
from ._scorenet import ScoreNet, sinusoidal_embedding

__all__ = [
    "BATCH_KEYS",
    "LATENT_KEYS",
    "PREDICTIONS",
    "CountDecoder",
    "FullGraphChebConv",
    "GraphEncoder",
    "LapDDPMModule",
    "ScoreNet",
    "gaussian_kl",
    "sinusoidal_embedding",
]
