"""scldiff: LapDDPM, conditional graph latent diffusion for single-cell RNA-seq counts."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, diffusion, graph, metrics, module, pl, train
from .model import LapDDPM, ModelFileError

try:
    __version__ = version("scldiff")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "LapDDPM", "ModelFileError", "datasets", "diffusion", "graph", "metrics", "module", "pl",
    "train",
]
