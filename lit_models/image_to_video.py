"""Image-to-video on a frozen text-to-video model, as I2V-Adapter (Guo et al. 2024) trains and
samples it: the diffusion module with the `FirstFrameGiven` input (`lit_models/inputs.py`: the
first frame given clean, a frame-similarity noise prior when sampling) and the `I2VAdapter`
injector's first-frame attention branch as what trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lit_models.inputs import FirstFrameGiven
from lit_models.peft import ParameterEfficientFineTuning


class ImageToVideoFineTuning(ParameterEfficientFineTuning):
    """Fine-tuning of a frozen base with the first frame of every clip given clean
    (`FirstFrameGiven`: `prior_strength`, `prior_noise_level`); `ParameterEfficientFineTuning`'s
    other arguments (`trainable: [I2VAdapter]`), without a control signal."""

    def __init__(self, prior_strength: float = 0.0, prior_noise_level: float = 0.7, control_signal: str | None = None,
                 **peft: Any) -> None:  # fmt: skip
        if control_signal is not None:
            raise ValueError("ImageToVideoFineTuning: control_signal is not supported with a given first frame")
        super().__init__(inputs=FirstFrameGiven(prior_strength, prior_noise_level), **peft)

    def generate_from_image(self, prompts: Sequence[str], images: Tensor, seed: int = 0, num_frames: int | None = None,
                            **sampling: Any) -> Tensor:  # fmt: skip
        """Videos `(B, C, F, H, W)` whose first frame is `images` `(B, C, H, W)` in [-1, 1];
        `sampling`: `sample`'s sampler, steps, guidance_scale."""
        return self.generate(prompts, seed=seed, num_frames=num_frames, images=images, **sampling)
