"""LapDDPM networks and losses: pure torch, no AnnData."""

from ._decoder import (
    LIKELIHOODS,
    CountDecoder,
    HurdleNegativeBinomial,
    hurdle_logits,
    sample_counts,
    sparse_log_likelihood,
)
from ._encoder import FullGraphChebConv, GraphEncoder
from ._module import LapDDPMModule, gaussian_kl
from ._scorenet import ScoreNet, sinusoidal_embedding

__all__ = [
    "LIKELIHOODS",
    "CountDecoder",
    "FullGraphChebConv",
    "GraphEncoder",
    "HurdleNegativeBinomial",
    "LapDDPMModule",
    "ScoreNet",
    "gaussian_kl",
    "hurdle_logits",
    "sample_counts",
    "sinusoidal_embedding",
    "sparse_log_likelihood",
]
