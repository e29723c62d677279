"""Training: the two-stage plan and its data modules."""

from ._data import EpochBatchSampler, LatentDataModule, SubgraphCollator, SubgraphDataModule
from ._progress import StageProgressBar
from ._trainingplan import (
    PERTURBATIONS,
    STAGE_NAMES,
    LapDDPMTrainingPlan,
    NonFiniteLossError,
    step_seed,
)

__all__ = [
    "PERTURBATIONS",
    "STAGE_NAMES",
    "EpochBatchSampler",
    "LapDDPMTrainingPlan",
    "LatentDataModule",
    "NonFiniteLossError",
    "StageProgressBar",
    "SubgraphCollator",
    "SubgraphDataModule",
    "step_seed",
]
