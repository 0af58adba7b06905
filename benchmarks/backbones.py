"""Backbones at equal width on the digits clip shape: parameters, FLOPs of one forward pass
(torch's own FLOP counter), seconds per training step and peak memory (CUDA only), and,
with --train-steps, the digit accuracy after an equal training budget.

    python -m benchmarks.backbones                                  # all backbones, 16 x 8 x 16x16
    python -m benchmarks.backbones --models dit mamba --batch 8 --device cuda
    python -m benchmarks.backbones --train-steps 1200 --data-root data   # + a quickstart run each

Nets are built from their experiments/conf/model/ files, so the numbers describe exactly what
`model=NAME` trains.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

MODELS = ["factorized_unet", "dit", "uvit", "mamba", "latte", "cogvideox", "unet3d"]


def build(name: str, num_frames: int, size: int) -> tuple[torch.nn.Module, int, int]:
    with initialize_config_module(version_base="1.3", config_module="experiments.conf"):
        cfg = compose("train", overrides=[f"model={name}", "run_id=bench", f"data.num_frames={num_frames}", f"data.size={size}"])
    from lit_models.diffusion import build_net

    text = instantiate(cfg.paradigm.text_encoder)
    return build_net(instantiate(cfg.model), text), text.token_dim, text.pooled_dim


def measure(name: str, args: argparse.Namespace) -> dict[str, float | str]:
    torch.manual_seed(0)
    net, text_width, pooled_width = build(name, args.frames, args.size)
    net = net.to(args.device)
    x = torch.randn(args.batch, 1, args.frames, args.size, args.size, device=args.device)
    timesteps = torch.randint(0, 1000, (args.batch,), device=args.device)
    conditioning = {
        "context": torch.randn(args.batch, 16, text_width, device=args.device),
        "pooled": torch.randn(args.batch, pooled_width, device=args.device),
        "context_mask": torch.ones(args.batch, 16, dtype=torch.bool, device=args.device),
    }
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, timesteps, **conditioning)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x, timesteps, **conditioning), x).backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row: dict[str, float | str] = {
        "model": name,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "GFLOPs_fwd": counter.get_total_flops() / 1e9,
        "sec_per_step": min(times[args.warmup :]),
        "peak_mem_MB": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else "-",
    }
    if args.train_steps:
        row["digit_accuracy"] = train_accuracy(name, args)
    return row


def train_accuracy(name: str, args: argparse.Namespace) -> float:
    """The quickstart recipe with this backbone for `--train-steps` steps; its last val digit accuracy."""
    run_id = f"bench-{name}-{args.train_steps}"
    subprocess.run(
        [sys.executable, "-m", "experiments.train", "experiment=digits_quickstart", f"model={name}", f"run_id={run_id}",
         f"runs_dir={args.runs_dir}", f"data_root={args.data_root}", f"trainer.max_steps={args.train_steps}",
         f"trainer.val_check_interval={args.train_steps}", "logger.offline=true"],
        check=True,
    )  # fmt: skip
    status = json.loads((Path(args.runs_dir) / run_id / "run.json").read_text())
    return float(status["metrics"].get("val/digit_accuracy", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=0, help="also train each for this many steps (slow)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    columns = ["model", "params_M", "GFLOPs_fwd", "sec_per_step", "peak_mem_MB"] + (["digit_accuracy"] if args.train_steps else [])
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for name in args.models:
        row = measure(name, args)
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns), flush=True)


if __name__ == "__main__":
    main()
