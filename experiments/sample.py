"""effvid-sample: draw videos from a trained run and write mp4s + a grid.

    effvid-sample                                          # latest run, its validation prompts
    effvid-sample run=RUN_ID prompts='[a handwritten 3 moving up]' samples_per_prompt=4
    effvid-sample ckpt=runs/RUN_ID/checkpoints/last.ckpt sampler=ddim steps=50 guidance=2
    effvid-sample run=RUN_ID --extend 16       # 16 more frames, autoregressively (masked-frame runs)
    effvid-sample run=RUN_ID --interpolate     # twice the frame rate (masked-frame runs)
    effvid-sample run=RUN_ID cache=3           # DeepCache: the deep U-Net features every 3rd step
    effvid-sample pipeline=cascade run=BASE temporal_sr=LVDM_RUN spatial_sr=SR_RUN
    effvid-sample run=RUN_ID backend=diffusers   # a pretrained-bundle run through its family's diffusers pipeline
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.run_dir import RunError, resolve_checkpoint
from lit_models.feature_cache import sampling_cache
from lit_models.digit_scores import digit_scores
from lit_models.super_resolution import resize_frames
from lit_models.trusted_config import UntrustedConfigError, trust_command_line_targets
from lit_models.video_logging import save_samples


def load_model(ckpt_path: Path, run_dir: Path, weights: str = "auto") -> tuple[Any, DictConfig]:
    """The run's LightningModule, rebuilt from the checkpoint's own config through effvid's
    builders (never a callable the checkpoint names), with its EMA (or raw) weights."""
    from lit_models.bundle import BundleError, load_run

    try:
        model, cfg, _ = load_run(ckpt_path, weights)
    except BundleError as error:
        raise RunError(str(error)) from None
    return model, cfg


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    run_dir, ckpt = resolve_checkpoint(cfg.ckpt or cfg.run, Path(cfg.runs_dir))
    model, run_cfg = load_model(ckpt, run_dir)
    prompts = list(cfg.prompts) if cfg.prompts else list(run_cfg.paradigm.get("val_prompts") or [])
    if not prompts:
        raise RunError("no prompts: pass prompts='[a caption, another caption]'")
    prompts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    sampler = cfg.sampler or model.sampler
    steps = cfg.steps or model.sample_steps
    guidance = model.guidance_scale if cfg.guidance is None else cfg.guidance
    sampling = dict(sampler=sampler, steps=steps, guidance_scale=guidance)
    if cfg.pipeline not in ("single", "cascade"):
        raise RunError(f"pipeline={cfg.pipeline!r}: choose single or cascade")
    if cfg.backend not in ("effvid", "diffusers"):
        raise RunError(f"backend={cfg.backend!r}: choose effvid or diffusers")
    if cfg.backend == "diffusers":
        videos = diffusers_backend(model, cfg, prompts, steps, guidance)
        sampler = f"{type(model.noise_scheduler).__name__} (the family pipeline's own)"
    else:
        with sampling_cache(model, cfg.cache):
            videos = model.generate(prompts, seed=cfg.seed, num_frames=cfg.num_frames, **sampling)
            videos = extend_or_interpolate(model, cfg, prompts, videos, sampling)
    stages = {"base": videos}
    if cfg.pipeline == "cascade":
        stages.update(run_cascade(cfg, prompts, videos))
        videos = list(stages.values())[-1]
    out = Path(cfg.out) if cfg.out else new_sample_dir(run_dir)
    paths = save_samples(videos, prompts, out, fps=model.sample_fps * videos.shape[2] / stages["base"].shape[2])
    # The digit metric reads frames at the base resolution: a spatially upsampled video is scored resized back.
    scores = digit_scores(prompts, resize_frames(videos, tuple(stages["base"].shape[-2:])), reward=False)
    print(f"effvid-sample: {len(prompts)} videos {tuple(videos.shape[1:])} from {ckpt}")
    print(f"  sampler={sampler} steps={steps} guidance={guidance} cache={cfg.cache}")
    if len(stages) > 1:
        print("  cascade " + " -> ".join(f"{name} {tuple(v.shape[2:])}" for name, v in stages.items()))
    for name, value in scores.items():
        print(f"  {name:24s} {value:.4f}")
    print(f"  grid   {paths['grid']}\n  videos {out}/*.mp4")
    return {"videos": videos, "paths": paths, "scores": scores, "stages": stages}


def new_sample_dir(run_dir: Path) -> Path:
    """`RUN/samples/sample-TIME`, with a suffix when a call in the same second made one."""
    base = run_dir / "samples" / dt.datetime.now().strftime("sample-%Y%m%d-%H%M%S")
    out, count = base, 1
    while out.exists():
        count += 1
        out = base.with_name(f"{base.name}-{count}")
    return out


def diffusers_backend(model: Any, cfg: DictConfig, prompts: list[str], steps: int, guidance: float) -> torch.Tensor:
    """The run's denoiser inside its family's diffusers pipeline (its scheduler, text encoding and
    VAE decoding), for comparison with effvid's samplers."""
    from lit_models.diffusers_pipelines import pipeline_generate

    if cfg.extend or cfg.interpolate or cfg.pipeline != "single" or cfg.cache is not None:
        raise RunError("backend=diffusers samples plain text-to-video: drop --extend/--interpolate/pipeline=/cache=")
    try:
        return pipeline_generate(model, prompts, steps, guidance, cfg.seed, cfg.num_frames)
    except ValueError as error:
        raise RunError(f"backend=diffusers: {error}") from None


def run_cascade(cfg: DictConfig, prompts: list[str], videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Imagen Video / Make-A-Video cascade after the base samples: temporal super-resolution
    (a masked-frame run interpolating, 2F - 1 frames) then spatial super-resolution (a
    spatial_sr run upsampling). Each stage uses its own run's sampler settings."""
    if not cfg.temporal_sr and not cfg.spatial_sr:
        raise RunError("pipeline=cascade needs temporal_sr=RUN and/or spatial_sr=RUN")
    stages = {}
    if cfg.temporal_sr:
        stage = load_stage(cfg.temporal_sr, cfg, "interpolate", "temporal_sr", "experiment=lvdm")
        with sampling_cache(stage, cfg.cache):
            videos = stage.interpolate(prompts, videos, seed=cfg.seed + 3)
        stages["temporal_sr"] = videos
    if cfg.spatial_sr:
        stage = load_stage(cfg.spatial_sr, cfg, "upsample", "spatial_sr", "experiment=spatial_sr_digits")
        with sampling_cache(stage, cfg.cache):
            videos = stage.upsample(prompts, videos, seed=cfg.seed + 4)
        stages["spatial_sr"] = videos
    return stages


def load_stage(ref: str, cfg: DictConfig, method: str, key: str, trained_by: str) -> Any:
    run_dir, ckpt = resolve_checkpoint(ref, Path(cfg.runs_dir))
    model, _ = load_model(ckpt, run_dir)
    if not hasattr(model, method):
        raise RunError(f"{key}={ref}: its paradigm {type(model).__name__} cannot {method}; train one with {trained_by}")
    return model


def extend_or_interpolate(model: Any, cfg: DictConfig, prompts: list[str], videos: torch.Tensor, sampling: dict) -> torch.Tensor:
    """`--extend N` / `--interpolate`, for runs trained with masked-frame conditioning."""
    if not cfg.extend and not cfg.interpolate:
        return videos
    if not hasattr(model, "extend"):
        raise RunError(
            f"--extend/--interpolate need a masked-frame model (e.g. experiment=lvdm); this run's "
            f"paradigm is {type(model).__name__}"
        )
    if cfg.extend:
        videos = model.extend(prompts, videos, int(cfg.extend), seed=cfg.seed + 1, **sampling)
    if cfg.interpolate:
        videos = model.interpolate(prompts, videos, seed=cfg.seed + 2, **sampling)
    return videos


def translate_flags(argv: list[str]) -> list[str]:
    """`--extend N` -> `extend=N`, `--interpolate` -> `interpolate=true` (Hydra takes key=value)."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == "--extend":
            out.append(f"extend={next(args, '')}")
        elif arg.startswith("--extend="):
            out.append(f"extend={arg.split('=', 1)[1]}")
        elif arg == "--interpolate":
            out.append("interpolate=true")
        else:
            out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def hydra_main(cfg: DictConfig) -> None:
    trust_command_line_targets(cfg.trust_targets)
    try:
        with torch.inference_mode():
            run_sampling(cfg)
    except (RunError, UntrustedConfigError) as error:
        raise SystemExit(f"effvid-sample: error: {error}") from None


def main() -> None:
    sys.argv = [sys.argv[0], *translate_flags(sys.argv[1:])]
    hydra_main()


if __name__ == "__main__":
    main()
