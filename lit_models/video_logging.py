"""Writing generated videos where people look at them: mp4 files and a captioned PNG grid, and
the validation samples every generating paradigm draws (`ValidationSamples`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from data_tools.video_io import write_mp4


def to_uint8_frames(videos: Tensor, scale: int = 1) -> np.ndarray:
    """`(B, C, F, H, W)` in [-1, 1] -> uint8 `(B, F, H*scale, W*scale, 3)`, grayscale repeated to RGB."""
    videos = ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1, -1)
    if scale > 1:
        videos = videos.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return rearrange(videos, "b c f h w -> b f h w c").numpy()


def video_grid(videos: Tensor, captions: Sequence[str] | None = None, scale: int = 4) -> Image.Image:
    """One row per video, one column per frame, the caption at the left of its row."""
    frames = to_uint8_frames(videos, scale)  # (B, F, H, W, 3)
    num_videos, num_frames, height, width, _ = frames.shape
    label_width = 230 if captions else 0
    pad = 2
    grid = Image.new(
        "RGB", (label_width + num_frames * (width + pad), num_videos * (height + pad)), (40, 40, 40)
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(num_videos):
        top = i * (height + pad)
        if captions:
            draw.text((4, top + height // 2 - 6), captions[i][:38], fill=(230, 230, 230), font=font)
        for j in range(num_frames):
            grid.paste(Image.fromarray(frames[i, j]), (label_width + j * (width + pad), top))
    return grid


def slug(text: str, max_len: int = 48) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:max_len] or "video"


def save_samples(
    videos: Tensor, captions: Sequence[str], out_dir: str | Path, fps: float = 8.0, scale: int = 4
) -> dict[str, Path | list[Path]]:
    """Write each video as an mp4 (upscaled `scale` times so small clips are viewable), a
    captioned grid PNG and `captions.txt`. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(videos, scale)
    mp4s = [
        write_mp4(out_dir / f"{i:03d}_{slug(caption)}.mp4", clip, fps=fps)
        for i, (clip, caption) in enumerate(zip(frames, captions))
    ]
    grid_path = out_dir / "grid.png"
    video_grid(videos, captions, scale).save(grid_path)
    (out_dir / "captions.txt").write_text("\n".join(captions) + "\n")
    return {"grid": grid_path, "videos": mp4s}


class ValidationSamples:
    """Validation samples for a LightningModule with `generate(prompts, seed=...)`, `val_prompts`,
    `val_samples_per_prompt`, `sample_seed` and `sample_fps`: drawn at the start of each
    validation, written to `samples/step_N/`, logged to W&B and kept in `validation_samples`
    (prompts, videos) for validation callbacks that score them (`lit_models/digit_scores.py`)."""

    validation_samples: tuple[list[str], Tensor] | None = None

    def on_validation_epoch_start(self) -> None:
        # Sample here, not at epoch end: Lightning runs callback hooks before the module's,
        # so EMAWeightAveraging has swapped the averaged weights in by now and swaps them back
        # out before the module's on_validation_epoch_end. Samples then come from the same
        # (EMA) weights that checkpoints hold and effvid-sample loads.
        self.validation_samples = None
        inputs = getattr(self, "inputs", None)  # a paradigm whose inputs need more than prompts samples elsewhere
        if not self.val_prompts or self.trainer.sanity_checking or not getattr(inputs, "prompts_alone", True):
            return
        prompts = [p for p in self.val_prompts for _ in range(self.val_samples_per_prompt)]
        videos = self.generate(prompts, seed=self.sample_seed)
        self.validation_samples = (prompts, videos)
        if self.trainer.is_global_zero:
            self.write_samples(prompts, videos)

    def write_samples(self, prompts: Sequence[str], videos: Tensor) -> None:
        out_dir = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:06d}"
        paths = save_samples(videos, prompts, out_dir, fps=self.sample_fps)
        from lightning.pytorch.loggers import WandbLogger  # here: effvid-sample imports this module without Lightning

        logger = self.logger
        if isinstance(logger, WandbLogger):
            logger.log_image("samples/grid", [str(paths["grid"])], step=self.global_step)
            videos_to_log = paths["videos"][: len(self.val_prompts)]
            logger.log_video(
                "samples/videos",
                [str(p) for p in videos_to_log],
                step=self.global_step,
                caption=list(prompts[: len(videos_to_log)]),
            )
