"""Latent space: diffusers' `AutoencoderKL` applied frame by frame, and its training on the
digits (`effvid-train experiment=vae_digits`).

A paradigm given `autoencoder=FrameAutoencoder(...)` diffuses in its latent space: clean
clips are encoded per frame before noising, samples decoded per frame (MagicVideo, LVDM and
Video LDM are latent models; `paradigm.autoencoder=...` turns any text-to-video config latent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import Tensor, nn


class FrameAutoencoder(nn.Module):
    """`AutoencoderKL` per frame: videos `(B, C, F, H, W)` <-> latents `(B, c, F, H/f, W/f)`.

    Args:
        pretrained: a diffusers folder (e.g. an SD VAE, `subfolder="vae"`); else built from
            the sizes below, randomly initialised (for `vae_digits`) or loaded from `weights`.
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
    ) -> None:
        super().__init__()
        if pretrained is not None:
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
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as error:  # torch raises several types for missing or foreign files
                raise ValueError(f"FrameAutoencoder: cannot read weights {weights}: {error}") from None
            state = state.get("state_dict", state)
            vae_state = {k[len("autoencoder.vae.") :]: v for k, v in state.items() if k.startswith("autoencoder.vae.")}
            if not vae_state:
                raise ValueError(f"FrameAutoencoder: {weights} holds no autoencoder.vae.* weights (not a vae_digits run)")
            self.vae.load_state_dict(vae_state)
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
