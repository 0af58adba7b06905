"""A ControlNet beside a pretrained SD-family U-Net (image or AnimateDiff motion U-Net), as
diffusers' `AnimateDiffControlNetPipeline` runs one: the frozen U-Net's encoder copied into a
trainable `ControlNetModel` (`from_unet`: zero-initialised output convs, so step 0 is the base),
fed the noisy latents and a per-frame control image, its residuals added to the U-Net's skips.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

# A motion U-Net's block types and their image U-Net counterparts (same weights but the motion modules).
_IMAGE_BLOCKS = {
    "CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D",
    "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D", "UpBlockMotion": "UpBlock2D",
    "UNetMidBlockCrossAttnMotion": "UNetMidBlock2DCrossAttn",
}  # fmt: skip


def image_unet(unet: nn.Module) -> nn.Module:
    """The `UNet2DConditionModel` inside a U-Net: itself, or a motion U-Net without its motion modules."""
    from diffusers import UNet2DConditionModel

    if isinstance(unet, UNet2DConditionModel):
        return unet
    import inspect

    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"num_attention_heads"}
    config = {k: v for k, v in unet.config.items() if k in accepted}
    config["down_block_types"] = [_IMAGE_BLOCKS[b] for b in config["down_block_types"]]
    config["up_block_types"] = [_IMAGE_BLOCKS[b] for b in config["up_block_types"]]
    config["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    config["attention_head_dim"] = unet.config.get("num_attention_heads") or unet.config.attention_head_dim
    image = UNet2DConditionModel.from_config(config)
    state = {k: v for k, v in unet.state_dict().items() if "motion_modules" not in k}
    missing, _ = image.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"image_unet: the motion U-Net lacks image weights, e.g. {missing[:3]}")
    return image


class DiffusersControlledUNet(nn.Module):
    """`DiffusersFrameUNet` plus a trainable ControlNet reading `control` `(B, c, F, H', W')`
    (per-frame control images at pixel resolution, e.g. Sobel edges of the clip); without
    `control` it is the base U-Net.

    Args:
        net: a `DiffusersFrameUNet` (its U-Net stays frozen).
        control_channels: channels of the control images.
    """

    def __init__(self, net: nn.Module, control_channels: int = 1) -> None:
        from diffusers import ControlNetModel

        super().__init__()
        self.base = net
        self.controlnet = ControlNetModel.from_unet(image_unet(net.unet), conditioning_channels=control_channels)
        self.controlnet.requires_grad_(True)

    @property
    def unet(self) -> nn.Module:
        return self.base.unet

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        return self.base.sequence_length(latent_shape)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, control: Tensor | None = None,
                **conditioning: Any) -> Tensor:
        # x: (B, C, F, H, W) latents; control: (B, c, F, H', W') in [0, 1]
        if control is None:
            return self.base(x, timesteps, context=context, **conditioning)
        frames = x.shape[2]
        # The ControlNet's conditioning encoder downsamples by 8, to the latent size.
        images = rearrange(control.to(x.dtype), "b c f h w -> (b f) c h w")
        images = F.interpolate(images, size=(x.shape[3] * 8, x.shape[4] * 8), mode="bilinear", align_corners=False)
        down, mid = self.controlnet(
            rearrange(x, "b c f h w -> (b f) c h w"),
            repeat(timesteps.expand(x.shape[0]), "b -> (b f)", f=frames),
            encoder_hidden_states=repeat(context, "b l d -> (b f) l d", f=frames),
            controlnet_cond=images,
            return_dict=False,
        )
        return self.base(x, timesteps, context=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **conditioning)
