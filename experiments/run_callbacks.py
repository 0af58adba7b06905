"""Callbacks that keep a run's folder and checkpoints tied to its identity, make a resumed
run continue exactly, turn stop signals into a checkpoint and a clean exit, and stop a run
whose loss stopped being finite."""

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
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from experiments.checkpoints import weights_are_finite
from experiments.run_dir import update_run_status

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class DivergedError(RuntimeError):
    """The training loss was not finite for `patience` steps in a row."""

    def __init__(self, message: str, first_step: int, step: int) -> None:
        super().__init__(message)
        self.first_step, self.step = first_step, step


def record_status(run_dir: Path, **fields: Any) -> None:
    """`update_run_status` on an error path: a failure to write (a full disk) must not hide
    the error being recorded."""
    try:
        update_run_status(run_dir, **fields)
    except OSError:
        pass


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
            "wandb_run_id": next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None),
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
            status = "diverged" if isinstance(exception, DivergedError) else "failed"
            record_status(self.run_dir, status=status, error=f"{type(exception).__name__}: {exception}",
                          global_step=trainer.global_step)


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
    """SIGINT (Ctrl-C), SIGTERM (`timeout`, `kill`, SLURM's `scancel`) or SIGUSR1 (SLURM's
    warning before pre-emption, e.g. `#SBATCH --signal=SIGUSR1@90`) -> finish the current
    step, save `last.ckpt` of it, record status `interrupted` and stop. `signal_received`
    tells effvid-train which signal it was (it exits 0 for SIGUSR1, 128 + the signal number
    otherwise). A second Ctrl-C stops at once, without a checkpoint.

    In a single process the handler asks Lightning to stop after the current step. In a DDP
    run it only raises a flag, and every rank's flag is combined at the end of each step (one
    all-reduce), so all ranks stop after the same step even when the signal reached only some
    of them. Data-loader workers ignore the signals
    (`datamodules/loaders.py`), so they are still there to be shut down. Under SLURM with
    Lightning's auto-requeue, Lightning owns SIGUSR1 (an hpc checkpoint and `scontrol
    requeue`); this callback then leaves that signal alone.
    """

    def __init__(self, checkpoint_dir: str | Path, run_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_dir = Path(run_dir)
        self.signal_received: int | None = None
        self.stop_requested = False
        self._trainer: Any = None

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if not self.stop_requested:
            print(f"effvid: {signal.Signals(signum).name} received: stopping after this step with a checkpoint"
                  + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""), flush=True)
        self.stop_requested = True
        self.signal_received = self.signal_received or signum
        if self._trainer is not None and not _distributed():
            self._trainer._signal_connector.received_sigterm = True  # Lightning stops after this step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its own handlers (it restores the originals at teardown).
        self._trainer = trainer
        for signum in STOP_SIGNALS:
            if signum == signal.SIGUSR1 and signal.getsignal(signum) not in (signal.SIG_DFL, None):
                continue  # Lightning's SLURM auto-requeue handler
            signal.signal(signum, self._request_stop)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not (_distributed() and trainer.world_size > 1):
            return  # the handler has told Lightning already
        if trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False):
            trainer._signal_connector.received_sigterm = True  # every rank stops after this step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_dir / "last.ckpt"
        saved = weights_are_finite(pl_module)
        if saved:
            trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            record_status(self.run_dir, status="interrupted", global_step=trainer.global_step,
                          checkpoint=str(path) if saved else None)


class DivergenceGuard(Callback):
    """Stops the run (`DivergedError`, status `diverged`) when the training loss is not finite
    for `patience` steps in a row. Checkpoints of non-finite weights are never written
    (`RunCheckpoint`), so `last.ckpt` stays the last finite one. The decision is taken over all
    ranks, so DDP ranks stop together."""

    def __init__(self, patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"divergence patience must be >= 1, got {patience}")
        self.patience = patience
        self.streak = 0
        self.first_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            loss = trainer.callback_metrics.get("train/loss")
        finite = loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all())
        if _distributed() and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.streak, self.first_step = 0, None
            return
        self.streak += 1
        self.first_step = self.first_step if self.first_step is not None else trainer.global_step
        if self.streak >= self.patience:
            raise DivergedError(
                f"the training loss was not finite for {self.streak} steps in a row (steps {self.first_step}.."
                f"{trainer.global_step}; callbacks.divergence.patience={self.patience})",
                self.first_step, trainer.global_step,
            )


class DataHealthLogger(Callback):
    """Logs `data/skipped_samples`: bad samples the datamodule skipped so far, all workers of
    all ranks (summed across ranks; every rank logs at the same steps, as the reduction needs)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        skipped = getattr(trainer.datamodule, "num_skipped_samples", None)
        if skipped is not None and (trainer.global_step % max(trainer.log_every_n_steps, 1) == 0):
            pl_module.log("data/skipped_samples", float(skipped), on_step=True, on_epoch=False, sync_dist=True,
                          reduce_fx="sum")
