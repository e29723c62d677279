"""The scvi-tools model class."""

from ._lapddpm import LapDDPM
from ._serialization import ModelFileError

__all__ = ["LapDDPM", "ModelFileError"]
