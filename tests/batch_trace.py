"""A test-only callback that writes each training step's batch keys and loss as a JSON line
(flushed at once, so a run killed with kill -9 keeps every line it reached)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lightning.pytorch.callbacks import Callback


class BatchTrace(Callback):
    def __init__(self, path: str, pause_after: int | None = None) -> None:
        self.path, self.pause_after = path, pause_after

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "rank": trainer.global_rank, "keys": list(batch["key"]),
               "loss": float(loss), "epoch": trainer.current_epoch}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.pause_after is not None and trainer.global_step == self.pause_after:
            # The test kills (or signals) the run here; a signal ends the pause so Lightning
            # can stop after this step.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.05)
