"""Latent space: diffusers' `AutoencoderKL` applied frame by frame, the video VAEs of the
pretrained families (temporal compression), and the per-frame VAE's training on the digits
(`effvid-train experiment=vae_digits`).

A paradigm given `autoencoder=FrameAutoencoder(...)` (or a `VideoAutoencoder`) diffuses in its
latent space: clean clips are encoded before noising, samples decoded after (MagicVideo, LVDM
and Video LDM are latent models; `paradigm.autoencoder=...` turns any text-to-video config
latent). Both take and give `(B, C, F, H, W)`; a video VAE maps F frames to (F - 1) / t + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import Tensor, nn

from lit_models.checkpoint_weights import load_into, load_prefixed_weights


class FrameAutoencoder(nn.Module):
    """`AutoencoderKL` per frame: videos `(B, C, F, H, W)` <-> latents `(B, c, F, H/f, W/f)`.

    Args:
        pretrained: a diffusers folder (e.g. an SD VAE, `subfolder="vae"`); else built from
            the sizes below, randomly initialised (for `vae_digits`) or loaded from `weights`.
        vae: an `AutoencoderKL` already loaded (a pretrained bundle's).
        weights: a `vae_digits` run's checkpoint (its `autoencoder.vae.*` entries).
        trainable: train the VAE (the vae_digits run); otherwise frozen and in eval mode.
        scaling_factor: latents are multiplied by it (unit variance for the diffusion);
            None keeps the VAE config's.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        weights: str | None = None,
        in_channels: int = 1,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        scaling_factor: float | None = None,
        trainable: bool = False,
        vae: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = 1  # a bundle's denoiser patch / U-Net levels (sizes must be multiples)
        if vae is not None:
            self.vae = vae
        elif pretrained is not None:
            self.vae = AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder)
        else:
            levels = len(block_out_channels)
            self.vae = AutoencoderKL(
                in_channels=in_channels, out_channels=in_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            )  # fmt: skip
        if weights is not None:
            hint = "weights= takes a vae_digits run's checkpoint"
            state = load_prefixed_weights(weights, "autoencoder.vae.", "FrameAutoencoder", hint)
            load_into(self.vae, state, weights, "FrameAutoencoder")
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else self.vae.config.scaling_factor)
        self.trainable = trainable
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    temporal_downscale = 1

    def check_shape(self, frames: int, height: int, width: int, where: str = "data") -> None:
        grid = self.downscale * self.patch_size
        if height % grid or width % grid:
            raise ValueError(
                f"{where}: {height}x{width} px; this model needs multiples of {grid} (VAE {self.downscale}x x "
                f"denoiser {self.patch_size}x)"
            )

    def train(self, mode: bool = True) -> FrameAutoencoder:
        return super().train(mode and self.trainable)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """`(B, C, F, H, W)` of videos -> the shape of their latents."""
        batch, _, frames, height, width = shape
        return (batch, self.latent_channels, frames, height // self.downscale, width // self.downscale)

    def encode(self, videos: Tensor) -> Tensor:
        """Scaled latents (the posterior's mode) of videos in [-1, 1]."""
        frames = videos.shape[2]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            latents = self.vae.encode(rearrange(videos, "b c f h w -> (b f) c h w")).latent_dist.mode()
        return rearrange(latents * self.scaling_factor, "(b f) c h w -> b c f h w", f=frames)

    def decode(self, latents: Tensor) -> Tensor:
        frames = latents.shape[2]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            videos = self.vae.decode(rearrange(latents / self.scaling_factor, "b c f h w -> (b f) c h w")).sample
        return rearrange(videos, "(b f) c h w -> b c f h w", f=frames).clamp(-1, 1)


class VideoAutoencoder(nn.Module):
    """A pretrained family's video VAE, encoding whole clips with temporal compression:
    `(B, C, F, H, W)` <-> `(B, c, (F - 1) / t + 1, H / s, W / s)`, latents normalised as the
    family's pipeline un-normalises them before decoding. Always frozen.

    Args:
        vae: `AutoencoderKLCogVideoX`, `AutoencoderKLLTXVideo`, `AutoencoderKLWan` or `AutoencoderKLHunyuanVideo`.
        patch_size: the denoiser's spatial patch size; frame sizes must be multiples of
            `downscale * patch_size` (checked with `check_shape`).

    Normalisation per family (what each pipeline inverts before `vae.decode`):
    CogVideoX and HunyuanVideo scale by `scaling_factor`; LTX-Video and Wan subtract the per-channel
    `latents_mean` and divide by `latents_std` (LTX also scales by `scaling_factor`).
    """

    trainable = False

    def __init__(self, vae: nn.Module, patch_size: int = 1) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.patch_size = patch_size
        kind = type(vae).__name__
        config = vae.config
        channels = int(config.get("latent_channels") or config.get("z_dim"))
        mean, std, scale = torch.zeros(channels), torch.ones(channels), 1.0
        if kind in ("AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo"):
            scale = float(config.scaling_factor)
        elif kind == "AutoencoderKLLTXVideo":
            mean, std, scale = vae.latents_mean.float(), vae.latents_std.float(), float(config.scaling_factor)
        elif kind == "AutoencoderKLWan":
            mean, std = torch.tensor(config.latents_mean).float(), torch.tensor(config.latents_std).float()
        else:
            raise ValueError(f"VideoAutoencoder: unsupported video VAE {kind}")
        self.kind = kind
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)
        self.scaling_factor = scale
        self.latent_channels = channels
        self.downscale = int(getattr(vae, "spatial_compression_ratio", None) or 2 ** (len(config.block_out_channels) - 1))
        self.temporal_downscale = int(
            config.get("temporal_compression_ratio")
            or config.get("scale_factor_temporal")
            or vae.temporal_compression_ratio  # LTX-Video derives it from its blocks
        )

    def train(self, mode: bool = True) -> VideoAutoencoder:
        return super().train(False)

    def check_shape(self, frames: int, height: int, width: int, where: str = "data") -> None:
        """Raise naming the numbers when clips of this size cannot go through the VAE + denoiser."""
        t, grid = self.temporal_downscale, self.downscale * self.patch_size
        if (frames - 1) % t:
            raise ValueError(
                f"{where}: {frames} frames; this family's video VAE compresses time {t}x and takes {t}k+1 frames "
                f"(e.g. {((frames - 1) // t) * t + 1} or {((frames - 1) // t + 1) * t + 1})"
            )
        if height % grid or width % grid:
            raise ValueError(
                f"{where}: {height}x{width} px; this family needs multiples of {grid} "
                f"(VAE {self.downscale}x x patch {self.patch_size})"
            )

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        batch, _, frames, height, width = shape
        return (batch, self.latent_channels, (frames - 1) // self.temporal_downscale + 1,
                height // self.downscale, width // self.downscale)  # fmt: skip

    @torch.no_grad()
    def encode(self, videos: Tensor) -> Tensor:
        """Normalised latents (the posterior's mode) of videos `(B, C, F, H, W)` in [-1, 1]."""
        latents = self.vae.encode(videos.to(self.vae.dtype)).latent_dist.mode().float()
        return (latents - self.latents_mean) * self.scaling_factor / self.latents_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        kwargs = {}
        if self.vae.config.get("timestep_conditioning"):  # LTX-Video 0.9.1+: its pipeline decodes at t = 0
            kwargs["temb"] = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        videos = self.vae.decode(latents.to(self.vae.dtype), **kwargs).sample.float()
        return videos.clamp(-1, 1)


class AutoencoderTraining(L.LightningModule):
    """`vae_digits`: train a `FrameAutoencoder` on the frames of the clips, reconstruction
    MSE + `kl_weight` x KL to the unit Gaussian (no adversarial or perceptual loss: fine for
    16 px digits, not for natural video).

    Args:
        autoencoder: a trainable `FrameAutoencoder`.
        optimizer: partial taking the parameters.
        net: ignored (effvid-train passes the model config's net, null here).
    """

    def __init__(
        self,
        autoencoder: FrameAutoencoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        kl_weight: float = 1e-4,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not autoencoder.trainable:
            raise ValueError("AutoencoderTraining: needs autoencoder.trainable=true")
        self.autoencoder = autoencoder
        self.optimizer_factory = optimizer
        self.kl_weight = kl_weight

    def losses(self, batch: dict[str, Any], sample: bool) -> tuple[Tensor, Tensor]:
        frames = rearrange(batch["video"], "b c f h w -> (b f) c h w")
        posterior = self.autoencoder.vae.encode(frames).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        reconstruction = self.autoencoder.vae.decode(latents).sample
        return torch.nn.functional.mse_loss(reconstruction, frames), posterior.kl().mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        mse, kl = self.losses(batch, sample=True)
        loss = mse + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/recon_mse": mse, "train/kl": kl}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        mse, kl = self.losses(batch, sample=False)
        self.log_dict({"val/recon_mse": mse, "val/kl": kl})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
