"""scldiff: LapDDPM, conditional graph latent diffusion for single-cell RNA-seq counts."""

from . import datasets, diffusion, graph, metrics, module, pl, train
from ._settings import settings
from ._version import __version__
from .model import LapDDPM, ModelFileError

__all__ = [
    "LapDDPM",
    "ModelFileError",
    "__version__",
    "datasets",
    "diffusion",
    "graph",
    "metrics",
    "module",
    "pl",
    "settings",
    "train",
]
