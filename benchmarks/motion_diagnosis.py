"""Why does a moving-digits model ignore the direction in its caption? Three measurements.

    python -m benchmarks.motion_diagnosis motion --ckpt runs/RUN_ID/checkpoints/last.ckpt [--videos 80]
    python -m benchmarks.motion_diagnosis probe [--ckpt CKPT] [--seeds 5]
    python -m benchmarks.motion_diagnosis metric [--videos 80]

`motion`: do samples move? The digit's centre of mass (the window the digit metric crops)
per frame, in samples of the 80 prompts (8 directions x 10 digits) and in held-out real clips
drawn the way the datamodule draws them: mean speed (pixels per frame, first -> last), mean
cosine between the displacement and the prompted direction (1 = on course, 0 = unrelated),
and the circular spread of the displacement's angle around the prompted one (degrees; about
104 for angles uniform on the circle).

`probe`: does the text tower's output carry the direction? A logistic-regression probe of
the direction (8 classes) on the pooled feature and on the mean of the real tokens' features
for the 80 captions, scored on digits it did not see (leave-one-digit-out, 10 folds), and of
the digit on directions it did not see (leave-one-direction-out). At init (random towers,
`--seeds` of them) and, with `--ckpt`, the run's trained tower.

`metric`: the video metric (`lit_models.video_classifier`) on clips whose answer is known.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from lit_models.digit_scores import digit_scores
from lit_models.metrics import DIRECTIONS, locate_digits, parse_digit_caption, score_digit_videos
from lit_models.video_classifier import real_digit_clips

CAPTIONS = [f"a handwritten {digit} moving {direction}" for direction in DIRECTIONS for digit in range(10)]


def centroid_tracks(videos: torch.Tensor, digit_fraction: float = 0.5) -> torch.Tensor:
    """Centre of mass `(B, F, 2)` (row, col) per frame of videos `(B, C, F, H, W)` in [-1, 1]."""
    intensity = (videos.float().mean(dim=1).clamp(-1, 1) + 1) / 2  # (B, F, H, W)
    batch_size, num_frames = intensity.shape[:2]
    _, rows, cols = locate_digits(intensity.flatten(0, 1), digit_fraction)
    return torch.stack([rows, cols], dim=-1).view(batch_size, num_frames, 2)


def motion_statistics(videos: torch.Tensor, directions: list[str]) -> dict[str, float]:
    """Speed (px/frame, first -> last), cosine to the prompted direction and circular spread
    (degrees) of the angle error, for videos `(B, C, F, H, W)` prompted with `directions`."""
    tracks = centroid_tracks(videos)
    displacement = tracks[:, -1] - tracks[:, 0]  # (B, 2)
    speed = displacement.norm(dim=1) / (tracks.shape[1] - 1)
    prompted = torch.tensor([DIRECTIONS[d] for d in directions])  # (B, 2) unit (dy, dx)
    cosine = (displacement * prompted).sum(dim=1) / displacement.norm(dim=1).clamp_min(1e-6)
    error = torch.atan2(displacement[:, 0], displacement[:, 1]) - torch.atan2(prompted[:, 0], prompted[:, 1])
    resultant = torch.stack([error.cos().mean(), error.sin().mean()]).norm()
    spread = math.degrees(math.sqrt(-2 * math.log(max(float(resultant), 1e-12))))
    # Frame-to-frame steps, to tell jitter from drift: a path that wanders has mean step >> net speed.
    step = (tracks[:, 1:] - tracks[:, :-1]).norm(dim=-1).mean()
    return {"speed": float(speed.mean()), "step": float(step), "cosine": float(cosine.mean()), "spread_deg": spread}


def motion(args: argparse.Namespace) -> None:
    from experiments.run_dir import resolve_checkpoint
    from experiments.sample import load_model

    torch.set_num_threads(args.threads)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.videos)]
    digits, directions = (list(labels) for labels in zip(*(parse_digit_caption(p) for p in prompts)))
    real = real_digit_clips(digits, directions, seed=1)  # not the metric's reference clips (seed 0)
    rows = {"real held-out clips": {**motion_statistics(real, directions), **score_digit_videos(real, digits, directions)}}
    for ckpt_ref in args.ckpt:
        run_dir, ckpt = resolve_checkpoint(ckpt_ref, Path(args.runs_dir))
        model, _ = load_model(ckpt, run_dir)
        videos = []
        with torch.inference_mode():
            for first in range(0, len(prompts), args.batch):
                videos.append(model.generate(prompts[first : first + args.batch], guidance_scale=args.guidance, seed=first))
        videos = torch.cat(videos)
        rows[f"{run_dir.name} samples"] = {**motion_statistics(videos, directions), **digit_scores(prompts, videos, reward=False)}
    print(f"{args.videos} videos, prompts = 8 directions x 10 digits")
    print("| clips | speed (px/frame) | mean step (px) | cos to prompt | angle spread (deg) | direction acc. | digit acc. | video FD |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        extra = [f"{r[k]:.3f}" if k in r else "-" for k in ("direction_accuracy", "digit_accuracy", "video_fd")]
        print(f"| {name} | {r['speed']:.3f} | {r['step']:.3f} | {r['cosine']:.3f} | {r['spread_deg']:.0f} | {' | '.join(extra)} |")


def metric_check(args: argparse.Namespace) -> None:
    """The video metric on clips whose answer is known: real held-out clips, and the same
    clips with their frames shuffled, played backwards, or frozen at the first frame."""
    from lit_models.video_classifier import DigitVideoClassifier

    torch.set_num_threads(args.threads)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.videos)]
    digits, directions = (list(labels) for labels in zip(*(parse_digit_caption(p) for p in prompts)))
    real = real_digit_clips(digits, directions, seed=1)
    generator = torch.Generator().manual_seed(0)
    variants = {
        "real held-out clips": real,
        "frames shuffled": torch.stack([clip[:, torch.randperm(clip.shape[1], generator=generator)] for clip in real]),
        "played backwards": real.flip(2),
        "first frame frozen": real[:, :, :1].expand_as(real),
    }
    print(f"{args.videos} clips; classifier held-out accuracy {DigitVideoClassifier.load().held_out_accuracy}")
    print("| clips | digit acc. | temporal consistency | direction acc. | video FD |")
    print("|---|---|---|---|---|")
    for name, videos in variants.items():
        r = score_digit_videos(videos, digits, directions)
        print(f"| {name} | {r['digit_accuracy']:.3f} | {r['temporal_consistency']:.3f} | {r['direction_accuracy']:.3f} | {r['video_fd']:.2f} |")


def probe_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Leave-one-group-out accuracy of a logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    return float(cross_val_score(probe, features, labels, groups=groups, cv=LeaveOneGroupOut()).mean())


@torch.no_grad()
def text_features(encoder: torch.nn.Module) -> dict[str, np.ndarray]:
    embedding = encoder.encode(CAPTIONS)
    mask = embedding.mask[..., None].float()
    mean_tokens = (embedding.tokens * mask).sum(dim=1) / mask.sum(dim=1)
    return {"pooled": embedding.pooled.float().numpy(), "mean of tokens": mean_tokens.float().numpy()}


def probe_rows(encoder: torch.nn.Module) -> dict[str, tuple[float, float]]:
    parsed = [parse_digit_caption(c) for c in CAPTIONS]
    digits = np.array([d for d, _ in parsed])
    directions = np.array([list(DIRECTIONS).index(d) for _, d in parsed])
    return {
        name: (probe_accuracy(x, directions, groups=digits), probe_accuracy(x, digits, groups=directions))
        for name, x in text_features(encoder).items()
    }


def probe(args: argparse.Namespace) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.set_num_threads(args.threads)
    # The text_to_video paradigm's tower (its defaults list names this file; OmegaConf.load
    # alone does not resolve a defaults list).
    tower = OmegaConf.load(Path(__file__).parents[1] / "experiments/conf/paradigm/text_encoder/open_clip_tiny.yaml")
    print("| text tower | feature | direction probe acc. (unseen digits) | digit probe acc. (unseen directions) |")
    print("|---|---|---|---|")
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        for name, accuracy in probe_rows(instantiate(tower)).items():
            results.setdefault(name, []).append(accuracy)
    for name, values in results.items():
        direction, digit = np.mean(values, axis=0)
        print(f"| init ({args.seeds} seeds) | {name} | {direction:.3f} | {digit:.3f} |")
    for ckpt_ref in args.ckpt or []:
        from experiments.run_dir import resolve_checkpoint
        from experiments.sample import load_model

        run_dir, ckpt = resolve_checkpoint(ckpt_ref, Path(args.runs_dir))
        model, _ = load_model(ckpt, run_dir)
        if getattr(model, "text_encoder", None) is None:
            print(f"| {run_dir.name} | - | no text tower | - |")
            continue
        for name, (direction, digit) in probe_rows(model.text_encoder).items():
            print(f"| {run_dir.name} | {name} | {direction:.3f} | {digit:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("motion", help="centroid speed and direction of samples vs real clips")
    m.add_argument("--ckpt", nargs="+", required=True, help="checkpoint paths or run ids")
    m.add_argument("--videos", type=int, default=80)
    m.add_argument("--batch", type=int, default=40)
    m.add_argument("--guidance", type=float, default=None, help="default: the run's")
    m.set_defaults(func=motion)
    c = sub.add_parser("metric", help="the video FD on real, shuffled, reversed and frozen clips")
    c.add_argument("--videos", type=int, default=80)
    c.set_defaults(func=metric_check)
    p = sub.add_parser("probe", help="linear probe of direction / digit on the text tower's outputs")
    p.add_argument("--ckpt", nargs="*", help="also probe these runs' trained towers")
    p.add_argument("--seeds", type=int, default=5, help="random towers at init")
    p.set_defaults(func=probe)
    for s in (m, c, p):
        s.add_argument("--runs-dir", default="runs")
        s.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
