"""Image-to-video on a frozen text-to-video model, as I2V-Adapter (Guo et al. 2024) trains and
samples it: the diffusion module with the `FirstFrameGiven` input (`lit_models/inputs.py`: the
first frame given clean, a frame-similarity noise prior when sampling) and the `I2VAdapter`
injector's first-frame attention branch as what trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lit_models.diffusion import DiffusionModule
from lit_models.inputs import FirstFrameGiven
from lit_models.peft import require_bundle


class ImageToVideoFineTuning(DiffusionModule):
    """Fine-tuning of a frozen base with the first frame of every clip given clean.

    Args:
        prior_strength, prior_noise_level: `FirstFrameGiven` arguments.
        trainable, base: what trains on the frozen base and where it came from (`trainable:
            [I2VAdapter]`).
        control_signal: must be null (the peft paradigm's option, not combined with this input).
        **diffusion: `DiffusionModule` arguments.
    """

    def __init__(self, net: nn.Module, text_encoder: nn.Module, prior_strength: float = 0.0, prior_noise_level: float = 0.7,
                 trainable: Sequence[Any] = (), base: str | None = None, control_signal: str | None = None,
                 **diffusion: Any) -> None:  # fmt: skip
        require_bundle(type(self).__name__, net, text_encoder, diffusion.get("noise_scheduler"))
        if control_signal is not None:
            raise ValueError("ImageToVideoFineTuning: control_signal is not supported with a given first frame")
        super().__init__(net=net, text_encoder=text_encoder, trainable=list(trainable), base=base,
                         inputs=FirstFrameGiven(prior_strength, prior_noise_level), **diffusion)  # fmt: skip

    def generate_from_image(self, prompts: Sequence[str], images: Tensor, seed: int = 0, num_frames: int | None = None,
                            **sampling: Any) -> Tensor:  # fmt: skip
        """Videos `(B, C, F, H, W)` whose first frame is `images` `(B, C, H, W)` in [-1, 1];
        `sampling`: `sample`'s sampler, steps, guidance_scale."""
        return self.generate(prompts, seed=seed, num_frames=num_frames, images=images, **sampling)
