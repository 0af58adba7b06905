"""Checkpoint files: written atomically, read without unpickling code, checked against the model.

`AtomicCheckpointIO` is the Trainer's checkpoint plugin (`trainer.plugins` in the trainer
configs): every checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over the target, so a process killed during a save leaves the previous
`last.ckpt` whole. Loading always uses `torch.load(weights_only=True)`: a checkpoint cannot
run code, whatever it contains.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from experiments.run_dir import RunError


def save_atomic(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` to `path` through a temp file + fsync + rename (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`, naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RunError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {detail}") from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin: atomic local saves, `weights_only=True` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's fsspec transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def check_checkpoint_fits(path: str | Path, model: torch.nn.Module) -> None:
    """Fail with a short message when `path` was saved by a different model than `model`
    (missing or unexpected weights, or other shapes), instead of Lightning's long trace."""
    checkpoint = load_checkpoint_file(path, mmap=True)
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        raise RunError(f"checkpoint {path} has no state_dict: not a Lightning checkpoint")
    ours = model.state_dict()
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    reshaped = [
        f"{name}: checkpoint {tuple(saved[name].shape)} vs model {tuple(ours[name].shape)}"
        for name in sorted(set(ours) & set(saved))
        if hasattr(saved[name], "shape") and tuple(saved[name].shape) != tuple(ours[name].shape)
    ]
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        problems.append(f"{len(reshaped)} with other shapes (e.g. {reshaped[0]})")
    raise RunError(
        f"checkpoint {path} was saved by a different model than this config builds: "
        + "; ".join(problems)
        + ". Resume with the run's own config (effvid-train resume=RUN_ID without model overrides)"
    )


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also saves the final step.

    Lightning's saves `last.ckpt` at the end of training only when no checkpoint was saved at
    all, so when `max_steps` is not a multiple of `every_n_train_steps` the steps after the
    last periodic save would be lost (and a run extended with `resume=` would redo them).
    The final save happens at the last batch, before EMAWeightAveraging copies the average
    into the raw weights at train end, so it holds both, like every periodic checkpoint.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if final_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

