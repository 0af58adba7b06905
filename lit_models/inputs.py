"""Inputs: what a paradigm feeds the net beside the text, derived from a training batch's clean
data, or given to `generate` when sampling (finetrainers' `prepare_conditions`).

Each input component says three things: how it wraps the net at build (`wrap_net`), what it adds
to a training batch's conditioning (`training`), and what a `generate(prompts, **given)` call
samples (`sampling`: the diffusion-space shape, the conditioning shared by the guided and the
unguided pass, an optional starting noise and a finishing step on the decoded videos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_models.conditioning import FRAME_MASK_MODES, MaskedFrameConditioning, random_frame_masks
from lit_models.forward_process import CLEAN_FRAMES, CLEAN_MASK, Conditioning
from lit_models.nets.control import sobel_edges

CONTROL_SIGNALS = {"sobel_edges": sobel_edges}


@dataclass
class SamplingRequest:
    """What one `generate` call samples: `shape` in diffusion space, the paradigm's conditioning
    (beside the text), an optional starting noise, and what to do with the decoded videos."""

    shape: tuple[int, ...]
    conditioning: Conditioning = field(default_factory=dict)
    initial_noise: Tensor | None = None
    finish: Callable[[Tensor], Tensor] = lambda videos: videos


class TextOnly:
    """Nothing beside the text (the default)."""

    prompts_alone = True  # `generate(prompts)` works without anything given (validation samples from val_prompts)

    def bind(self, module: Any) -> None:
        """Sees the built module (reads its noise schedule)."""

    def wrap_net(self, net: nn.Module, text_encoder: nn.Module | None) -> nn.Module:
        return net

    def training(self, module: Any, batch: dict[str, Any], drop: bool) -> Conditioning:
        return {}

    def sampling(self, module: Any, shape: tuple[int, ...], generator: torch.Generator, **given: Any) -> SamplingRequest:
        """`shape`: the videos' `(B, C, F, H, W)` from the prompts and `video_shape`."""
        if given:
            raise TypeError(f"{type(module).__name__}.generate takes prompts only, not {sorted(given)}")
        return SamplingRequest(module.data_shape(shape))

    def on_validation_batch(self, module: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation work on real clips (spatial super-resolution upsamples some)."""


class KnownFrames(TextOnly):
    """Masked-frame conditioning (LVDM): the net (wrapped in `MaskedFrameConditioning`, built
    with `in_channels = 2 C + 1`) sees known frames and their mask; training draws a random mask
    per clip (`random_frame_masks`), so any frames can be given when sampling.

    Args:
        mask_modes: training mask modes (see `random_frame_masks`).
    """

    def __init__(self, mask_modes: Sequence[str] = FRAME_MASK_MODES) -> None:
        self.mask_modes = tuple(mask_modes)
        random_frame_masks(1, 2, self.mask_modes)  # a bad mode fails at construction

    def wrap_net(self, net: nn.Module, text_encoder: nn.Module | None) -> nn.Module:
        return net if isinstance(net, MaskedFrameConditioning) else MaskedFrameConditioning(net)

    def training(self, module: Any, batch: dict[str, Any], drop: bool) -> Conditioning:
        known = module.clean_data(batch)  # (B, C, F, H, W) in diffusion space
        generator = None if drop else torch.Generator().manual_seed(0)  # fixed masks at validation
        mask = random_frame_masks(known.shape[0], known.shape[2], self.mask_modes, generator).to(known.device)
        return {"known": known, "known_mask": mask}

    def sampling(self, module: Any, shape: tuple[int, ...], generator: torch.Generator, known: Tensor | None = None,
                 known_mask: Tensor | None = None) -> SamplingRequest:  # fmt: skip
        """Videos shaped like `known` `(B, C, F, H, W)`, its frames where `known_mask` `(B, F)` is
        True given (and copied into the result); without them, plain generation."""
        if known is None or known_mask is None:
            return super().sampling(module, shape, generator)
        known, known_mask = known.to(module.device), known_mask.to(module.device)
        frames = {"known": module.encode_data(known), "known_mask": known_mask}
        finish = lambda videos: torch.where(known_mask[:, None, :, None, None], known, videos)  # noqa: E731
        return SamplingRequest(module.data_shape(tuple(known.shape)), frames, finish=finish)


def first_frame_mask(batch_size: int, num_frames: int, device: torch.device | None = None) -> Tensor:
    """`(B, F)` bool, True at frame 0."""
    mask = torch.zeros(batch_size, num_frames, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


class FirstFrameGiven(TextOnly):
    """Image-to-video as I2V-Adapter trains and samples it: the first frame given clean (the
    core's clean frames: un-noised input, out of the loss, kept while sampling), and sampling
    from a frame-similarity noise prior built from the given image.

    Args:
        prior_strength: gamma of the prior (`frame_similarity_noise`); 0 is plain noise.
        prior_noise_level: where the given frame enters the prior, tau as a fraction of the
            schedule's training timesteps (0.7: t = 0.7 T).
    """

    def __init__(self, prior_strength: float = 0.0, prior_noise_level: float = 0.7) -> None:
        for name, value in (("prior_strength", prior_strength), ("prior_noise_level", prior_noise_level)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.prior_strength, self.prior_noise_level = prior_strength, prior_noise_level

    def training(self, module: Any, batch: dict[str, Any], drop: bool) -> Conditioning:
        x0 = module.clean_data(batch)  # (B, C, F, H, W)
        return {CLEAN_FRAMES: x0, CLEAN_MASK: first_frame_mask(x0.shape[0], x0.shape[2], x0.device)}

    def frame_similarity_noise(self, module: Any, first: Tensor, shape: tuple[int, ...],
                               generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
        """I2V-Adapter's frame-similarity prior (our reading of it): every frame's starting noise
        is `sqrt(gamma) * z1_tau + sqrt(1 - gamma) * eps`, z1_tau the given first frame `first`
        `(B, C, 1, H, W)` noised to `prior_noise_level` (one draw shared by the frames), eps the
        plain per-frame noise. gamma = 0 is exactly the plain draw for the same generator."""
        noise = module.draw_noise(tuple(shape), generator)  # (B, C, F, H, W)
        if self.prior_strength == 0.0:
            return noise
        num_train_timesteps = module.noise_scheduler.config.num_train_timesteps
        tau = round(self.prior_noise_level * (num_train_timesteps - 1))
        timesteps = torch.full((shape[0],), tau, dtype=torch.float32 if module.flow_matching else torch.long)
        noised_first = module.noisy_and_target(first.cpu().float(), torch.randn(first.shape, generator=generator), timesteps)[0]
        gamma = self.prior_strength
        return gamma**0.5 * noised_first + (1.0 - gamma) ** 0.5 * noise

    def sampling(self, module: Any, shape: tuple[int, ...], generator: torch.Generator, images: Tensor | None = None) -> SamplingRequest:
        """Videos whose first frame is `images` `(B, C, H, W)` in [-1, 1]; without, plain generation."""
        if images is None:
            return super().sampling(module, shape, generator)
        shape = module.data_shape(shape)
        first = module.encode_data(images.to(module.device)[:, :, None])  # (B, C', 1, h, w)
        given = {CLEAN_FRAMES: first.expand(shape), CLEAN_MASK: first_frame_mask(shape[0], shape[2], module.device)}
        return SamplingRequest(shape, given, self.frame_similarity_noise(module, first, shape, generator))


class ControlSignal(TextOnly):
    """A per-frame control clip (ControlNet-style branches): `batch["control"]` when the data
    provides it, else computed from the clip by a named signal (`CONTROL_SIGNALS`)."""

    def __init__(self, signal: str) -> None:
        if signal not in CONTROL_SIGNALS:
            raise ValueError(f"unknown control_signal {signal!r}; choose one of {sorted(CONTROL_SIGNALS)}")
        self.signal = signal

    def training(self, module: Any, batch: dict[str, Any], drop: bool) -> Conditioning:
        control = batch.get("control")
        return {"control": control if control is not None else CONTROL_SIGNALS[self.signal](batch["video"])}

    def sampling(self, module: Any, shape: tuple[int, ...], generator: torch.Generator, control: Tensor) -> SamplingRequest:
        """Videos following a control clip `(B, K, F, H, W)` (e.g. `sobel_edges(clip)`)."""
        shape = (shape[0], shape[1], control.shape[2], *shape[3:])
        return SamplingRequest(module.data_shape(shape), {"control": control.to(module.device)})
