"""A progress bar that names the phase and shows only the current phase's metrics (regulariser terms included)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

PHASE_TITLES = {"group": "group learning", "finetune": "finetune"}


class PhaseProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        phase = PHASE_TITLES.get(getattr(pl_module, "phase", ""), "")
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        self.train_progress_bar.set_description(f"{phase} epoch {trainer.current_epoch}".strip())

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        phase = getattr(pl_module, "phase", None)
        metrics.pop("v_num", None)
        return {k: v for k, v in metrics.items() if "/" not in k or k.startswith(f"{phase}/")}
