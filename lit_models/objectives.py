"""Objectives: what one training (or validation) step of a `DiffusionModule` minimises.

An objective is called as `objective(module, batch, stage, generator)` and returns the losses to
log (`loss` is the one optimised) and the batch size, as EDM2's loss callables are called with
the network and the data. It may hold networks of its own (a distillation teacher, a DPO
reference), which are then submodules of the module, in its checkpoints. The paradigm objectives
live beside their maths: `preference.py` (DPO / SFT), `distillation.py` (progressive,
consistency, phased), `joint_image_video.py` (joint image-video masking).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

Losses = tuple[dict[str, Tensor], int]  # (name -> value, with "loss" the optimised one; batch size)


class Objective(nn.Module):
    """The interface, and the hooks' defaults (nothing to do)."""

    def before_injection(self, net: nn.Module, trainable: Sequence[Any] | None) -> None:
        """Sees the base network before any injector changes it (a DPO reference copy)."""

    def bind(self, module: Any) -> None:
        """Sees the built module (loads a teacher, copies the student, sets sampling defaults)."""

    def keep_frozen_in_eval(self) -> None:
        """Called after `module.train()`: frozen networks stay in eval mode."""

    def on_train_batch_start(self, module: Any) -> None:
        pass

    def on_train_batch_end(self, module: Any) -> None:
        pass

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        raise NotImplementedError


class DenoisingLoss(Objective):
    """The weighted denoising loss on the batch's clean data (`module.diffusion_loss`), with
    classifier-free-guidance dropout in training."""

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        x0 = module.clean_data(batch)  # (B, C, F, H, W) in diffusion space
        conditioning = module.condition(batch, drop=stage == "train")
        return {"loss": module.diffusion_loss(x0, conditioning, generator).mean()}, x0.shape[0]
