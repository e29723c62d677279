"""Training: the two-stage plan and its data modules."""

from ._data import EpochBatchSampler, LatentDataModule, SubgraphCollator, SubgraphDataModule
from ._progress import StageProgressBar
from ._runner import LapDDPMTrainer, LapDDPMTrainRunner
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
    "LapDDPMTrainRunner",
    "LapDDPMTrainer",
    "LapDDPMTrainingPlan",
    "LatentDataModule",
    "NonFiniteLossError",
    "StageProgressBar",
    "SubgraphCollator",
    "SubgraphDataModule",
    "step_seed",
]
