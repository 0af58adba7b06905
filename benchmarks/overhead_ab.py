"""The per-step overheads issue 15 removed, measured as a paired ratio in one process:

    python -m benchmarks.overhead_ab [--steps 30] [--rounds 4] [--threads 1]

A = effvid-train's Trainer set-up as it was (Lightning's EMAWeightAveraging, per-tensor AdamW,
the frozen text tower re-encoding every caption each step), B = as it is (ForeachEMA, fused
AdamW, the tower's caption cache). Both train the quickstart model on one fixed batch with the
EMA on from step 0 (in the quickstart it is on for the last 1,000 of 1,200 steps). Rows
alternate A, B, A, B, ... so load from other processes hits both alike; each row's figure is
its median step time, wall clock and process CPU time; the ratio A/B is per round.

Measured on the shared 2-core machine (2026-12-03, 4 rounds of 30 steps at one thread):
A/B 0.97 / 1.06 / 1.00 / 1.05 in CPU time (median 1.03), 1.02 / 1.07 / 1.02 / 1.06 wall
(median 1.04); an earlier set under heavier load, median 1.02 CPU. Some 3-4 %, not the ~8 %
the components' own timings (EMA ~29 -> ~4 ms, AdamW ~9 -> ~2 ms of ~0.45 s) suggest.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from benchmarks.overhead import RepeatBatch, StepClock, benchmark_args, compose_config, make_batch, make_model

BEFORE = ["callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", "paradigm.optimizer.fused=false",
          "paradigm.text_encoder.cached_captions=0"]


class CpuStepClock(StepClock):
    """StepClock plus the process's CPU time at every training batch start."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        super().on_train_batch_start(*args)
        self.cpu.append(time.process_time())


def median_step(runs_dir: Path, run_id: str, overrides: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """(wall, CPU) median seconds per step of effvid's Trainer set-up under `overrides`."""
    import wandb

    from experiments.train import build

    cfg = compose_config(runs_dir / run_id, steps, ["callbacks.ema.update_starting_at_step=0", *overrides])
    batch, model, clock = make_batch(cfg), make_model(cfg), CpuStepClock()
    _, _, trainer = build(cfg, runs_dir / run_id / "overhead")
    trainer.callbacks.append(clock)
    trainer.fit(model, train_dataloaders=DataLoader(RepeatBatch(batch, steps + 1), batch_size=None))
    wandb.finish()
    wall = [b - a for a, b in zip(clock.starts, clock.starts[1:])][warmup:]
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])][warmup:]
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    args = benchmark_args(__doc__.split("\n")[0], steps=30, rounds=4, threads=1)

    rows: dict[str, list[tuple[float, float]]] = {"A before": [], "B after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name, overrides in (("A before", BEFORE), ("B after", [])):
                run_id = f"{name[0]}{round_index}"
                rows[name].append(median_step(Path(tmp), run_id, overrides, args.steps + args.warmup, args.warmup))
    print(f"\nquickstart set-up, EMA on, {args.steps} timed steps x {args.rounds} rounds, {args.threads} threads")
    for name, values in rows.items():
        print(f"{name:9s} wall s/step " + " ".join(f"{w:.4f}" for w, _ in values)
              + "   cpu s/step " + " ".join(f"{c:.4f}" for _, c in values))
    for index, label in ((0, "wall"), (1, "cpu")):
        ratios = [a[index] / b[index] for a, b in zip(rows["A before"], rows["B after"])]
        print(f"A/B {label:4s} " + " ".join(f"{r:.3f}" for r in ratios) + f"   median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
