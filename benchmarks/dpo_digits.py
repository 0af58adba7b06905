"""Does Diffusion-DPO on a pretrained digits model raise the reward on held-out prompts?

One script, one table: base vs SFT-on-winners vs DPO at equal steps, on the embedded default.

1. Split the 80 digit x direction captions into training and held-out prompts (every 5th
   combination is held out: 16 prompts, each digit and direction appears in both sets).
2. `effvid-data pairs`: K samples per training prompt from the base, scored by the digit
   reward, best vs worst.
3. `effvid-train experiment=dpo_digits` twice from the same base with the same LoRA, steps,
   batch and learning rate: objective=dpo and objective=sft (the baseline).
4. Sample every model on the held-out prompts with the same seeds and sampler; report the
   mean digit reward (and its standard error) and the digit metric.

    python -m benchmarks.dpo_digits --base runs/base-digits/checkpoints/last.ckpt \
        --work /tmp/dpo-digits --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lit_models.metrics import DIRECTIONS

REPO = Path(__file__).resolve().parents[1]


def split_prompts() -> tuple[list[str], list[str]]:
    combos = [f"a handwritten {d} moving {direction}" for d in range(10) for direction in DIRECTIONS]
    held_out = combos[::5]
    return [c for c in combos if c not in held_out], held_out


def run(cmd: list[str], log: Path) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    env = os.environ | {"PYTHONPATH": str(REPO), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with open(log, "a") as stream:
        result = subprocess.run(cmd, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}; see {log}")


@torch.no_grad()
def evaluate(ckpt: Path, prompts: list[str], samples_per_prompt: int, seed: int, steps: int, guidance: float,
             batch_size: int = 64) -> dict[str, float]:
    from lit_models.bundle import load_run_module
    from lit_models.metrics import parse_digit_caption, score_digit_videos
    from lit_models.rewards import digit_reward

    module = load_run_module(ckpt)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    rewards, videos = [], []
    for index, start in enumerate(range(0, len(expanded), batch_size)):
        chunk = expanded[start : start + batch_size]
        batch = module.generate(chunk, sampler="dpmpp", steps=steps, guidance_scale=guidance, seed=seed + index)
        rewards.append(digit_reward(batch, chunk))
        videos.append(batch)
    reward = torch.cat(rewards)
    parsed = [parse_digit_caption(p) for p in expanded]
    metric = score_digit_videos(torch.cat(videos), [d for d, _ in parsed], [r for _, r in parsed])
    return {
        "reward": reward.mean().item(),
        "reward_se": (reward.std() / len(reward) ** 0.5).item(),
        "reward_nonzero": (reward > 0).float().mean().item(),
        **metric,
        "videos": len(expanded),
        "per_video_reward": [round(r, 5) for r in reward.tolist()],
    }


def paired_gain(result: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    """Mean reward gain over `base` and its standard error, video by video: both sampled the
    same prompts from the same seeds, so the pairing removes most of the noise the seeds add."""
    gain = torch.tensor(result["per_video_reward"]) - torch.tensor(base["per_video_reward"])
    return gain.mean().item(), (gain.std() / len(gain) ** 0.5).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "runs/base-digits/checkpoints/last.ckpt")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpo-digits"))
    parser.add_argument("--per-prompt", type=int, default=4, help="samples per training prompt for pairs")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the training prompts for pairs")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of DPO and of SFT")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=5000.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=12, help="samples per held-out prompt")
    parser.add_argument("--seed", type=int, default=1000, help="evaluation sampling seed (pairs use 0)")
    parser.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++ steps, pairs and evaluation")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale, pairs and evaluation")
    parser.add_argument("--error-space", default="epsilon", choices=("epsilon", "prediction"))
    parser.add_argument("--eval-only", type=Path, help="only evaluate this checkpoint on the held-out prompts "
                        "(to score several models in parallel processes); writes WORK/eval-NAME.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.eval_only:
        name = args.eval_only.parent.parent.name
        result = evaluate(args.eval_only, split_prompts()[1], samples_per_prompt=args.eval_samples, seed=args.seed,
                          steps=args.sample_steps, guidance=args.guidance)
        (args.work / f"eval-{name}.json").write_text(json.dumps({"ckpt": str(args.eval_only), **result}, indent=1))
        print(json.dumps(result))
        return
    log = args.work / "commands.log"
    started = time.time()
    stamp = time.strftime("%H%M%S")
    train_prompts, held_out = split_prompts()
    (args.work / "train_prompts.txt").write_text("\n".join(train_prompts * args.repeats) + "\n")
    (args.work / "held_out_prompts.txt").write_text("\n".join(held_out) + "\n")

    pairs = args.work / "pairs"
    if not (pairs / "_stats.json").exists():
        run([sys.executable, "-m", "data_tools.cli", "pairs", "--ckpt", str(args.base), "--prompts",
             str(args.work / "train_prompts.txt"), "--out", str(pairs), "--per-prompt", str(args.per_prompt),
             "--reward", "digits", "--steps", str(args.sample_steps), "--guidance", str(args.guidance)], log)  # fmt: skip
    pair_stats = json.loads((pairs / "_stats.json").read_text())
    print(f"pairs: {pair_stats['pairs']} ({time.time() - started:.0f} s)", flush=True)

    runs_dir = args.work / "runs"
    run_ids = {}
    for objective in ("dpo", "sft"):
        run_id = f"{objective}-digits-{stamp}"
        run_ids[objective] = run_id
        run([sys.executable, "-m", "experiments.train", "experiment=dpo_digits", f"run_id={run_id}",
             f"runs_dir={runs_dir}", f"pretrained={args.base}", f"pairs_dir={pairs}",
             f"paradigm.objective={objective}", f"paradigm.beta={args.beta}", f"paradigm.optimizer.lr={args.lr}",
             f"paradigm.error_space={args.error_space}", f"paradigm.sample_steps={args.sample_steps}",
             f"paradigm.guidance_scale={args.guidance}",
             f"paradigm.trainable.0.rank={args.rank}", f"paradigm.trainable.0.alpha={args.rank}",
             f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
             f"callbacks.checkpoint.every_n_train_steps={args.steps}", f"data.batch_size={args.batch_size}",
             "+trainer.enable_progress_bar=false"], log)  # fmt: skip
        print(f"{objective}: trained ({time.time() - started:.0f} s)", flush=True)

    settings = dict(samples_per_prompt=args.eval_samples, seed=args.seed, steps=args.sample_steps, guidance=args.guidance)
    results = {"base": evaluate(args.base, held_out, **settings)}
    print(f"base: evaluated ({time.time() - started:.0f} s)", flush=True)
    for objective, run_id in run_ids.items():
        results[objective] = evaluate(runs_dir / run_id / "checkpoints" / "last.ckpt", held_out, **settings)
        print(f"{objective}: evaluated ({time.time() - started:.0f} s)", flush=True)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "pairs": pair_stats, "run_ids": run_ids,
               "results": results, "seconds": round(time.time() - started)}  # fmt: skip
    (args.work / "results.json").write_text(json.dumps(summary, indent=1))

    print(f"\nheld-out prompts: {len(held_out)} x {args.eval_samples} samples; {pair_stats['pairs']} training pairs; "
          f"{args.steps} steps, batch {args.batch_size}, LoRA rank {args.rank}, lr {args.lr}, beta {args.beta}")
    print("| model | run id | mean reward (± s.e.) | gain over base (paired s.e.) | reward > 0 | digit acc | direction acc |")
    print("|---|---|---|---|---|---|---|")
    for name, key in (("base", "base"), ("SFT on winners", "sft"), ("Diffusion-DPO", "dpo")):
        r = results[key]
        gain, gain_se = paired_gain(r, results["base"])
        print(f"| {name} | {run_ids.get(key, 'base')} | {r['reward']:.4f} ± {r['reward_se']:.4f} | {gain:+.4f} ± {gain_se:.4f} | "
              f"{r['reward_nonzero']:.3f} | {r['digit_accuracy']:.3f} | {r['direction_accuracy']:.3f} |")
    print(f"total {time.time() - started:.0f} s; {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
