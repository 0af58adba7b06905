"""StoryDiffusion's consistent self-attention on one trained digits run: does a batch keep one
handwriting, and does each clip keep its digit?

    python -m benchmarks.consistent_attention --ckpt runs/RUN_ID/checkpoints/last.ckpt --groups 20

Each group is one digit in four directions (one batch, like a story's frames), sampled from the
same seed with plain and with consistent self-attention (`lit_models/training_free.py`). The
handwriting similarity of a group is the mean pairwise cosine similarity of its clips' mean
8x8 digit crops (`lit_models.metrics.locate_digits`, the crops the digit classifier reads);
the difference is taken group by group (paired), with its standard error.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from lit_models.metrics import locate_digits, score_digit_videos
from lit_models.training_free import ConsistentSelfAttention

DIRECTION_SETS = (("up", "left", "down-right", "right"), ("down", "right", "up-left", "left"))


def handwriting_similarity(videos: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the clips' mean digit crops, videos `(B, C, F, H, W)`."""
    intensity = (videos.float().mean(dim=1).clamp(-1, 1) + 1) / 2  # (B, F, H, W)
    crops = locate_digits(rearrange(intensity, "b f h w -> (b f) h w"))[0]
    per_clip = rearrange(crops, "(b f) h w -> b f (h w)", b=videos.shape[0]).mean(dim=1)  # (B, 64)
    pairs = list(itertools.combinations(range(len(per_clip)), 2))
    return float(torch.stack([F.cosine_similarity(per_clip[i], per_clip[j], dim=0) for i, j in pairs]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint path, run id or 'latest'")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--groups", type=int, default=20, help="groups (one digit, four directions)")
    parser.add_argument("--rate", type=float, default=0.5, help="share of the other clips' tokens")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from experiments.run_dir import resolve_checkpoint
    from experiments.sample import load_model

    torch.set_num_threads(args.threads)
    run_dir, ckpt = resolve_checkpoint(args.ckpt, Path(args.runs_dir))
    model, _ = load_model(ckpt, run_dir)
    rows = {"plain": [], "consistent": []}
    accuracy = {"plain": [], "consistent": []}
    for group in range(args.groups):
        digit, directions = group % 10, DIRECTION_SETS[(group // 10) % len(DIRECTION_SETS)]
        prompts = [f"a handwritten {digit} moving {d}" for d in directions]
        for name, modifiers in (("plain", []), ("consistent", [ConsistentSelfAttention(args.rate, seed=group)])):
            model.sampling_modifiers = modifiers
            videos = model.generate(prompts, seed=group, steps=args.steps)
            rows[name].append(handwriting_similarity(videos))
            accuracy[name].append(score_digit_videos(videos, [digit] * 4, list(directions))["digit_accuracy"])
        print(f"group {group}: similarity plain {rows['plain'][-1]:.3f} consistent {rows['consistent'][-1]:.3f}", flush=True)
    difference = torch.tensor(rows["consistent"]) - torch.tensor(rows["plain"])
    print(f"{ckpt}: {args.groups} groups x 4 clips, DPM-Solver++ {args.steps} steps, rate {args.rate}")
    print("| attention | handwriting similarity | digit accuracy |\n|---|---|---|")
    for name in rows:
        print(f"| {name} | {sum(rows[name]) / len(rows[name]):.3f} | {sum(accuracy[name]) / len(accuracy[name]):.3f} |")
    print(f"consistent - plain: {difference.mean():+.3f} +- {difference.std() / len(difference) ** 0.5:.3f} (paired s.e.)")


if __name__ == "__main__":
    main()
