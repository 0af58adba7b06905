"""Joint image-video training (VDM): clips and independent images in one batch.

Each clip of a batch gets K images appended along its frame axis (K = ceil(images / clips),
the last clips' spare slots filled by repeating images, with zero loss weight). The images are
marked in `image_frames`, so every temporal op leaves them alone and they feed nothing to the
clip's frames, while the spatial layers train on both. Each frame is conditioned on its own
caption (the clip's for its frames, each image's for itself), dropped for guidance per clip and per
image, as sampling's unconditional pass sees it. A batch of only images runs
them as one-frame clips. Timesteps and noise levels are per clip, as in VDM.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from lit_models.diffusion import DiffusionModule
from lit_models.forward_process import Conditioning
from lit_models.objectives import DenoisingLoss, Losses


class JointImageVideoLoss(DenoisingLoss):
    """The denoising loss over clips with images appended (`arrange`), weighted per frame kind;
    batches without images (validation's clips) take the plain denoising loss.

    Args:
        video_loss_weight, image_loss_weight: weights of the mean denoising loss over clip
            frames and over image frames in the training loss.
    """

    def __init__(self, video_loss_weight: float = 1.0, image_loss_weight: float = 1.0) -> None:
        super().__init__()
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

    @staticmethod
    def caption_keep(image_frames: Tensor, cfg_dropout: float) -> Tensor:
        """Which frames keep their caption `(B, F)` under classifier-free-guidance dropout: one
        draw per clip for all its video frames, one per image. Sampling's unconditional pass
        gives every frame of a clip the empty caption; dropping frames one by one would leave
        that case untrained (0.1^8 of 8-frame clips) and mix captioned and empty frames instead."""
        draws = torch.rand(image_frames.shape)  # (B, F)
        # `arrange` puts a clip's video frames first, so frame 0 holds the clip's draw
        # (a clip of images only is one image per row: its frame 0 is that image).
        per_clip = draws[:, :1].expand_as(draws)
        return torch.where(image_frames.cpu().bool(), draws, per_clip) >= cfg_dropout

    @classmethod
    def frame_conditioning(cls, module: Any, captions: list[list[str]], image_frames: Tensor, drop: bool) -> Conditioning:
        """Per-frame text conditioning `(B, F, ...)`, every distinct caption encoded once."""
        flat = [c for clip in captions for c in clip]
        if drop and module.cfg_dropout > 0:
            keep = cls.caption_keep(image_frames, module.cfg_dropout).flatten().tolist()
            flat = [c if k else "" for c, k in zip(flat, keep)]
        unique = sorted(set(flat))
        index = torch.tensor([unique.index(c) for c in flat])
        encoded = module.encode_captions(unique)
        frames = image_frames.shape[1]
        per_frame = {k: rearrange(v[index.to(v.device)], "(b f) ... -> b f ...", f=frames) for k, v in encoded.items()}
        return {**per_frame, "image_frames": image_frames}

    @staticmethod
    def frame_losses(module: Any, x0: Tensor, conditioning: Conditioning, generator: torch.Generator | None = None) -> Tensor:
        """Weighted denoising loss per frame `(B, F)`; one timestep per clip. The module's own
        forward process draws the timesteps and noise and gives x_t and the target, so a joint
        run trains on the schedule a clip-only run would (flow matching, VideoFusion noise)."""
        errors, timesteps, _ = module.squared_errors(x0, conditioning, generator)  # (B, C, F, H, W), (B,)
        loss = errors.mean(dim=(1, 3, 4))  # (B, F)
        weights = module.loss_weights(timesteps)
        return loss if weights is None else loss * weights[:, None]

    def joint_loss(self, module: Any, batch: dict[str, Any], drop: bool, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x0, image_frames, weights, captions = self.arrange(batch)
        x0 = module.encode_data(x0)  # per frame, so appended images encode as images
        losses = self.frame_losses(module, x0, self.frame_conditioning(module, captions, image_frames, drop), generator)
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

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        if "image" not in batch:
            return super().forward(module, batch, stage, generator)
        losses = self.joint_loss(module, batch, stage == "train", generator)
        named = {"loss": losses["loss"], **{f"{k}_loss": losses[k] for k in ("video", "image") if k in losses}}
        return named, batch["video"].shape[0] + batch["image"].shape[0]


class JointImageVideo(DiffusionModule):
    """Text-to-video trained on batches of clips and images (`JointImageVideoDataModule`) with
    `JointImageVideoLoss` (its weights, then `DiffusionModule`'s arguments; validation samples
    videos only)."""

    def __init__(self, video_loss_weight: float = 1.0, image_loss_weight: float = 1.0, **diffusion: Any) -> None:
        super().__init__(objective=JointImageVideoLoss(video_loss_weight, image_loss_weight), **diffusion)
