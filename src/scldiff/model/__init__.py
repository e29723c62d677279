"""The scvi-tools model class and what it alone touches: AnnData set-up, training, generation,
the library-size model, save and load."""

from ._lapddpm import LapDDPM
from ._library import LibrarySizeModel
from ._multiome import paired_anndata
from ._serialization import ModelFileError

__all__ = ["LapDDPM", "LibrarySizeModel", "ModelFileError", "paired_anndata"]
