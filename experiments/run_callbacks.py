"""Callbacks that keep a run's folder and checkpoints tied to its identity, make a resumed
run continue exactly, and turn preemption signals into a checkpoint and a clean exit."""

from __future__ import annotations

import datetime as dt
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
        if isinstance(exception, SIGTERMException):
            return  # PreemptionCheckpoint records the interruption with its checkpoint
        if trainer.is_global_zero:
            update_run_status(
                self.run_dir, status="failed", error=f"{type(exception).__name__}: {exception}",
                global_step=trainer.global_step,
            )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collect_rng_states() -> dict[str, Any]:
    """This process's torch / numpy / python (and CUDA) RNG states, as plain tensors and
    tuples so the checkpoint still loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateKeeper(Callback):
    """Saves every rank's RNG states in each checkpoint and restores them right before the
    first training batch after a resume, so noise, timesteps and caption dropout continue
    the sequence of the uninterrupted run. Validation runs on a fork of the RNG state, so how
    often a run validates (and whether a resume repeats a validation) never shifts the
    training randomness. DataLoader workers need no saved state: their randomness derives
    from (seed, epoch, rank, worker, sample) in the datamodule."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_validation = collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            set_rng_states(self._before_validation)
            self._before_validation = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        mine = self._before_validation or collect_rng_states()  # mid-validation: the training state
        if _distributed() and trainer.world_size > 1:
            every: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
        else:
            every = [mine]
        checkpoint["rng_states"] = every

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        every = checkpoint.get("rng_states")
        if every and len(every) == trainer.world_size:
            self._pending = every[trainer.global_rank]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


class PreemptionCheckpoint(Callback):
    """SIGTERM (Lightning stops after the current step) or SIGUSR1 (SLURM's warning before
    preemption, e.g. `#SBATCH --signal=SIGUSR1@90`) -> save `last.ckpt` and exit cleanly.

    Under SLURM with Lightning's auto-requeue, Lightning owns SIGUSR1 (it saves an hpc
    checkpoint and requeues the job); this callback then only handles SIGTERM.
    """

    def __init__(self, checkpoint_dir: str | Path, run_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_dir = Path(run_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            def request_stop(signum: int, frame: Any) -> None:
                trainer._signal_connector.received_sigterm = True  # Lightning stops after this step

            signal.signal(signal.SIGUSR1, request_stop)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            update_run_status(self.run_dir, status="interrupted", global_step=trainer.global_step,
                              checkpoint=str(path))


class DataHealthLogger(Callback):
    """Logs `data/skipped_samples`: bad samples the datamodule skipped so far, all workers of
    all ranks (summed across ranks; every rank logs at the same steps, as the reduction needs)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        skipped = getattr(trainer.datamodule, "num_skipped_samples", None)
        if skipped is not None and (trainer.global_step % max(trainer.log_every_n_steps, 1) == 0):
            pl_module.log("data/skipped_samples", float(skipped), on_step=True, on_epoch=False, sync_dist=True,
                          reduce_fx="sum")
