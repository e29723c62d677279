"""Training: the two stages' plans on a shared base, their data modules, the runner, the
post-guidance scorer's fit and the accessibility decoder's."""

from ._accessibility import fit_accessibility
from ._data import EpochBatchSampler, LatentDataModule, SubgraphCollator, SubgraphDataModule
from ._plan_base import LapDDPMTrainingPlan, NonFiniteLossError, step_seed
from ._plan_diffusion import DiffusionTrainingPlan, ExponentialMovingAverage
from ._plan_vae import PERTURBATIONS, GraphVAETrainingPlan, keep_mask
from ._progress import StageProgressBar
from ._runner import LapDDPMTrainer, LapDDPMTrainRunner, quiet_lightning
from ._scorer import fit_scorer

__all__ = [
    "PERTURBATIONS",
    "DiffusionTrainingPlan",
    "EpochBatchSampler",
    "ExponentialMovingAverage",
    "GraphVAETrainingPlan",
    "LapDDPMTrainRunner",
    "LapDDPMTrainer",
    "LapDDPMTrainingPlan",
    "LatentDataModule",
    "NonFiniteLossError",
    "StageProgressBar",
    "SubgraphCollator",
    "SubgraphDataModule",
    "fit_accessibility",
    "fit_scorer",
    "keep_mask",
    "quiet_lightning",
    "step_seed",
]
