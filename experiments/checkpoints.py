"""Checkpoint files: written atomically, read without unpickling code, checked against the model.

`AtomicCheckpointIO` is the Trainer's checkpoint plugin (`trainer.plugins` in the trainer
configs): every checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over the target, so a process killed during a save leaves the previous
`last.ckpt` whole. Loading always uses `torch.load(weights_only=True)`: a checkpoint cannot
run code, whatever it contains.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data_tools.atomic_files import write_error
from experiments.run_dir import RunError


def weights_are_finite(module: torch.nn.Module) -> bool:
    """No parameter of `module` holds a NaN or an infinity (buffers may: masks, schedules)."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.is_floating_point())


def save_atomic(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` to `path` through a temp file + fsync + rename (never a partial file).
    A failed write (e.g. a full disk) removes the temp file and raises `WriteError` naming
    `path`; the previous file at `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise write_error(error, path) from error
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
    """Load a checkpoint with `weights_only=True`, naming the file when it cannot be read.
    `mmap` applies to zip checkpoints; a legacy (plain pickle) file is read without it, so its
    refusal names what is wrong with it rather than the memory map."""
    try:
        if mmap and not _is_zip_file(path):
            mmap = False
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RunError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {detail}") from exc


def _is_zip_file(path: str | Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return True  # let torch.load name the problem


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
    """`ModelCheckpoint` that also saves the final step, keeps one `last.ckpt` and never writes
    non-finite weights.

    Lightning's saves `last.ckpt` at the end of training only when no checkpoint was saved at
    all, so when `max_steps` is not a multiple of `every_n_train_steps` the steps after the
    last periodic save would be lost (and a run extended with `resume=` would redo them).
    The final save happens at the last batch, before EMAWeightAveraging copies the average
    into the raw weights at train end, so it holds both, like every periodic checkpoint.

    Lightning's version counter would write `last-v1.ckpt` next to a `last.ckpt` it did not
    write itself in this process (the pre-emption save, a copied run folder), leaving
    `last.ckpt` stale; here `last.ckpt` is always overwritten. A checkpoint of weights holding
    NaN or infinity is skipped with a warning (a diverging run keeps its last finite one).
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not weights_are_finite(trainer.lightning_module):
            warnings.warn(f"not writing {filepath}: the weights hold NaN or infinity at step {trainer.global_step}",
                          stacklevel=2)
            return
        super()._save_checkpoint(trainer, filepath)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if final_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

