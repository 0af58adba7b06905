"""Full fine-tuning vs parameter-efficient methods on one backbone and batch: trainable
fraction, peak memory and step time, in one run.

Backbone: the quickstart's factorized U-Net (channels 24/48/64, temporal attention) with a
frozen tiny text tower; batch 16 clips x 8 frames x 16x16, one channel; AdamW. Methods:
full fine-tune, LoRA (rank 4 on the spatial and temporal attention), SimDA adapters, the
temporal layers alone (the factorized net's "motion module", AnimateDiff's recipe), and a
ControlNet-style branch. Goal from the issue: LoRA and adapters train <= 5% of the
parameters with <= 0.6x the full fine-tune's peak memory.

Peak memory on a CPU: each method runs in its own fresh process; the number is the peak
resident set size (`ru_maxrss`) reached during the training steps minus the resident size
just before the first step (model, text tower and libraries already loaded). It counts
activations kept for backward, gradients and optimizer state, as allocated by the CPU
allocator; on a GPU the script reports `torch.cuda.max_memory_allocated` instead.

    python -m benchmarks.peft [--steps 6] [--threads 2]

(As a module: run as a file, this script's folder would come first on sys.path and its name
would shadow the `peft` package.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "adapters", "temporal_only", "control")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(method: str, steps: int, threads: int, batch_size: int, channels: tuple[int, ...]) -> dict:
    import torch
    from diffusers import DDPMScheduler

    from lit_models.conditioning import OpenClipTextEncoder
    from lit_models.nets import FactorizedUNet, TemporalAttention
    from lit_models.fine_tuning import count_parameters
    from lit_models.peft import ControlBranch, LoRA, ParameterEfficientFineTuning, SimDAAdapters, TrainOnly

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = FactorizedUNet(in_channels=1, channels=channels, temporal=partial(TemporalAttention, heads=4))
    trainable = {
        "full": [],
        "lora": [LoRA(target_modules=r".*(self_attention|cross_attention|temporal)\.(to_q|to_kv|to_qkv|to_out)$", rank=4, alpha=4)],
        "adapters": [SimDAAdapters()],
        "temporal_only": [TrainOnly(r"\.temporal\.")],
        "control": [ControlBranch()],
    }[method]
    text_encoder = OpenClipTextEncoder(model_name=None, text_cfg={"width": 64, "layers": 2, "heads": 4, "context_length": 16,
                                                                  "vocab_size": 49408}, embed_dim=64)  # fmt: skip
    module = ParameterEfficientFineTuning(
        net=net, text_encoder=text_encoder, trainable=trainable, noise_scheduler=DDPMScheduler(prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=1e-4), control_signal="sobel_edges" if method == "control" else None,
    )  # fmt: skip
    # The text tower is frozen in every method; count the denoiser (what each method adapts).
    trained, total = count_parameters(module.net)
    optimizer = module.configure_optimizers()
    batch = {"video": torch.rand(batch_size, 1, 8, 16, 16) * 2 - 1, "caption": ["a handwritten 3 moving up"] * batch_size}
    cuda = torch.cuda.is_available()
    if cuda:
        module.cuda()
        batch["video"] = batch["video"].cuda()
        torch.cuda.reset_peak_memory_stats()
    before = current_rss_mb()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = module.diffusion_loss(batch["video"], module.condition(batch, drop=False)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"method": method, "trainable": trained, "total": total, "peak_mb": peak,
            "step_s": sorted(times[1:])[len(times[1:]) // 2], "memory": "cuda_max_allocated" if cuda else "cpu_peak_rss_delta"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per method (first is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one method, in a child process
    parser.add_argument("--channels", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        channels = tuple(int(c) for c in args.channels.split(","))
        print(json.dumps(measure(args.method, args.steps, args.threads, args.batch_size, channels)))
        return
    # Two regimes: the quickstart backbone at its batch (activations dominate memory), and a
    # wider backbone at a small batch (weights, gradients and AdamW state dominate, as when
    # fine-tuning a large pretrained model).
    for channels, batch_size in (((24, 48, 64), args.batch_size), ((128, 256, 384), 2)):
        rows = []
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.peft", "--method", method, "--steps", str(args.steps),
                 "--threads", str(args.threads), "--batch-size", str(batch_size), "--channels", ",".join(map(str, channels))],
                cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        full = rows[0]
        print(f"\nchannels {channels}, batch {batch_size} x 8 frames x 16x16, {args.steps} steps, {args.threads} threads; "
              f"memory: {full['memory']}")
        print("| method | trainable / total | trainable % | peak MB | x full | s/step (median) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['trainable']:,} / {r['total']:,} | {100 * r['trainable'] / r['total']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / full['peak_mb']:.2f} | {r['step_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
