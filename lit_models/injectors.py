"""Injectors: what a fine-tune on a frozen base trains (`DiffusionModule(trainable=[...])`).
Each is called on the net and returns it with the modules it trains added or unfrozen; they run
in order, so MotionLoRA is `[MotionModule(pretrained=...), LoRA(on motion modules)]`.

- `LoRA` (`lora.py`): low-rank adapters through `peft` on modules matched by name;
- `TrainOnly`: unfreeze the base's own parameters matched by name (AnimateDiff's motion module
  of a factorized net);
- `SimDAAdapters`: SimDA's spatial and temporal adapters (`nets/adapters.py`);
- `MotionModule`: AnimateDiff's temporal transformers in a frozen diffusers image U-Net;
- `ControlBranch`: a ControlNet-style trainable encoder copy fed a per-frame control signal;
- `CtrlAdapter`: Ctrl-Adapter's adapters from a frozen image ControlNet into the frozen base;
- `XAdapter`: X-Adapter's mapping layers from an old base's decoder into the frozen (new) base;
- `I2VAdapter`: I2V-Adapter's first-frame attention branch beside each spatial self-attention.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from lit_models.lora import LoRA  # noqa: F401 - an injector like the others
from lit_models.nets.adapters import (
    AfterAdapter,
    BottleneckAdapter,
    FirstFrameAttention,
    FrameCount,
    ParallelAdapter,
    ResBlockWithTemporalAdapter,
    TemporalAdapter,
)
from lit_models.nets.control import ControlledUNet, CtrlAdaptedUNet, XAdaptedUNet
from lit_models.nets.unet import FactorizedUNet


def _is_diffusers_backbone(net: nn.Module) -> bool:
    return hasattr(net, "unet") and hasattr(getattr(net, "unet"), "config")

def frame_counter(net: nn.Module) -> FrameCount:
    """A `FrameCount` that follows the frames of every call of `net` (a forward pre-hook), for
    adapters inside it that see frames folded into the batch."""
    frames = FrameCount()

    def count_frames(module: nn.Module, args: tuple) -> None:
        frames.value = args[0].shape[2]  # x: (B, C, F, H, W)

    net.register_forward_pre_hook(count_frames)
    return frames


class TrainOnly:
    """Unfreeze the base's own parameters whose names match a regex: AnimateDiff's
    name-matched trainable modules. On a factorized net, `r"\\.temporal\\."` trains the
    temporal layers (its motion module) on top of the frozen spatial (image) layers."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __call__(self, net: nn.Module) -> nn.Module:
        matched = [p for n, p in net.named_parameters() if self.pattern.search(n)]
        if not matched:
            raise ValueError(f"TrainOnly: pattern {self.pattern.pattern!r} matches no parameter of the net")
        for parameter in matched:
            parameter.requires_grad_(True)
        return net


class SimDAAdapters:
    """SimDA's adapters: spatial ones in the spatial transformers (after self-attention, beside
    the feed-forward) and a temporal one after every ResBlock, zero-initialised (step 0 is the
    base). On effvid's `FactorizedUNet`, or a bundle's diffusers denoiser: every transformer block
    with `attn1` and a feed-forward outside the temporal layers gets the spatial pair, every
    `ResnetBlock2D` of a U-Net family the temporal one (transformer families have no ResBlocks).

    Args:
        spatial_ratio: bottleneck width of the spatial adapters (SimDA: 0.25).
        temporal_ratio: bottleneck width of the temporal adapters (C -> C/2).
        spatial: insert the spatial adapters.
        temporal: insert the temporal adapters; None: wherever the net has ResBlocks.
    """

    TEMPORAL_BLOCKS = ("motion_modules", "temp_attentions", "transformer_in")  # diffusers' temporal layers

    def __init__(self, spatial_ratio: float = 0.25, temporal_ratio: float = 0.5, spatial: bool = True,
                 temporal: bool | None = None) -> None:
        self.spatial_ratio, self.temporal_ratio = spatial_ratio, temporal_ratio
        self.spatial, self.temporal = spatial, temporal

    def __call__(self, net: nn.Module) -> nn.Module:
        frames = frame_counter(net)
        if isinstance(net, FactorizedUNet):
            return self._factorized(net, frames)
        from lit_models.diffusers_pipelines import denoiser_model

        try:
            model = denoiser_model(net)
        except ValueError:
            raise TypeError(f"SimDAAdapters: needs a FactorizedUNet or a diffusers denoiser, got {type(net).__name__}") from None
        return self._diffusers(net, model, frames)

    def _factorized(self, net: FactorizedUNet, frames: FrameCount) -> nn.Module:
        for stage in [*net.down_stages, net.mid_stage, *net.up_stages]:
            channels = stage.resblock.conv2.out_channels
            if self.temporal is not False:
                stage.resblock = ResBlockWithTemporalAdapter(stage.resblock, TemporalAdapter(channels, self.temporal_ratio), frames)
            if self.spatial and stage.transformer is not None:
                block = stage.transformer
                block.self_attention = AfterAdapter(block.self_attention, BottleneckAdapter(channels, self.spatial_ratio))
                block.feed_forward = ParallelAdapter(block.feed_forward, BottleneckAdapter(channels, self.spatial_ratio))
        return net

    def _diffusers(self, net: nn.Module, model: nn.Module, frames: FrameCount) -> nn.Module:
        modules = list(model.named_modules())
        resblocks = [(n, m) for n, m in modules if type(m).__name__ == "ResnetBlock2D"]
        if self.temporal and not resblocks:
            raise ValueError(
                f"SimDAAdapters: {type(model).__name__} has no ResBlocks for temporal adapters (transformer "
                "families mix time in attention): leave temporal unset or false"
            )
        blocks = [(n, m) for n, m in modules if hasattr(m, "attn1") and (hasattr(m, "ff") or hasattr(m, "ffn"))
                  and not any(part in n for part in self.TEMPORAL_BLOCKS)]  # fmt: skip
        for name, block in blocks if self.spatial else ():
            width = block.attn1.to_out[0].out_features
            block.attn1 = AfterAdapter(block.attn1, BottleneckAdapter(width, self.spatial_ratio))
            feed_forward = "ff" if hasattr(block, "ff") else "ffn"
            setattr(block, feed_forward, ParallelAdapter(getattr(block, feed_forward), BottleneckAdapter(width, self.spatial_ratio)))
        for name, resblock in resblocks if self.temporal is not False else ():
            parent, _, child = name.rpartition(".")
            wrapped = ResBlockWithTemporalAdapter(resblock, TemporalAdapter(resblock.conv2.out_channels, self.temporal_ratio), frames)
            setattr(model.get_submodule(parent), child, wrapped)
        if not blocks and self.spatial:
            raise ValueError(f"SimDAAdapters: {type(model).__name__} has no transformer blocks for spatial adapters")
        return net


class MotionModule:
    """AnimateDiff: motion modules in a frozen diffusers image U-Net (`DiffusersFrameUNet`), trained
    alone. A U-Net that has none yet gets them through diffusers' `UNetMotionModel.from_unet2d`:
    from a saved `MotionAdapter` (`pretrained`), or new ones sized by `adapter` (the U-Net's
    `block_out_channels` unless given). A U-Net that already holds them (an AnimateDiff folder,
    or `bundle.motion_adapter=`) keeps its own.

    Args:
        adapter: `MotionAdapter` config kwargs for new motion modules.
        pretrained: path of a saved `MotionAdapter` (`save_pretrained`).
        train: whether the motion modules train (False when LoRA goes on top: MotionLoRA).
        zero_init_output: zero each new motion transformer's `proj_out`, as AnimateDiff does
            (diffusers initialises it randomly), so training starts at the image model.
    """

    def __init__(self, adapter: dict[str, Any] | None = None, pretrained: str | None = None, train: bool = True,
                 zero_init_output: bool = True) -> None:
        if adapter is not None and pretrained is not None:
            raise ValueError("MotionModule: give adapter (sizes for new modules) or pretrained (a saved adapter), not both")
        self.adapter, self.pretrained, self.train, self.zero_init_output = adapter, pretrained, train, zero_init_output

    def __call__(self, net: nn.Module) -> nn.Module:
        from diffusers import MotionAdapter, UNetMotionModel

        if not _is_diffusers_backbone(net):
            raise TypeError(
                f"MotionModule: motion modules go into a diffusers image U-Net (the animatediff family), "
                f"not a {type(net).__name__}"
            )
        if type(net.unet).__name__ == "UNetMotionModel":
            if self.pretrained is not None:
                raise ValueError("MotionModule: this U-Net already holds motion modules; drop MotionModule.pretrained")
            motion_unet = net.unet
        else:
            if self.pretrained is not None:
                motion_adapter = MotionAdapter.from_pretrained(self.pretrained)
            else:
                unet = net.unet.config  # AnimateDiff's modules mirror the U-Net's levels and groups
                sizes = {"block_out_channels": list(unet.block_out_channels), "motion_layers_per_block": unet.layers_per_block,
                         "motion_norm_num_groups": unet.norm_num_groups, **(self.adapter or {})}
                motion_adapter = MotionAdapter(**sizes)
                if self.zero_init_output:
                    for name, parameter in motion_adapter.named_parameters():
                        if "proj_out" in name:
                            nn.init.zeros_(parameter)
            motion_unet = UNetMotionModel.from_unet2d(net.unet, motion_adapter)
        motion_unet.freeze_unet2d_params()  # leaves only the motion modules trainable
        if not self.train:
            motion_unet.requires_grad_(False)
        net.unet = motion_unet
        return net


def save_motion_adapter(net: nn.Module, path: str | Path) -> Path:
    """Save the motion modules of a `MotionModule` net as a diffusers `MotionAdapter` folder
    (`MotionAdapter.from_pretrained(path)`, then `AnimateDiffPipeline(..., motion_adapter=...)`)."""
    from diffusers import MotionAdapter

    config = net.unet.config
    adapter = MotionAdapter(
        block_out_channels=tuple(config["block_out_channels"]),
        motion_layers_per_block=config["layers_per_block"],
        motion_transformer_layers_per_block=config["temporal_transformer_layers_per_block"],
        motion_mid_block_layers_per_block=config["mid_block_layers"],
        motion_transformer_layers_per_mid_block=config["temporal_transformer_layers_per_mid_block"],
        motion_num_attention_heads=config["motion_num_attention_heads"],
        motion_norm_num_groups=config["norm_num_groups"],
        motion_max_seq_length=config["motion_max_seq_length"],
        use_motion_mid_block=config["use_motion_mid_block"],
    )
    state = {k: v for k, v in net.unet.state_dict().items() if "motion_modules" in k}
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"save_motion_adapter: the U-Net's motion modules do not fill a MotionAdapter of its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    adapter.save_pretrained(str(path))
    return Path(path)


class ControlBranch:
    """A ControlNet-style branch trained alone beside the frozen base: effvid's own on a
    `FactorizedUNet` (`nets/control.py`), diffusers' `ControlNetModel.from_unet` on an SD-family
    U-Net of a bundle (`nets/diffusers_control.py`)."""

    def __init__(self, control_channels: int = 1, hint_channels: int = 16) -> None:
        self.control_channels, self.hint_channels = control_channels, hint_channels

    def __call__(self, net: nn.Module) -> nn.Module:
        if isinstance(net, FactorizedUNet):
            return ControlledUNet(net, self.control_channels, self.hint_channels)
        if _is_diffusers_backbone(net):
            from lit_models.nets.diffusers_control import DiffusersControlledUNet

            return DiffusersControlledUNet(net, self.control_channels)
        raise TypeError(
            f"ControlBranch: a control branch copies a U-Net's encoder (effvid's, or the animatediff family's); "
            f"{type(net).__name__} has none"
        )


class CtrlAdapter:
    """Ctrl-Adapter: a frozen image ControlNet feeds the frozen base through trained adapters with
    temporal layers (`nets/control.py` `CtrlAdaptedUNet`); only the adapters train.

    Args:
        controlnet: the image ControlNet: an effvid run (path or run id) whose net is a control
            branch on an image model (`experiment=controlvideo`), or that `ControlledUNet` itself.
        sparse_control: in training, the chance that a frame (not the first) gets no control.
        runs_dir: where a bare run id is looked up.
    """

    def __init__(self, controlnet: str | nn.Module, sparse_control: float = 0.0, runs_dir: str | None = None) -> None:
        if not 0.0 <= sparse_control < 1.0:
            raise ValueError(f"CtrlAdapter: sparse_control must be in [0, 1), got {sparse_control}")
        self.controlnet, self.sparse_control, self.runs_dir = controlnet, sparse_control, runs_dir

    def __call__(self, net: nn.Module) -> nn.Module:
        if not isinstance(net, FactorizedUNet):
            raise TypeError(f"CtrlAdapter: the backbone must be effvid's FactorizedUNet, got {type(net).__name__}")
        controlnet = self.controlnet
        if not isinstance(controlnet, nn.Module):
            from lit_models.bundle import load_bundle

            controlnet = load_bundle(controlnet, runs_dir=self.runs_dir).net
        if not isinstance(controlnet, ControlledUNet):
            raise TypeError(f"CtrlAdapter: controlnet={self.controlnet} holds a {type(controlnet).__name__}, not a "
                            "control branch (train one with experiment=controlvideo or control_a_video)")
        return CtrlAdaptedUNet(net, controlnet, self.sparse_control)


class XAdapter:
    """X-Adapter: the frozen old base (an effvid run, with its own text encoder) runs beside the
    frozen new base, and only the mapping layers from its decoder into the new one train
    (`nets/control.py` `XAdaptedUNet`). A plugin of the old base then acts on the new one: inject
    it into `net.old_base` (e.g. `LoRA(...)(net.old_base)` and `import_lora(net.old_base, file)`).

    Args:
        old_base: the old run (path or run id), or its denoiser (then give `old_text_encoder`).
        old_text_encoder: the old base's text encoder when `old_base` is a module.
        runs_dir: where a bare run id is looked up.
    """

    def __init__(self, old_base: str | nn.Module, old_text_encoder: nn.Module | None = None, runs_dir: str | None = None) -> None:
        if isinstance(old_base, nn.Module) and old_text_encoder is None:
            raise ValueError("XAdapter: an old base given as a module needs its old_text_encoder")
        self.old_base, self.old_text_encoder, self.runs_dir = old_base, old_text_encoder, runs_dir

    def __call__(self, net: nn.Module) -> nn.Module:
        old_base, old_text_encoder = self.old_base, self.old_text_encoder
        if not isinstance(old_base, nn.Module):
            from lit_models.bundle import load_bundle

            bundle = load_bundle(old_base, runs_dir=self.runs_dir)
            old_base, old_text_encoder = bundle.net, bundle.text_encoder
        return XAdaptedUNet(net, old_base, old_text_encoder)


class I2VAdapter:
    """I2V-Adapter (Guo et al. 2024): beside every spatial self-attention of a `FactorizedUNet`, a
    branch in which each frame queries the first frame's tokens through the base's frozen key and
    value projections, with its own query projection and a zero-initialised output (step 0 is the
    base, exactly). Train it with `ImageToVideoFineTuning`, which gives the first frame clean."""

    def __call__(self, net: nn.Module) -> nn.Module:
        if not isinstance(net, FactorizedUNet):
            raise TypeError(f"I2VAdapter: needs effvid's FactorizedUNet (its spatial self-attention), got {type(net).__name__}")
        blocks = [stage.transformer for stage in [*net.down_stages, net.mid_stage, *net.up_stages] if stage.transformer is not None]
        if not blocks:
            raise ValueError("I2VAdapter: the U-Net has no spatial self-attention (every attention_levels entry is false)")
        frames = frame_counter(net)
        for block in blocks:
            block.self_attention = FirstFrameAttention(block.self_attention, frames)
        return net
