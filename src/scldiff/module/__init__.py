"""LapDDPM networks and losses: pure torch, no AnnData."""

from ._decoder import (
    LIKELIHOODS,
    CountDecoder,
    HurdleNegativeBinomial,
    hurdle_logits,
    sample_counts,
    sparse_log_likelihood,
    zinb_log_zero,
)
from ._encoder import FullGraphChebConv, GraphEncoder
from ._module import PREDICTIONS, LapDDPMModule, LatentLibrary, gaussian_kl
from ._scorenet import ScoreNet, sinusoidal_embedding

__all__ = [
    "LIKELIHOODS",
    "PREDICTIONS",
    "CountDecoder",
    "FullGraphChebConv",
    "GraphEncoder",
    "HurdleNegativeBinomial",
    "LapDDPMModule",
    "LatentLibrary",
    "ScoreNet",
    "gaussian_kl",
    "hurdle_logits",
    "sample_counts",
    "sinusoidal_embedding",
    "sparse_log_likelihood",
    "zinb_log_zero",
]
