"""LapDDPM networks and losses: pure torch, no AnnData."""

from ._decoder import LIKELIHOODS, CountDecoder, sample_counts, sparse_log_likelihood
from ._encoder import FullGraphChebConv, GraphEncoder
from ._module import LapDDPMModule, gaussian_kl
from ._scorenet import ScoreNet, sinusoidal_embedding

__all__ = [
    "LIKELIHOODS",
    "CountDecoder",
    "FullGraphChebConv",
    "GraphEncoder",
    "LapDDPMModule",
    "ScoreNet",
    "gaussian_kl",
    "sample_counts",
    "sinusoidal_embedding",
    "sparse_log_likelihood",
]
