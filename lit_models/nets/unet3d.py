"""diffusers' `UNet3DConditionModel` (ModelScope T2V's backbone) behind effvid's net interface
`net(x, timesteps, context=..., pooled=..., context_mask=...)`, so every paradigm can use it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet3DConditionModel
from torch import Tensor, nn


class DiffusersUNet3D(nn.Module):
    """A thin wrapper: builds (or loads with `pretrained`) a `UNet3DConditionModel`.

    The pooled text embedding is not used (the model has no such input), and neither is the
    token padding mask: diffusers' 3D U-Net takes no encoder attention mask, so padding tokens
    are attended (their features are what the text tower gives them). `image_frames` is not
    supported: the model's temporal layers mix every frame.

    Args:
        pretrained: a diffusers model folder to load instead of building from the sizes.
        other args: `UNet3DConditionModel` arguments.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (32, 64, 64),
        down_block_types: Sequence[str] = ("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types: Sequence[str] = ("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
        layers_per_block: int = 1,
        cross_attention_dim: int = 64,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            self.unet = UNet3DConditionModel.from_pretrained(pretrained)
        else:
            self.unet = UNet3DConditionModel(
                in_channels=in_channels,
                out_channels=out_channels,
                block_out_channels=tuple(block_out_channels),
                down_block_types=tuple(down_block_types),
                up_block_types=tuple(up_block_types),
                layers_per_block=layers_per_block,
                cross_attention_dim=cross_attention_dim,
                attention_head_dim=attention_head_dim,
                norm_num_groups=norm_num_groups,
            )

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        image_frames: Tensor | None = None,
    ) -> Tensor:
        # x: (B, C, F, H, W), context: (B, L, D)
        if image_frames is not None:
            raise ValueError("DiffusersUNet3D: image_frames (joint image-video batches) are not supported")
        if context is None:  # the model always cross-attends; one zero token means "no text"
            context = torch.zeros(x.shape[0], 1, self.unet.config.cross_attention_dim, dtype=x.dtype, device=x.device)
        return self.unet(x, timesteps, encoder_hidden_states=context).sample  # (B, C_out, F, H, W)
