"""scldiff: LapDDPM, conditional graph latent diffusion for single-cell RNA-seq counts."""

from . import datasets, diffusion, distributions, graph, metrics, module, pl, sampling, train
from ._version import __version__
from .model import LapDDPM, ModelFileError

__all__ = [
    "LapDDPM",
    "ModelFileError",
    "__version__",
    "datasets",
    "diffusion",
    "distributions",
    "graph",
    "metrics",
    "module",
    "pl",
    "sampling",
    "train",
]
