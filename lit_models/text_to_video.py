"""Text-to-video: the diffusion core conditioned on open_clip text embeddings."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.diffusion import Conditioning, DiffusionModule
from lit_models.latent import FrameAutoencoder
from lit_models.video_logging import ValidationSamples


class TextToVideo(ValidationSamples, DiffusionModule):
    """Caption-conditioned video diffusion with classifier-free guidance.

    Args:
        text_encoder: open_clip text tower; trained with the net when `trainable`.
        cfg_dropout: probability of replacing a caption by the empty caption in training,
            which teaches the unconditional model that guidance needs.
        val_prompts: prompts sampled at every validation; when they are moving-digit captions
            the digit metric is computed on the samples.
        val_samples_per_prompt: videos drawn per prompt.
        video_shape: `(C, F, H, W)` of sampled videos.
        sample_fps: frame rate of the written sample mp4s.
        autoencoder: a frozen `FrameAutoencoder` to diffuse in its latent space (clips are
            encoded per frame before noising, samples decoded); None diffuses pixels.
        text_encoder_lr_scale: the trainable text encoder's learning rate as a multiple of the
            optimizer's (diffusers' training scripts' separate text-encoder lr). Adam moves every
            weight by about lr per step whatever its gradient; the denoising loss's gradient
            on the tower is mostly noise, so at the net's lr a small tower drifts.
        **diffusion: `DiffusionModule` arguments.
    """

    def __init__(
        self,
        net: nn.Module,
        text_encoder: OpenClipTextEncoder,
        cfg_dropout: float = 0.1,
        val_prompts: Sequence[str] = (),
        val_samples_per_prompt: int = 1,
        video_shape: Sequence[int] = (3, 8, 16, 16),
        sample_fps: float = 4.0,
        sample_seed: int = 0,
        autoencoder: FrameAutoencoder | None = None,
        text_encoder_lr_scale: float = 1.0,
        **diffusion: Any,
    ) -> None:
        super().__init__(net=net, **diffusion)
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.cfg_dropout = cfg_dropout
        self.val_prompts = list(val_prompts)
        self.val_samples_per_prompt = val_samples_per_prompt
        self.video_shape = tuple(video_shape)
        self.sample_fps = sample_fps
        self.sample_seed = sample_seed
        self.text_encoder_lr_scale = text_encoder_lr_scale
        if autoencoder is not None:
            self.check_video_shape(autoencoder)

    def parameter_groups(self) -> list[Tensor] | list[dict[str, Any]]:
        params = super().parameter_groups()
        if self.text_encoder_lr_scale == 1.0:
            return params
        text = {id(p) for p in self.text_encoder.parameters()}
        lr = self.optimizer_factory.keywords["lr"] * self.text_encoder_lr_scale
        return [
            {"params": [p for p in params if id(p) not in text]},
            {"params": [p for p in params if id(p) in text], "lr": lr},
        ]

    def check_video_shape(self, autoencoder: nn.Module) -> None:
        """Fail at construction, naming the numbers, when the data cannot go through the VAE."""
        channels, frames, height, width = (int(v) for v in self.video_shape)
        vae_channels = autoencoder.vae.config.get("in_channels", channels)
        if vae_channels != channels:
            raise ValueError(f"data.channels={channels} but the VAE takes {vae_channels}-channel frames")
        check = getattr(autoencoder, "check_shape", None)
        if check is not None:
            check(frames, height, width, where=f"data.num_frames={frames}, data.size={height}")

    # --- what a checkpoint holds ----------------------------------------------------------
    # Submodule prefixes rebuilt from `pretrained=` whenever the run is loaded (a bundle's frozen
    # text encoder and VAE, gigabytes for the real families), so checkpoints leave them out.
    external_parts: tuple[str, ...] = ()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        state = super().state_dict(*args, **kwargs)
        if self.external_parts:
            # In place: nested calls (EMA's AveragedModel) write into the caller's dict.
            skip = tuple(kwargs.get("prefix", args[1] if len(args) > 1 else "") + p for p in self.external_parts)
            for key in [k for k in state if k.startswith(skip)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        if self.external_parts:
            own = torch.nn.Module.state_dict(self)
            state_dict = {**{k: v for k, v in own.items() if k.startswith(self.external_parts)}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- latent space (identity without an autoencoder) ----------------------------------
    def encode_data(self, videos: Tensor) -> Tensor:
        return videos if self.autoencoder is None else self.autoencoder.encode(videos)

    def decode_data(self, latents: Tensor) -> Tensor:
        return latents if self.autoencoder is None else self.autoencoder.decode(latents)

    def data_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the diffusion runs in for videos of `shape` `(B, C, F, H, W)`."""
        return shape if self.autoencoder is None else self.autoencoder.latent_shape(shape)

    def clean_data(self, batch: dict[str, Any]) -> Tensor:
        """x0 `(B, C, F, H, W)` in diffusion space: the batch's precomputed `latent`
        (`effvid-data encode` shards) or its `video`, encoded when the model is latent."""
        if "latent" in batch:
            return batch["latent"]
        if self.autoencoder is None:
            return batch["video"]
        # Stored in the batch: the frozen VAE runs once per batch although training_step and
        # condition() (known frames, the low-res clip) both ask for x0.
        batch["latent"] = self.encode_data(batch["video"])
        return batch["latent"]

    def encode_captions(self, captions: Sequence[str]) -> Conditioning:
        """Network conditioning for captions; a pretrained family's encoder may have no pooled
        feature or mask (its denoiser takes none), and those entries are then left out."""
        embedding = self.text_encoder.encode(list(captions))
        conditioning = {"context": embedding.tokens, "pooled": embedding.pooled, "context_mask": embedding.mask}
        return {name: value for name, value in conditioning.items() if value is not None}

    def condition(self, batch: dict[str, Any], drop: bool) -> Conditioning:
        captions = list(batch["caption"])
        keep = torch.ones(len(captions), dtype=torch.bool)
        if drop and self.cfg_dropout > 0:
            keep = torch.rand(len(captions)) >= self.cfg_dropout
        if "context" not in batch:
            return self.encode_captions([c if k else "" for c, k in zip(captions, keep.tolist())])
        # Precomputed embeddings (a frozen encoder, checked against the shards' _encoder.json):
        # dropped captions take the empty caption's embedding, as in the branch above.
        conditioning = {name: batch[name] for name in ("context", "pooled", "context_mask") if name in batch}
        if keep.all():
            return conditioning
        empty = self.encode_captions([""])
        return {
            name: torch.where(keep.to(value.device).view(-1, *[1] * (value.dim() - 1)), value, empty[name].to(value))
            for name, value in conditioning.items()
        }

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        num_frames: int | None = None,
    ) -> Tensor:
        """Videos `(len(prompts), C, F, H, W)` in [-1, 1] for the prompts."""
        channels, frames, height, width = self.video_shape
        shape = (len(prompts), channels, num_frames or frames, height, width)
        conditioning = self.encode_captions(prompts)
        unconditioning = self.encode_captions([""] * len(prompts))
        generator = torch.Generator().manual_seed(seed)
        latents = self.sample(self.data_shape(shape), conditioning, unconditioning, sampler, steps, guidance_scale, generator)
        return self.decode_data(latents)
