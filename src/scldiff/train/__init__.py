"""Training: the two-stage plan and its data modules."""

from ._data import LatentDataModule, SubgraphCollator, SubgraphDataModule
from ._progress import StageProgressBar
from ._trainingplan import PERTURBATIONS, LapDDPMTrainingPlan

__all__ = [
    "PERTURBATIONS",
    "LapDDPMTrainingPlan",
    "LatentDataModule",
    "StageProgressBar",
    "SubgraphCollator",
    "SubgraphDataModule",
]
