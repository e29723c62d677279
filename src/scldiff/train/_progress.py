"""A progress bar that names the training stage."""

from __future__ import annotations

from scvi.train._progress import ProgressBar


class StageProgressBar(ProgressBar):
    """scvi-tools' epoch bar, described as ``"<stage> <epoch>/<max_epochs>"``."""

    def __init__(self, stage: str, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.stage = stage

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        if self.main_progress_bar is not None and self.is_enabled:
            epoch = trainer.current_epoch + 1
            self.main_progress_bar.set_description(f"{self.stage} {epoch}/{trainer.max_epochs}")
