"""Quality against cost of training-free and distilled sampling, on one trained digits run.

    python -m benchmarks.sampling --ckpt runs/RUN_ID/checkpoints/last.ckpt --results bench.jsonl
    python -m benchmarks.sampling --ckpt ... --samplers dpmpp --steps 20 --deepcache 2 3
    python -m benchmarks.sampling --ckpt runs/STUDENT/checkpoints/last.ckpt --label lcm-student \\
        --samplers lcm --steps 1 2 4 --guidance 1
    python -m benchmarks.sampling --table bench.jsonl --plot quality_vs_nfe.png

Every setting draws the same prompts (digits 0-9 x directions, cycled) from the same seed, and
reports NFE (network calls; a guided call evaluates the conditional and unconditional halves
as one batch), wall seconds per video, the digit metric (`lit_models.metrics`), the video
Frechet distance to real clips (`video_fd`, `lit_models.video_classifier`) and, where asked,
frame FID against held-out real clips (`lit_models.fid`; needs the `metrics` extra). Rows are
appended to a JSON-lines file so several invocations (teacher, students) make one table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lit_models.digit_scores import digit_scores
from lit_models.feature_cache import deep_cache
from lit_models.metrics import DIRECTIONS

COLUMNS = ("label", "sampler", "steps", "cache", "nfe", "sec_per_video", "digit_accuracy", "digit_se",
           "temporal_consistency", "direction_accuracy", "video_fd", "fid", "videos")  # fmt: skip
PER_VIDEO = "per_video_digit_accuracy"


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def digit_prompts(count: int, first: int = 0) -> list[str]:
    """Prompts of videos `first .. first + count - 1`: digits 0-9 x directions, cycled."""
    directions = list(DIRECTIONS)
    return [f"a handwritten {i % 10} moving {directions[(i * 3) % len(directions)]}" for i in range(first, first + count)]


def real_frames(data_root: str, run_cfg: Any, limit: int, where: str) -> torch.Tensor:
    """Up to `limit` held-out clips `(N, C, F, H, W)` from the run's validation shards
    (`run_cfg` is the config stored in checkpoint `where`)."""
    from omegaconf import OmegaConf

    from lit_models.trusted_config import instantiate_trusted

    data_cfg = OmegaConf.to_container(run_cfg.data, resolve=False)
    cfg = OmegaConf.create({"data": data_cfg, "data_root": data_root, "seed": 0})
    datamodule = instantiate_trusted(cfg.data, where, num_workers=0)
    datamodule.setup("fit")
    clips = []
    for batch in datamodule.val_dataloader():
        clips.append(datamodule.on_after_batch_transfer(batch, 0)["video"])  # uint8 frames -> float clips
        if sum(len(c) for c in clips) >= limit:
            break
    return torch.cat(clips)[:limit]


def measure(
    model: Any, prompts: list[str], sampler: str, steps: int, guidance: float, cache: int, seed: int, batch: int, first_video: int = 0
) -> tuple[torch.Tensor, int, float]:
    """Videos, network calls and wall seconds of sampling `prompts` in batches of `batch`.

    Batch `first` of the prompts starts from seed `seed + first_video + first`, so a run over
    videos 100-299 continues one over 0-99 with the same noise a single run over 0-299 draws."""
    from tqdm import tqdm

    calls = []
    videos = []
    start = time.perf_counter()
    for first in tqdm(range(0, len(prompts), batch), desc=f"{sampler} {steps} steps", unit="batch", leave=False):
        with deep_cache(model, cache):
            handle = model.net.register_forward_hook(lambda *_: calls.append(1))
            try:
                videos.append(model.generate(prompts[first : first + batch], sampler=sampler, steps=steps, guidance_scale=guidance, seed=seed + first_video + first))
            finally:
                handle.remove()
    seconds = time.perf_counter() - start
    batches = -(-len(prompts) // batch)
    return torch.cat(videos), len(calls) // batches, seconds


def run(args: argparse.Namespace) -> None:
    from experiments.run_dir import resolve_checkpoint
    from experiments.sample import load_model
    from lit_models.fid import frame_fid, video_frames_uint8

    torch.set_num_threads(args.threads)
    run_dir, ckpt = resolve_checkpoint(args.ckpt, Path(args.runs_dir))
    model, run_cfg = load_model(ckpt, run_dir)
    guidance = model.guidance_scale if args.guidance is None else args.guidance
    fid = None
    if args.fid_steps:
        fid = frame_fid()
        cache = Path(f"{args.results}.real-{args.fid_real_clips}x{args.fid_frames}.pt")
        if cache.exists():  # the real clips' Inception statistics, shared by invocations
            for name, value in torch.load(cache, weights_only=True).items():
                setattr(fid, name, value)
        else:
            real = real_frames(args.data_root, run_cfg, args.fid_real_clips, str(ckpt))
            for chunk in video_frames_uint8(real, args.fid_frames).split(32):
                fid.update(chunk, real=True)
            torch.save({name: getattr(fid, name) for name in REAL_STATES}, cache)
    settings = [(s, n, c) for s in args.samplers for n in args.steps for c in args.deepcache]
    settings += [("ddpm", 1000, 1)] if args.ddpm_1000 else []
    results = Path(args.results)
    with torch.inference_mode():  # warm-up: first-call allocations stay out of the timings
        model.generate(digit_prompts(args.batch), sampler="ddim", steps=1)
    for sampler, steps, cache in settings:
        count = args.ddpm_videos if steps == 1000 else args.videos
        prompts = digit_prompts(count, args.first_video)
        with torch.inference_mode():
            videos, nfe, seconds = measure(model, prompts, sampler, steps, guidance, cache, args.seed, args.batch, args.first_video)
        row = {"label": args.label or run_dir.name, "sampler": sampler, "steps": steps, "cache": cache, "nfe": nfe,
               "sec_per_video": seconds / count, "videos": count, "guidance": guidance, **digit_scores(prompts, videos, reward=False),
               "first_video": args.first_video, "seed": args.seed,
               "per_video_digit_accuracy": [round(digit_scores([p], v[None], reward=False)["digit_accuracy"], 4) for p, v in zip(prompts, videos)]}  # fmt: skip
        if fid is not None and (steps in args.fid_steps or steps == 1000):
            fid.reset()
            fid.update(video_frames_uint8(videos, args.fid_frames), real=False)
            row["fid"] = float(fid.compute())
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(format_row(row), flush=True)


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for key in COLUMNS:
        value = row.get(key)
        cells.append(f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value))
    return " | ".join(cells)


def merge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting: rows of the same label, sampler, steps, cache, guidance and seed
    over disjoint video ranges (`--first-video`) become one, their means weighted by videos.
    `digit_se` is the standard error of the digit accuracy over videos, where every part
    kept its per-video scores."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["label"], r["sampler"], r["steps"], r["cache"], r.get("guidance"), r.get("seed", 0))
        groups.setdefault(key, []).append(r)
    merged = []
    for parts in groups.values():
        ranges = sorted((p.get("first_video", 0), p.get("first_video", 0) + p["videos"]) for p in parts)
        if any(end > start for (_, end), (start, _) in zip(ranges, ranges[1:])):  # overlapping reruns: keep each
            merged.extend(parts)
            continue
        videos = sum(p["videos"] for p in parts)
        row = {**parts[0], "videos": videos, "first_video": ranges[0][0]}
        for key in ("sec_per_video", "digit_accuracy", "temporal_consistency", "direction_accuracy"):
            if all(key in p for p in parts):
                row[key] = sum(p[key] * p["videos"] for p in parts) / videos
        row["nfe"] = max(p["nfe"] for p in parts)
        if len(parts) > 1:  # a Frechet distance of one part's videos is not the merged set's
            row.pop("fid", None)
            row.pop("video_fd", None)
        if all(PER_VIDEO in p for p in parts):
            per_video = torch.tensor([a for p in sorted(parts, key=lambda p: p.get("first_video", 0)) for a in p[PER_VIDEO]])
            row[PER_VIDEO] = per_video.tolist()
            row["digit_se"] = float(per_video.std() / len(per_video) ** 0.5) if len(per_video) > 1 else None
        merged.append(row)
    return merged


def table(rows: list[dict[str, Any]]) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    return "\n".join([*lines, *(format_row(r) for r in rows)])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        name = f"{r['label']}:{r['sampler']}" + (f" deepcache {r['cache']}" if r["cache"] > 1 else "")
        series.setdefault(name, []).append((r["nfe"], r["digit_accuracy"]))
    colors = plt.get_cmap("tab20").colors
    markers = "os^Dv<>ph*"
    for index, (name, points) in enumerate(sorted(series.items())):
        points.sort()  # tab20 colours x markers: no two series look alike in a long legend
        ax.plot(*zip(*points), marker=markers[index % len(markers)], color=colors[index % len(colors)], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("frame digit accuracy")
    ax.set_title("moving digits: quality vs sampling cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint path, run id or 'latest'")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--data-root", default="data", help="root of digits/shards/val, for FID's real clips")
    parser.add_argument("--label", help="row label (default: the run id)")
    parser.add_argument("--samplers", nargs="*", default=["ddim", "dpmpp", "dpmpp_3m", "unipc", "euler"])
    parser.add_argument("--steps", nargs="*", type=int, default=[1, 2, 4, 8, 20, 50])
    parser.add_argument("--deepcache", nargs="+", type=int, default=[1], help="DeepCache intervals (1 = off)")
    parser.add_argument("--ddpm-1000", action="store_true", help="also DDPM at 1000 steps")
    parser.add_argument("--ddpm-videos", type=int, default=10)
    parser.add_argument("--videos", type=int, default=20, help="videos per setting")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--guidance", type=float, help="default: the run's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-video", type=int, default=0, help="index of the first video: extends an earlier run's rows (same --seed) with more videos")
    parser.add_argument("--fid-steps", nargs="*", type=int, default=[], help="step counts that also get frame FID")
    parser.add_argument("--fid-frames", type=int, default=2, help="frames per video fed to FID")
    parser.add_argument("--fid-real-clips", type=int, default=64, help="held-out clips for FID's real statistics")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="sampling_bench.jsonl")
    parser.add_argument("--table", help="print the table of a results file (no sampling)")
    parser.add_argument("--plot", help="write the quality-vs-NFE PNG of --table's rows here")
    args = parser.parse_args()
    if args.table:
        rows = merge_rows([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()])
        print(table(rows))
        if args.plot:
            plot(rows, Path(args.plot))
            print(f"plot: {args.plot}")
        return
    if not args.ckpt:
        parser.error("--ckpt is required unless --table is given")
    run(args)


if __name__ == "__main__":
    main()
