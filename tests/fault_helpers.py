"""Test-only callbacks that inject faults into a training run."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class PoisonWeights(Callback):
    """After step `at_step`, one weight becomes NaN (what an exploding update leaves)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")
