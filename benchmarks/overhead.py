"""effvid's per-step overhead: the quickstart model trained on one fixed batch by a bare PyTorch
loop, by a bare Lightning Trainer, and by effvid's Trainer set-up (callbacks, logger), in one run.

    python -m benchmarks.overhead [--steps 20] [--rounds 3] [--threads 2]

Every row trains the same model (the `digits_quickstart` config, freshly initialised with the
same seed) on the same in-memory batch, so data loading is excluded and only what happens
around the step differs. Rows are measured in interleaved rounds (bare, lightning, effvid,
bare, ...) so load from other processes hits all rows alike; a row's figure is the median
over rounds of its median step time. The ratio column is relative to the bare loop; the goal
for effvid's row is <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from experiments.run_dir import runs_root

CAPTIONS = [f"a handwritten {i % 10} moving up-left" for i in range(16)]


class RepeatBatch(IterableDataset):
    """The same batch, `steps` times (batch_size=None loaders pass it through untouched)."""

    def __init__(self, batch: dict[str, Any], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.steps):
            yield {"video": self.batch["video"], "caption": list(self.batch["caption"]),
                   "key": list(self.batch["key"]), "meta": self.batch["meta"]}


class StepClock(Callback):
    """Times from one training batch start to the next: everything a step costs."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())


# The frozen text tower the quickstart conditions on (runs/digits-text, see the Makefile); the
# benchmarks' own runs go to a temporary folder, where it is not.
TEXT_TOWER = runs_root().resolve() / "digits-text" / "checkpoints" / "last.ckpt"


def compose_config(runs_dir: Path, steps: int) -> DictConfig:
    with initialize_config_module(version_base="1.3", config_module="experiments.conf"):
        return compose("train", overrides=[
            "experiment=digits_quickstart", f"runs_dir={runs_dir}", "run_id=overhead", "data_root=/nonexistent",
            f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "+trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", f"paradigm.text_encoder.weights={TEXT_TOWER}",
        ])


def make_batch(cfg: DictConfig) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.num_frames, cfg.data.size, cfg.data.size)
    video = torch.rand(shape, generator=generator) * 2 - 1  # (B, C, F, H, W)
    return {"video": video, "caption": CAPTIONS[: shape[0]], "key": [str(i) for i in range(shape[0])],
            "meta": [{} for _ in range(shape[0])]}


def make_model(cfg: DictConfig) -> L.LightningModule:
    L.seed_everything(cfg.seed, verbose=False)
    return instantiate(cfg.paradigm, net=instantiate(cfg.model))


def bare_loop(cfg: DictConfig, batch: dict[str, Any], steps: int) -> list[float]:
    """The step a hand-written PyTorch loop does: loss, backward, clip, AdamW, LR schedule."""
    model = make_model(cfg)
    model.train()
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.diffusion_loss(batch["video"], model.condition(batch, drop=True)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss.item()  # Lightning reads the loss for its progress bar and logging
        times.append(time.perf_counter() - start)
    return times


def lightning_loop(cfg: DictConfig, batch: dict[str, Any], steps: int, effvid: bool, run_dir: Path) -> list[float]:
    """A Trainer over the same batch: bare (no callbacks, logger or checkpoints) or effvid's
    full set-up (the config's callbacks incl. EMA, RNG states, checkpoints; W&B offline)."""
    from experiments.train import build

    model = make_model(cfg)
    clock = StepClock()
    if effvid:
        _, _, trainer = build(cfg, run_dir)
        trainer.callbacks.append(clock)
    else:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[clock],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            gradient_clip_val=cfg.trainer.gradient_clip_val, limit_val_batches=0)
    loader = DataLoader(RepeatBatch(batch, steps + 1), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    if effvid:
        import wandb

        wandb.finish()
    return [b - a for a, b in zip(clock.starts, clock.starts[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import os
    import warnings

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    medians: dict[str, list[float]] = {"bare PyTorch loop": [], "Lightning Trainer (bare)": [], "effvid-train set-up": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            steps = args.warmup + args.steps
            cfg = compose_config(Path(tmp) / f"round{round_index}", steps)
            batch = make_batch(cfg)
            rows = {
                "bare PyTorch loop": lambda: bare_loop(cfg, batch, steps),
                "Lightning Trainer (bare)": lambda: lightning_loop(cfg, batch, steps, False, Path(tmp)),
                "effvid-train set-up": lambda: lightning_loop(cfg, batch, steps, True,
                                                              Path(tmp) / f"round{round_index}" / "overhead"),
            }
            for name, run in rows.items():
                times = run()[args.warmup:]
                medians[name].append(statistics.median(times))

    bare = statistics.median(medians["bare PyTorch loop"])
    print(f"\nquickstart model, batch {tuple(batch['video'].shape)}, {args.steps} timed steps x {args.rounds} rounds, "
          f"{args.threads} threads")
    print(f"{'loop':28s} {'s/step':>8s} {'ratio':>6s}   per-round medians")
    for name, values in medians.items():
        figure = statistics.median(values)
        print(f"{name:28s} {figure:8.4f} {figure / bare:6.3f}   " + " ".join(f"{v:.4f}" for v in values))


if __name__ == "__main__":
    main()
