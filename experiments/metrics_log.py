"""A run's metrics as a plain file, `RUN_DIR/metrics.jsonl`: the record effvid-runs reads.

Each `log_metrics` call of Lightning appends one JSON object and flushes it, so a run killed
with `kill -9` keeps every row it logged (the OS holds flushed data; only a host crash can lose
it, so the file is also fsynced at each checkpoint save, 0.17 ms on a local disk):

    {"step": 41, "_elapsed": 12.7, "train/loss": 0.183, "epoch": 0}

`step` is Lightning's logging step, the `trainer/global_step` W&B shows (the loss of the k-th
optimizer step is logged at step k-1, validation after step k at k-1). `_elapsed` is seconds
of training since the run started, continued over resumes. Hyperparameters are not repeated
here: the run's `config.yaml` holds them.

A resumed run continues the same file. Its first row rewrites the file (temp file + rename)
without the rows the killed process logged at or after the step the run resumed from, which
the resumed run logs again, so no step is counted twice.
"""

from __future__ import annotations

import json
import os
import time
from argparse import Namespace
from pathlib import Path
from typing import IO, Any, Mapping

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from data_tools.atomic_files import write_atomic, write_error
from experiments.run_history import METRICS_FILE, TIME_KEY, read_metrics_file


class MetricsFileLogger(Logger):
    """Appends every logged row to `run_dir/metrics.jsonl` (rank 0 only).

    `resume_step`: the global step of the checkpoint this process resumes from (None for a new
    run, whose file starts empty). Rows with a step at or after it, or at or after the first
    step this process logs, are dropped before the first new row is written."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE
        self.resume_step = resume_step
        self._file: IO[str] | None = None
        self._continued = False  # the rows of an earlier process are dealt with
        self._started = time.monotonic()
        self._elapsed_before = 0.0  # training time of the segments this one continues
        self._last_step = 0

    @property
    def name(self) -> str:
        return "metrics_file"

    @property
    def version(self) -> str:
        return self.path.parent.name

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the run's config.yaml is the record of its hyperparameters."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        step = self._last_step if step is None else int(step)
        if self._file is None:
            self._open(first_step=step)  # after finalize (a later fit or test): append again
        self._last_step = step
        elapsed = self._elapsed_before + time.monotonic() - self._started
        row = {"step": step, TIME_KEY: round(elapsed, 3)}
        row.update({key: value.item() if hasattr(value, "item") else value for key, value in metrics.items()})
        try:
            self._file.write(json.dumps(row, default=str) + "\n")
            self._file.flush()
        except OSError as error:  # a full disk: named like every other file the run writes
            raise write_error(error, self.path) from error

    def _open(self, first_step: int) -> None:
        if not self._continued:
            kept: list[dict[str, Any]] = []
            if self.resume_step is not None and self.path.is_file():
                cut = min(self.resume_step, first_step)
                kept = [row for row in read_metrics_file(self.path) if row["step"] < cut]
                self._elapsed_before = max((row.get(TIME_KEY, 0.0) for row in kept), default=0.0)
            write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            self._continued = True
        self._file = open(self.path, "a", encoding="utf-8")

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._sync()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._sync()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
