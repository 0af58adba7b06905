"""A video-level metric for the moving digits that needs no download: a small spatio-temporal
classifier trained on real digit clips (digit and direction heads), and the Frechet distance
between its features on generated clips and on held-out real clips with the same captions
(an FVD analogue on the embedded default).

Per-frame metrics (digit accuracy, frame FID) are as good for an image model as for a video
model; this one sees the clip as a whole, so a digit that stands still, jitters, changes
identity or moves the wrong way is far from the real clips even when every frame looks right.

Real clips come straight from `data_tools.digits.make_digit_clip` (a pure function of a seed),
sampled and resized as the datamodule does for the quickstart's data config: 8 frames at
stride 2 from the 16 written, 32 -> 16 px. The classifier fits in about a minute on one CPU
core and is cached under `$EFFVID_CACHE` like the digit SVM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lit_models.metrics import DIRECTIONS, cache_dir

NUM_FRAMES = 8  # the quickstart's clips: data.num_frames, data.frame_stride, data.size
FRAME_STRIDE = 2
SIZE = 16
RECIPE_VERSION = 2  # bump when the architecture, the data or the training changes (a new cache file)


def real_digit_clips(
    digits: Sequence[int], directions: Sequence[str], seed: int = 0, split: str = "val", random_start: bool = True
) -> Tensor:
    """Real clips `(B, 1, 8, 16, 16)` in [-1, 1] showing `digits[i]` moving `directions[i]`,
    from the held-out digit images by default; clip i is a pure function of (seed, split, i)."""
    from data_tools.digits import derived_seed, make_digit_clip

    span = (NUM_FRAMES - 1) * FRAME_STRIDE + 1
    clips = []
    for index, (digit, direction) in enumerate(zip(digits, directions)):
        rng = np.random.default_rng(derived_seed(seed, index, split))
        frames, _ = make_digit_clip(rng, split=split, digit=int(digit), direction=direction)  # (16, 32, 32) uint8
        start = int(rng.integers(0, len(frames) - span + 1)) if random_start else 0
        clips.append(torch.from_numpy(frames[start : start + span : FRAME_STRIDE]).float())
    videos = torch.stack(clips)[:, :, None]  # (B, F, 1, 32, 32)
    # As the datamodule resizes (datamodules/video_decoding.py): bilinear with antialiasing.
    videos = F.interpolate(videos.flatten(0, 1), size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    videos = (videos / 127.5 - 1.0).clamp(-1, 1).view(len(clips), NUM_FRAMES, 1, SIZE, SIZE)
    return videos.transpose(1, 2).contiguous()  # (B, 1, F, H, W)


def to_classifier_input(videos: Tensor) -> Tensor:
    """Videos `(B, C, F, H, W)` in [-1, 1] -> `(B, 1, 8, 16, 16)`: channels averaged, frames
    resized to 16 px. Raises for another frame count (the classifier reads 8-frame clips)."""
    if videos.ndim != 5 or videos.shape[2] != NUM_FRAMES:
        raise ValueError(f"the digit video classifier reads (B, C, {NUM_FRAMES}, H, W) clips, got {tuple(videos.shape)}")
    x = videos.detach().float().cpu().mean(dim=1, keepdim=True).clamp(-1, 1)
    if x.shape[-2:] != (SIZE, SIZE):
        frames = F.interpolate(x.flatten(1, 2), size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = frames.view(len(x), 1, NUM_FRAMES, SIZE, SIZE)
    return x


class DigitClipEncoder(nn.Module):
    """Moving-digit clips `(B, 1, 8, 16, 16)` -> `(B, out_features)`: a 2D CNN per frame down
    to a 4x4 map, a temporal conv over the frames' flattened maps, a linear layer.

    Nothing is pooled over space or time, so the output keeps where the digit is in each frame
    and in which order, which is what a direction is made of. Factorized rather than 3D
    convolutions: a third of the CPU time for the same accuracy.
    """

    def __init__(self, out_features: int = 64, width: int = 16) -> None:
        super().__init__()
        self.frame_convs = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(4, width), nn.SiLU(),  # (16, 16)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.SiLU(),  # (8, 8)
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.SiLU(),  # (4, 4)
        )  # fmt: skip
        self.temporal_conv = nn.Sequential(nn.Conv1d(2 * width * 16, 128, 3, padding=1), nn.SiLU())
        self.out = nn.Linear(128 * NUM_FRAMES, out_features)

    def forward(self, videos: Tensor) -> Tensor:
        if videos.shape[1:] != (1, NUM_FRAMES, SIZE, SIZE):
            raise ValueError(f"DigitClipEncoder reads (B, 1, {NUM_FRAMES}, {SIZE}, {SIZE}) clips, got {tuple(videos.shape)}")
        frames = self.frame_convs(rearrange(videos, "b c f h w -> (b f) c h w"))  # (B*F, 2W, 4, 4)
        h = self.temporal_conv(rearrange(frames, "(b f) c h w -> b (c h w) f", f=NUM_FRAMES))  # (B, 128, F)
        return self.out(h.flatten(1))


class DigitVideoClassifier(nn.Module):
    """Spatio-temporal classifier of moving-digit clips `(B, 1, 8, 16, 16)`: a
    `DigitClipEncoder` to a `num_features`-wide feature (what the Frechet distance compares),
    read by a digit and a direction head."""

    def __init__(self, width: int = 16, num_features: int = 64) -> None:
        super().__init__()
        self.num_features = num_features  # read by torchmetrics' FrechetInceptionDistance
        self.encoder = DigitClipEncoder(num_features, width)
        self.digit_head = nn.Linear(num_features, 10)
        self.direction_head = nn.Linear(num_features, len(DIRECTIONS))
        self.held_out_accuracy: dict[str, float] = {}

    def features(self, videos: Tensor) -> Tensor:
        """`(B, num_features)` for clips `(B, 1, 8, 16, 16)` in [-1, 1]."""
        return F.silu(self.encoder(videos))

    def forward(self, videos: Tensor) -> Tensor:
        # torchmetrics calls the feature extractor as a module: features, not logits.
        return self.features(videos)

    def logits(self, videos: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(videos)
        return self.digit_head(features), self.direction_head(features)

    @torch.no_grad()
    def predict(self, videos: Tensor) -> tuple[Tensor, Tensor]:
        """Digit `(B,)` and direction index `(B,)` (into `DIRECTIONS`) of videos `(B, C, 8, H, W)`."""
        digit, direction = self.logits(to_classifier_input(videos))
        return digit.argmax(dim=1), direction.argmax(dim=1)

    def fit(
        self, num_clips: int = 2000, epochs: int = 8, batch_size: int = 64, seed: int = 0, test_clips: int = 512, progress: bool = False
    ) -> dict[str, float]:
        """Train on `num_clips` real training-split clips (every digit and direction drawn
        uniformly); returns (and stores) digit and direction accuracy on `test_clips` held-out
        clips."""
        from tqdm import tqdm

        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        digits = rng.integers(0, 10, num_clips)
        direction_index = rng.integers(0, len(DIRECTIONS), num_clips)
        names = list(DIRECTIONS)
        clips = real_digit_clips(digits, [names[d] for d in direction_index], seed=seed, split="train")
        targets = torch.from_numpy(digits), torch.from_numpy(direction_index)
        optimizer = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = epochs * -(-num_clips // batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
        self.train()
        with tqdm(total=steps, desc="digit video classifier", disable=not progress, unit="step") as bar:
            for _ in range(epochs):
                order = torch.randperm(num_clips, generator=generator)
                for first in range(0, num_clips, batch_size):
                    index = order[first : first + batch_size]
                    x = clips[index]
                    # Generated clips are noisier and dimmer than real ones: features should not
                    # hinge on exact pixel values.
                    scale = 0.6 + 0.4 * torch.rand(len(x), 1, 1, 1, 1, generator=generator)
                    noise = 0.15 * torch.rand(len(x), 1, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
                    x = ((x + 1) * scale - 1 + noise).clamp(-1, 1)
                    digit, direction = self.logits(x)
                    loss = F.cross_entropy(digit, targets[0][index]) + F.cross_entropy(direction, targets[1][index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    bar.update()
        self.eval()
        rng = np.random.default_rng(seed + 1)
        test_digits, test_directions = rng.integers(0, 10, test_clips), rng.integers(0, len(DIRECTIONS), test_clips)
        test = real_digit_clips(test_digits, [names[d] for d in test_directions], seed=seed + 1, split="val")
        predicted_digit, predicted_direction = self.predict(test)
        self.held_out_accuracy = {
            "digit": float((predicted_digit.numpy() == test_digits).mean()),
            "direction": float((predicted_direction.numpy() == test_directions).mean()),
        }
        return self.held_out_accuracy

    def save(self, path: Path) -> None:
        """Weights and held-out accuracy, written atomically (a concurrent reader never sees
        half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": self.state_dict(), "held_out_accuracy": self.held_out_accuracy}, temporary)
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path | None = None) -> DigitVideoClassifier:
        """The classifier cached at `path` (default `cache_path()`), fit (about a minute on one
        core) and cached there on first use."""
        path = path or cache_path()
        classifier = cls()
        if path.exists():
            state = torch.load(path, weights_only=True)
            classifier.load_state_dict(state["state_dict"])
            classifier.held_out_accuracy = state["held_out_accuracy"]
            return classifier.eval()
        # First use may come from inside sampling or scoring: fitting needs autograd back, and
        # must not move the caller's RNG streams.
        with torch.random.fork_rng(), torch.inference_mode(False), torch.enable_grad():
            classifier.fit(progress=True)
        classifier.save(path)
        return classifier.eval()


def cache_path() -> Path:
    """Where `DigitVideoClassifier.load` keeps the fitted classifier: `$EFFVID_CACHE`
    (default `~/.cache/effvid/`), keyed by the recipe version and the torch version."""
    return cache_dir() / f"digit_video_classifier_v{RECIPE_VERSION}_torch-{torch.__version__.split('+')[0]}.pt"


@lru_cache(maxsize=1)
def _cached_classifier() -> DigitVideoClassifier:
    return DigitVideoClassifier.load()


@torch.no_grad()
def digit_video_fd(
    videos: Tensor,
    digits: Sequence[int],
    directions: Sequence[str],
    real_per_video: int = 8,
    classifier: DigitVideoClassifier | None = None,
    real: Tensor | None = None,
    seed: int = 0,
) -> float:
    """Frechet distance between the classifier features of `videos` `(B, C, 8, H, W)` in
    [-1, 1] and those of real held-out clips with the same captions (`real_per_video` per
    video, drawn with `seed`, or the given `real` clips).

    Like FID it has a positive bias that shrinks with the number of videos, so compare values
    at the same count. Needs at least two videos.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(videos) < 2:
        raise ValueError(f"digit_video_fd: needs at least 2 videos, got {len(videos)}")
    classifier = classifier or _cached_classifier()
    if real is None:
        real = real_digit_clips(
            [d for d in digits for _ in range(real_per_video)], [d for d in directions for _ in range(real_per_video)], seed
        )
    metric = FrechetInceptionDistance(feature=classifier, reset_real_features=False, sync_on_compute=False)
    for chunk in to_classifier_input(real).split(256):
        metric.update(chunk, real=True)
    for chunk in to_classifier_input(videos).split(256):
        metric.update(chunk, real=False)
    return float(metric.compute())
