"""Autoregressive text-to-video over discrete tokens (CogVideo, Hong et al. 2022): a paradigm of
its own beside the diffusion ones. A per-frame VQ tokenizer turns clips into codes and a causal
transformer predicts them frame after frame from the caption and a frame-rate token
(`nets/video_tokens.py`).

Frame-rate conditioning as CogVideo trains it: the data loads clips densely (`frame_stride: 1`)
and every training clip takes every r-th frame for an r drawn from `frame_strides`, with r's
index as the frame-rate token, so one model generates the same motion at several frame rates.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.nets.video_tokens import FrameVQTokenizer, VideoTokenTransformer
from lit_models.video_logging import ValidationSamples


class TokenVideoGeneration(ValidationSamples, L.LightningModule):
    """Tokenizer + autoregressive transformer, trained together: the tokenizer on reconstruction
    plus its VQ loss, the transformer by cross-entropy on the tokenizer's (detached) codes.

    Args:
        net: the `VideoTokenTransformer` (`model=video_tokens`), sized to the tokenizer's codes per frame.
        tokenizer: a `FrameVQTokenizer`.
        text_encoder: open_clip text tower (its pooled embedding is the text token).
        optimizer: partial taking the parameters.
        frame_strides: frame strides r of the frame-rate classes (class i = every r_i-th frame).
        num_frames: frames per generated clip.
        sample_stride: the frame stride validation samples are drawn at (one of `frame_strides`).
        temperature, top_k: sampling of the codes.
        val_prompts, val_samples_per_prompt, sample_fps, sample_seed: validation samples (the
            digit metric is logged when they are moving-digit captions).
    """

    def __init__(
        self,
        net: VideoTokenTransformer,
        tokenizer: FrameVQTokenizer,
        text_encoder: OpenClipTextEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        frame_strides: Sequence[int] = (1, 2),
        num_frames: int = 8,
        sample_stride: int = 2,
        temperature: float = 1.0,
        top_k: int | None = None,
        val_prompts: Sequence[str] = (),
        val_samples_per_prompt: int = 1,
        sample_fps: float = 4.0,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        self.frame_strides = [int(s) for s in frame_strides]
        if sample_stride not in self.frame_strides:
            raise ValueError(f"sample_stride={sample_stride} is not one of frame_strides={self.frame_strides}")
        if net is None:
            raise ValueError("TokenVideoGeneration needs the token transformer: model=video_tokens")
        if num_frames > net.max_frames:
            raise ValueError(f"num_frames={num_frames} exceeds the transformer's max_frames={net.max_frames}")
        self.net, self.tokenizer, self.text_encoder = net, tokenizer, text_encoder
        self.optimizer_factory = optimizer
        self.num_frames, self.sample_stride = num_frames, sample_stride
        self.temperature, self.top_k = temperature, top_k
        self.val_prompts, self.val_samples_per_prompt = list(val_prompts), val_samples_per_prompt
        self.sample_fps, self.sample_seed = sample_fps, sample_seed

    def subsample(self, video: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(clips `(B, C, num_frames, H, W)` at a drawn frame stride each, the stride classes `(B,)`)."""
        needed = (self.num_frames - 1) * max(self.frame_strides) + 1
        if video.shape[2] < needed:
            raise ValueError(
                f"TokenVideoGeneration: clips of {video.shape[2]} frames, but {self.num_frames} frames at stride "
                f"{max(self.frame_strides)} need {needed}: load them densely (data.frame_stride=1, data.num_frames={needed})"
            )
        classes = torch.randint(len(self.frame_strides), (video.shape[0],), generator=generator)
        clips = [v[:, :: self.frame_strides[c]][:, : self.num_frames] for v, c in zip(video, classes.tolist())]
        return torch.stack(clips), classes.to(video.device)

    def losses(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        clips, rates = self.subsample(batch["video"], generator)  # (B, C, F, H, W)
        recon, codes, vq_loss = self.tokenizer(clips)
        if codes.shape[2] * codes.shape[3] != self.net.tokens_per_frame:
            raise ValueError(
                f"frames of {clips.shape[3]}x{clips.shape[4]} make {codes.shape[2]}x{codes.shape[3]} codes, but the "
                f"model.tokens_per_frame is {self.net.tokens_per_frame}"
            )
        pooled = self.text_encoder.encode(list(batch["caption"])).pooled
        targets = codes.detach().flatten(1)  # (B, F*h*w)
        logits = self.net(targets, pooled, rates)  # (B, N, K)
        token_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        recon_loss = F.mse_loss(recon.float(), clips.float())
        return {"loss": token_loss + recon_loss + vq_loss, "token_ce": token_loss, "recon": recon_loss, "vq": vq_loss}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["caption"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(batch, torch.Generator().manual_seed(batch_idx))  # fixed strides per batch
        for name, value in losses.items():
            self.log(f"val/{name}", value, batch_size=len(batch["caption"]), sync_dist=True)
        return losses["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    # What effvid-sample reads off a model: codes are drawn one by one, without guidance.
    sampler, sample_steps, guidance_scale = "autoregressive", None, 1.0

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], frame_stride: int | None = None, seed: int = 0,
                 num_frames: int | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> Tensor:
        """Videos `(len(prompts), C, F, H, W)` in [-1, 1] at `frame_stride` (default `sample_stride`).
        `sampler`, `steps` and `guidance_scale` exist for effvid-sample and take only their defaults."""
        if sampler not in (None, self.sampler) or steps is not None or guidance_scale not in (None, 1.0):
            raise ValueError("the token model samples its codes autoregressively: no sampler=, steps= or guidance=")
        stride = frame_stride or self.sample_stride
        if stride not in self.frame_strides:
            raise ValueError(f"frame_stride={stride} is not one of the trained frame_strides={self.frame_strides}")
        pooled = self.text_encoder.encode(list(prompts)).pooled
        rate = torch.full((len(prompts),), self.frame_strides.index(stride), dtype=torch.long, device=pooled.device)
        frames = num_frames or self.num_frames
        generator = torch.Generator().manual_seed(seed)
        codes = self.net.sample(pooled, rate, frames, self.temperature, self.top_k, generator)
        side = int(self.net.tokens_per_frame**0.5)
        codes = codes.view(len(prompts), frames, side, side)
        return self.tokenizer.decode(codes).clamp(-1, 1)
