"""Parameter-efficient fine-tuning: a frozen pretrained base plus only what the config names.

The paradigm takes the base network of a pretrained bundle (`bundle.py`: an effvid run or a
diffusers pipeline folder), freezes it and the text encoder, and applies `trainable`, a list of
injectors (`injectors.py`, `lora.py`); an empty list trains the whole base (full fine-tuning,
the baseline). Checkpoints hold only the trained weights plus the base's path
(`fine_tuning.py`). The injectors are importable from here, the names configs use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lit_models.diffusion import DiffusionModule
from lit_models.injectors import (  # noqa: F401 - the names configs' _target_ use
    ControlBranch,
    CtrlAdapter,
    I2VAdapter,
    LoRA,
    MotionModule,
    SimDAAdapters,
    TrainOnly,
    XAdapter,
)
from lit_models.inputs import ControlSignal


def require_bundle(paradigm: str, net: nn.Module | None, text_encoder: nn.Module | None, noise_scheduler: Any) -> None:
    if net is None or text_encoder is None or noise_scheduler is None:
        raise ValueError(
            f"{paradigm} fine-tunes a pretrained bundle: pass pretrained=PATH (a diffusers pipeline folder, a hub id "
            "or an effvid run: runs/RUN_ID)"
        )


class ParameterEfficientFineTuning(DiffusionModule):
    """Text-to-video fine-tuning of a frozen base that trains only the injected modules.

    Args:
        net: the pretrained base network (frozen here).
        text_encoder: its text encoder (kept frozen).
        trainable: injectors applied in order (see module docstring); empty = full fine-tune.
        base: where the base came from (a checkpoint path or model id), recorded in checkpoints.
        control_signal: name in `CONTROL_SIGNALS` computing the control input from the clip
            (`batch["control"]` wins when the data provides it); only for a `ControlBranch`.
        **diffusion: `DiffusionModule` arguments (the bundle's noise schedule among them).
    """

    def __init__(self, net: nn.Module, text_encoder: nn.Module, trainable: Sequence[Any] = (), base: str | None = None,
                 control_signal: str | None = None, **diffusion: Any) -> None:  # fmt: skip
        require_bundle(type(self).__name__, net, text_encoder, diffusion.get("noise_scheduler"))
        inputs = ControlSignal(control_signal) if control_signal is not None else None
        super().__init__(net=net, text_encoder=text_encoder, trainable=list(trainable), base=base, inputs=inputs, **diffusion)
        self.control_signal = control_signal
