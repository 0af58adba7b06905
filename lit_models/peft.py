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


class ParameterEfficientFineTuning(DiffusionModule):
    """Text-to-video fine-tuning of a frozen base that trains only the injected modules; the base
    of the fine-tuning paradigms (`DiffusionDPO`, `ImageToVideoFineTuning`).

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
        if net is None or text_encoder is None or diffusion.get("noise_scheduler") is None:
            raise ValueError(
                f"{type(self).__name__} fine-tunes a pretrained bundle: pass pretrained=PATH (a diffusers pipeline "
                "folder, a hub id or an effvid run: runs/RUN_ID)"
            )
        if control_signal is not None:
            diffusion["inputs"] = ControlSignal(control_signal)
        super().__init__(net=net, text_encoder=text_encoder, trainable=list(trainable), base=base, **diffusion)
        self.control_signal = control_signal
