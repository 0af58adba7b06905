"""Joint image-video training (VDM): clips and independent images in one batch.

Each clip of a batch gets K images appended along its frame axis (K = ceil(images / clips),
the last clips' spare slots filled by repeating images, with zero loss weight). The images are
marked in `image_frames`, so every temporal op leaves them alone and they feed nothing to the
clip's frames, while the spatial layers train on both. Each frame is conditioned on its own
caption (the clip's for its frames, each image's for itself). A batch of only images runs
them as one-frame clips. Timesteps and noise levels are per clip, as in VDM.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from einops import rearrange
from torch import Tensor

from lit_models.diffusion import Conditioning, min_snr_weights
from lit_models.text_to_video import TextToVideo


class JointImageVideo(TextToVideo):
    """Text-to-video trained on batches of clips and images (`JointImageVideoDataModule`).

    Args:
        video_loss_weight, image_loss_weight: weights of the mean denoising loss over clip
            frames and over image frames in the training loss.
        **text_to_video: `TextToVideo` arguments (validation samples videos only).
    """

    def __init__(self, video_loss_weight: float = 1.0, image_loss_weight: float = 1.0, **text_to_video: Any) -> None:
        super().__init__(**text_to_video)
        self.video_loss_weight = video_loss_weight
        self.image_loss_weight = image_loss_weight

    def arrange(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, list[list[str]]]:
        """Clips with images appended: x0 `(B, C, F + K, H, W)`, image_frames `(B, F + K)`,
        per-frame loss weights `(B, F + K)` (0 for repeated filler images) and per-frame captions."""
        videos, images = batch["video"], batch["image"]  # (Bv, C, F, H, W), (Bi, C, H, W)
        num_clips, num_images = videos.shape[0], images.shape[0]
        if num_clips == 0:  # images only: one-frame clips
            x0 = images[:, :, None]
            flags = torch.ones(num_images, 1, dtype=torch.bool, device=images.device)
            return x0, flags, torch.ones_like(flags, dtype=x0.dtype), [[c] for c in batch["image_caption"]]
        num_frames = videos.shape[2]
        # A batch can hold no image at all (probability (1 - image_ratio)^batch_size per batch).
        per_clip = math.ceil(num_images / num_clips)
        if per_clip == 0:
            flags = torch.zeros(num_clips, num_frames, dtype=torch.bool, device=videos.device)
            return videos, flags, torch.ones_like(flags, dtype=videos.dtype), [[c] * num_frames for c in batch["caption"]]
        slots = torch.arange(num_clips * per_clip, device=images.device)
        appended = rearrange(images[slots % max(num_images, 1)], "(b k) c h w -> b c k h w", k=per_clip)
        x0 = torch.cat([videos, appended], dim=2)
        image_frames = torch.zeros(num_clips, num_frames + per_clip, dtype=torch.bool, device=videos.device)
        image_frames[:, num_frames:] = True
        weights = torch.ones(num_clips, num_frames + per_clip, dtype=x0.dtype, device=videos.device)
        weights[:, num_frames:] = rearrange((slots < num_images).to(x0.dtype), "(b k) -> b k", k=per_clip)
        image_captions = list(batch["image_caption"])
        captions = [
            [batch["caption"][b]] * num_frames
            + [image_captions[i % num_images] for i in range(b * per_clip, (b + 1) * per_clip)]
            for b in range(num_clips)
        ]
        return x0, image_frames, weights, captions

    def frame_conditioning(self, captions: list[list[str]], image_frames: Tensor, drop: bool) -> Conditioning:
        """Per-frame text conditioning `(B, F, ...)`, every distinct caption encoded once."""
        flat = [c for clip in captions for c in clip]
        if drop and self.cfg_dropout > 0:
            keep = (torch.rand(len(flat)) >= self.cfg_dropout).tolist()
            flat = [c if k else "" for c, k in zip(flat, keep)]
        unique = sorted(set(flat))
        index = torch.tensor([unique.index(c) for c in flat])
        encoded = self.encode_captions(unique)
        frames = image_frames.shape[1]
        per_frame = {k: rearrange(v[index.to(v.device)], "(b f) ... -> b f ...", f=frames) for k, v in encoded.items()}
        return {**per_frame, "image_frames": image_frames}

    def frame_losses(self, x0: Tensor, conditioning: Conditioning, generator: torch.Generator | None = None) -> Tensor:
        """Min-SNR-weighted denoising loss per frame `(B, F)`; one timestep per clip."""
        batch_size = x0.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        ).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)  # (B, C, F, H, W)
        prediction = self.net(self.noise_scheduler.add_noise(x0, noise, timesteps), timesteps, **conditioning)
        loss = F.mse_loss(prediction.float(), self.target(x0, noise, timesteps).float(), reduction="none")
        loss = loss.mean(dim=(1, 3, 4))  # (B, F)
        if self.min_snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, timesteps)
            loss = loss * min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)[:, None]
        return loss

    def joint_loss(self, batch: dict[str, Any], drop: bool, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x0, image_frames, weights, captions = self.arrange(batch)
        x0 = self.encode_data(x0)  # per frame, so appended images encode as images
        losses = self.frame_losses(x0, self.frame_conditioning(captions, image_frames, drop), generator)
        video_weights = weights * ~image_frames
        image_weights = weights * image_frames
        out = {"loss": losses.new_zeros(())}
        for name, frame_weights, scale in (
            ("video", video_weights, self.video_loss_weight),
            ("image", image_weights, self.image_loss_weight),
        ):
            if frame_weights.sum() > 0:
                out[name] = (losses * frame_weights).sum() / frame_weights.sum()
                out["loss"] = out["loss"] + scale * out[name]
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.joint_loss(batch, drop=True)
        size = batch["video"].shape[0] + batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("video", "image"):
            if name in losses:
                self.log(f"train/{name}_loss", losses[name], batch_size=size)
        return losses["loss"]

