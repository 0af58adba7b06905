"""Callbacks that keep a run's folder and checkpoints tied to its identity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from experiments.run_dir import update_run_status


class RunRecorder(Callback):
    """Writes `run.json` as the run progresses and stamps every checkpoint with the run id,
    the W&B run id and the composed config, so a checkpoint alone can be resumed or sampled."""

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any], experiment: str | None) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.config = config
        self.experiment = experiment

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            update_run_status(
                self.run_dir,
                run_id=self.run_id,
                status="running",
                experiment=self.experiment,
                max_steps=trainer.max_steps,
                started=dt.datetime.now().isoformat(timespec="seconds"),
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["effvid"] = {
            "run_id": self.run_id,
            "wandb_run_id": getattr(trainer.logger, "version", None),
            "config": self.config,
        }
        if trainer.is_global_zero:
            update_run_status(self.run_dir, global_step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            update_run_status(self.run_dir, global_step=trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            update_run_status(
                self.run_dir, status="failed", error=f"{type(exception).__name__}: {exception}",
                global_step=trainer.global_step,
            )
