"""The one diffusion module every paradigm is: a network, its noise schedule, text conditioning,
an optional VAE, sampling and one training step.

What a paradigm changes is a component chosen by config, not a subclass's `training_step`:

- `objective` (`lit_models/objectives.py`): what a step minimises, as EDM2's loss callables are
  (the denoising loss, Diffusion-DPO / SFT, progressive / consistency / phased distillation,
  joint image-video masking);
- `inputs` (`lit_models/inputs.py`): what the net sees beside the text, in training and when
  sampling (a low-res clip, known frames, a clean first frame, a control clip), as finetrainers'
  `prepare_conditions` / `prepare_latents`;
- `trainable` (`lit_models/injectors.py`): what trains on a frozen base (LoRA, adapters, ...);
  None trains everything the module holds.

A component's own API is reached through it: `module.objective.teacher`, `module.inputs.augment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import lightning as L
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn

from lit_models.fine_tuning import FineTuningCheckpoint
from lit_models.forward_process import Conditioning, ForwardProcess, decomposed_noise
from lit_models.inputs import TextOnly
from lit_models.objectives import DenoisingLoss, Objective
from lit_models.samplers import make_sampler
from lit_models.sampling_loop import Sampling
from lit_models.video_logging import ValidationSamples

# Precomputed latents of `effvid-data encode` shards. Latents this module encodes itself are
# cached under `ENCODED_CACHE`, so a cached encoding is never mistaken for a shard's.
SHARD_LATENTS = "latent"
ENCODED_CACHE = "_encoded"


def build_net(net: nn.Module | Callable[..., nn.Module], text_encoder: nn.Module | None) -> nn.Module:
    """The denoiser: `net` itself, or `net(context_dim=..., pooled_dim=...)` for a factory (a
    Hydra `_partial_`), its widths read from the text encoder that feeds it; widths the factory
    already names win (an experiment conditioning on CLIP image embeddings sets its own)."""
    if isinstance(net, nn.Module) or net is None:
        return net
    given = getattr(net, "keywords", {}) or {}
    widths = {}
    if text_encoder is not None:
        widths = {"context_dim": int(text_encoder.token_dim), "pooled_dim": int(text_encoder.pooled_dim)}
    return net(**{k: v for k, v in widths.items() if k not in given})


class DiffusionModule(ForwardProcess, Sampling, ValidationSamples, FineTuningCheckpoint, L.LightningModule):
    """Denoising diffusion over videos `(B, C, F, H, W)` with a diffusers noise schedule.

    Args:
        net: denoiser called as `net(x_t, timesteps, **conditioning)`, or a factory of it
            (`build_net`).
        noise_scheduler: diffusers scheduler defining the forward process and the target.
        optimizer: partial taking the parameters (Hydra `_partial_: true`).
        lr_scheduler: optional partial taking the optimizer; stepped every optimizer step.
        min_snr_gamma: Min-SNR weighting; None for the plain MSE (flow matching ignores it).
        sampler, sample_steps, guidance_scale, guidance_rescale: defaults for `sample`.
        flow_weighting: flow-matching training noise levels (`logit_normal` or `uniform`).
        shared_noise_ratio: VideoFusion's decomposed noise (`decomposed_noise`).
        sampling_modifiers: training-free changes around every sampling run (`training_free.py`).
        text_encoder: caption encoder (None: unconditional, or a paradigm with its own).
        cfg_dropout: probability of the empty caption in training (classifier-free guidance).
        val_prompts, val_samples_per_prompt, sample_fps, sample_seed: validation samples.
        video_shape: `(C, F, H, W)` of sampled videos.
        autoencoder: a frozen VAE to diffuse in its latent space; None diffuses pixels.
        text_encoder_lr_scale: a trainable text encoder's lr as a multiple of the optimizer's.
        objective: what a training step minimises; the denoising loss by default.
        inputs: what the net sees beside the text; nothing by default.
        trainable: injectors applied in order to a frozen base (`injectors.py`); None trains
            the whole module (an empty list: the whole base, frozen text encoder).
        base: where a fine-tuned base came from, recorded in checkpoints.
    """

    def __init__(
        self,
        net: nn.Module | Callable[..., nn.Module],
        noise_scheduler: DDPMScheduler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        min_snr_gamma: float | None = 5.0,
        sampler: str = "dpmpp",
        sample_steps: int = 20,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        flow_weighting: str = "logit_normal",
        shared_noise_ratio: float = 0.0,
        sampling_modifiers: Sequence[Any] = (),
        text_encoder: nn.Module | None = None,
        cfg_dropout: float = 0.1,
        val_prompts: Sequence[str] = (),
        val_samples_per_prompt: int = 1,
        video_shape: Sequence[int] = (3, 8, 16, 16),
        sample_fps: float = 4.0,
        sample_seed: int = 0,
        autoencoder: nn.Module | None = None,
        text_encoder_lr_scale: float = 1.0,
        objective: Objective | None = None,
        inputs: TextOnly | None = None,
        trainable: Sequence[Any] | None = None,
        base: str | None = None,
    ) -> None:
        super().__init__()
        self.objective = objective if objective is not None else DenoisingLoss()
        self.inputs = inputs if inputs is not None else TextOnly()
        net = self.inputs.wrap_net(build_net(net, text_encoder), text_encoder)
        self.objective.before_injection(net, trainable)
        self.net = self.inject(net, trainable, text_encoder)
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.min_snr_gamma = min_snr_gamma
        self.sampler, self.sample_steps = sampler, sample_steps
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.flow_weighting = flow_weighting
        decomposed_noise((1, 1, 1, 1, 1), shared_noise_ratio)  # fail at construction on a bad ratio
        self.shared_noise_ratio = shared_noise_ratio
        self.sampling_modifiers = list(sampling_modifiers)
        make_sampler(sampler, noise_scheduler)  # fail at construction on a bad sampler name
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.cfg_dropout = cfg_dropout
        self.val_prompts, self.val_samples_per_prompt = list(val_prompts), val_samples_per_prompt
        self.video_shape = tuple(video_shape)
        self.sample_fps, self.sample_seed = sample_fps, sample_seed
        self.text_encoder_lr_scale = text_encoder_lr_scale
        self.base = base
        if autoencoder is not None:
            self.check_video_shape(autoencoder)
        self.inputs.bind(self)
        self.objective.bind(self)
        self.record_trainable(trainable)

    def check_video_shape(self, autoencoder: nn.Module) -> None:
        """Fail at construction, naming the numbers, when the data cannot go through the VAE."""
        channels, frames, height, width = (int(v) for v in self.video_shape)
        vae_channels = autoencoder.vae.config.get("in_channels", channels)
        if vae_channels != channels:
            raise ValueError(f"data.channels={channels} but the VAE takes {vae_channels}-channel frames")
        check = getattr(autoencoder, "check_shape", None)
        if check is not None:
            check(frames, height, width, where=f"data.num_frames={frames}, data.size={height}")

    # --- latent space (identity without an autoencoder) ----------------------------------
    def encode_data(self, videos: Tensor) -> Tensor:
        return videos if self.autoencoder is None else self.autoencoder.encode(videos)

    def decode_data(self, latents: Tensor) -> Tensor:
        return latents if self.autoencoder is None else self.autoencoder.decode(latents)

    def data_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the diffusion runs in for videos of `shape` `(B, C, F, H, W)`."""
        return shape if self.autoencoder is None else self.autoencoder.latent_shape(shape)

    def clean_data(self, batch: dict[str, Any], key: str = "video") -> Tensor:
        """`batch[key]` `(B, C, F, H, W)` in diffusion space: the shard's precomputed latents for
        the video (`effvid-data encode`), else encoded once per batch (the objective and the
        inputs both ask for it) and cached under `ENCODED_CACHE`; every key goes the same way
        (a preference pair's `win` and `lose`)."""
        if key == "video" and SHARD_LATENTS in batch:
            return batch[SHARD_LATENTS]
        if self.autoencoder is None:
            return batch[key]
        cache = batch.setdefault(ENCODED_CACHE, {})
        if key not in cache:
            cache[key] = self.encode_data(batch[key])
        return cache[key]

    # --- text conditioning ------------------------------------------------------------------
    def encode_captions(self, captions: Sequence[str]) -> Conditioning:
        """Network conditioning for captions; entries the encoder lacks (a family without a
        pooled feature or mask) are left out; a net that encodes captions itself (X-Adapter's
        old base) adds its own."""
        embedding = self.text_encoder.encode(list(captions))
        conditioning = {"context": embedding.tokens, "pooled": embedding.pooled, "context_mask": embedding.mask}
        conditioning = {name: value for name, value in conditioning.items() if value is not None}
        encode_more = getattr(self.net, "encode_captions", None)
        return {**conditioning, **encode_more(list(captions))} if encode_more is not None else conditioning

    def text_condition(self, batch: dict[str, Any], drop: bool) -> Conditioning:
        """The captions' conditioning, with classifier-free-guidance dropout when `drop`."""
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

    def condition(self, batch: dict[str, Any], drop: bool) -> Conditioning:
        """Network conditioning for a training batch: the text's plus the paradigm's inputs
        (derived from the batch's clean data); `drop` applies classifier-free-guidance dropout."""
        text = self.text_condition(batch, drop) if self.text_encoder is not None else {}
        return {**text, **self.inputs.training(self, batch, drop)}

    # --- the one training step ----------------------------------------------------------
    def _step(self, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Tensor:
        losses, batch_size = self.objective(self, batch, stage, generator)
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("loss", "implicit_accuracy"), batch_size=batch_size,
                     sync_dist=stage == "val")  # fmt: skip
        return losses["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Fixed noise and timesteps per batch, so validation losses are comparable across steps.
        loss = self._step(batch, "val", torch.Generator().manual_seed(batch_idx))
        self.inputs.on_validation_batch(self, batch, batch_idx)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.objective.on_train_batch_start(self)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.objective.on_train_batch_end(self)
        self.log_peak_memory()

    def train(self, mode: bool = True) -> DiffusionModule:
        super().train(mode)
        self.objective.keep_frozen_in_eval()
        return self

    # --- optimisation -------------------------------------------------------------------
    def parameter_groups(self) -> list[Tensor] | list[dict[str, Any]]:
        """What the optimizer trains: the trainable parameters, a trainable text encoder at its
        own lr (`text_encoder_lr_scale`)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.text_encoder_lr_scale == 1.0 or self.text_encoder is None:
            return params
        text = {id(p) for p in self.text_encoder.parameters()}
        lr = self.optimizer_factory.keywords["lr"] * self.text_encoder_lr_scale
        return [
            {"params": [p for p in params if id(p) not in text]},
            {"params": [p for p in params if id(p) in text], "lr": lr},
        ]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
