"""Parameter-efficient fine-tuning: a frozen pretrained base plus only what the config names.

The paradigm takes the base network of a pretrained bundle (`bundle.py`: an effvid run or a
diffusers pipeline folder), freezes it and the text encoder, and applies `trainable`: a list of
injectors, each adding the modules it trains:

- `LoRA`: low-rank adapters through `peft` on modules matched by name (spatial and/or
  temporal attention, convs), with merge/unmerge and safetensors export/import;
- `SimDAAdapters`: SimDA's spatial and temporal adapters (`nets/adapters.py`);
- `MotionModule`: AnimateDiff's temporal transformers in a frozen diffusers image U-Net;
- `ControlBranch`: a ControlNet-style trainable encoder copy fed a per-frame control signal;
- `CtrlAdapter`: Ctrl-Adapter's adapters from a frozen image ControlNet (a control-branch run)
  into the frozen base;
- `XAdapter`: X-Adapter's mapping layers from an old base's decoder into the frozen (new) base;
- `I2VAdapter`: I2V-Adapter's first-frame attention branch beside each spatial self-attention
  (trained with the first frame given clean: `lit_models/image_to_video.py`).

Injectors run in order, so MotionLoRA is `[MotionModule(pretrained=...), LoRA(on motion
modules)]`. An empty list trains the whole base (full fine-tuning, the baseline).
Checkpoints hold only the trained weights (`state_dict` is filtered) plus the base's path.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_models.nets.adapters import (
    AfterAdapter,
    BottleneckAdapter,
    FirstFrameAttention,
    FrameCount,
    ParallelAdapter,
    ResBlockWithTemporalAdapter,
    TemporalAdapter,
)
from lit_models.nets.control import ControlledUNet, CtrlAdaptedUNet, XAdaptedUNet, sobel_edges
from lit_models.nets.unet import FactorizedUNet
from lit_models.text_to_video import TextToVideo


# --- injectors ----------------------------------------------------------------------------


class LoRA:
    """LoRA through `peft.inject_adapter_in_model` on the modules whose names match.

    Args:
        target_modules: a regex over full module names (peft's `target_modules` string form)
            or a list of name suffixes. The default covers the factorized U-Net's spatial
            and temporal attention projections and ResBlock convs.
        rank, alpha, dropout: LoRA's r, lora_alpha, lora_dropout.
    """

    DEFAULT_TARGETS = r".*(to_q|to_kv|to_qkv|to_out|proj_in|proj_out|conv1|conv2)$"

    def __init__(
        self,
        target_modules: str | Sequence[str] = DEFAULT_TARGETS,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.rank, self.alpha, self.dropout, self.adapter_name = rank, alpha, dropout, adapter_name

    def config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules
        )

    def __call__(self, net: nn.Module) -> nn.Module:
        from peft import inject_adapter_in_model

        try:
            return inject_adapter_in_model(self.config(), net, adapter_name=self.adapter_name)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"LoRA: target_modules={self.target_modules!r} match no module of the net: {error}") from None


def lora_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """The net with its LoRA layers switched off: the base, with no second copy in memory."""
    layers = lora_layers(net)
    if not layers:
        raise ValueError("adapters_disabled: the net has no LoRA layers")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            # enable_adapters re-marks the adapter trainable; that is what it was.


def merge_lora(net: nn.Module) -> None:
    """Fold the LoRA deltas into the base weights (faster inference; `unmerge_lora` undoes)."""
    for layer in lora_layers(net):
        layer.merge()


def unmerge_lora(net: nn.Module) -> None:
    for layer in lora_layers(net):
        layer.unmerge()


def merge_and_unload_lora(net: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight and put the plain base layer back in its place, so
    parameter names are the base model's again (`to_q.weight`, not `to_q.base_layer.weight`):
    what `save_pretrained` must see for diffusers to load the weights instead of initialising
    them anew. In place; returns `net`."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, module.get_base_layer())
    return net


def _is_diffusers_backbone(net: nn.Module) -> bool:
    return hasattr(net, "unet") and hasattr(getattr(net, "unet"), "config")


def _lora_scalings(net: nn.Module, adapter_name: str) -> set[tuple[int, float]]:
    return {(layer.r[adapter_name], float(layer.lora_alpha[adapter_name])) for layer in lora_layers(net)}


def export_lora(net: nn.Module, path: str | Path, lora: LoRA | None = None, adapter_name: str = "default") -> Path:
    """Write an effvid net's adapter alone to a safetensors file, in peft's keys (`...lora_A.weight`,
    adapter name removed), with the rank and alpha in its metadata: alpha / rank scales the update,
    and a file without it would load at the wrong strength. (Pretrained diffusers families export
    through `lit_models/export.py`, in the layout their pipelines' `load_lora_weights` reads.)"""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(net, adapter_name=adapter_name)
    if not state:
        raise ValueError("export_lora: the net has no LoRA weights")
    scalings = _lora_scalings(net, adapter_name)
    if len(scalings) != 1:
        raise ValueError(f"export_lora: layers differ in (rank, alpha) {sorted(scalings)}; one pair per file")
    (rank, alpha), = scalings
    config = lora.config().to_dict() if lora is not None else {"r": rank, "lora_alpha": alpha}
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    state = {k: v.detach().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config, default=str)})
    return path


def import_lora(net: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Load an `export_lora` file into a net that has LoRA layers of the same rank and alpha."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    ours = _lora_scalings(net, adapter_name)
    if metadata and ours != {(int(metadata["r"]), float(metadata["lora_alpha"]))}:
        raise ValueError(
            f"import_lora: {path} holds rank {metadata['r']}, alpha {metadata['lora_alpha']}; the net's LoRA "
            f"layers have (rank, alpha) {sorted(ours)}"
        )
    result = set_peft_model_state_dict(net, load_file(str(path)), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"import_lora: {path} has keys the net's LoRA layers lack, e.g. {unexpected[:3]}")


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


CONTROL_SIGNALS = {"sobel_edges": sobel_edges}


# --- the paradigm -------------------------------------------------------------------------


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class ParameterEfficientFineTuning(TextToVideo):
    """Text-to-video fine-tuning of a frozen base that trains only the injected modules.

    Args:
        net: the pretrained base network (frozen here).
        text_encoder: its text encoder (kept frozen).
        trainable: injectors applied in order (see module docstring); empty = full fine-tune.
        base: where the base came from (a checkpoint path or model id), recorded in checkpoints.
        control_signal: name in `CONTROL_SIGNALS` computing the control input from the clip
            (`batch["control"]` wins when the data provides it); only for a `ControlBranch`.
        **text_to_video: `TextToVideo` arguments.
    """

    def __init__(
        self,
        net: nn.Module,
        text_encoder: nn.Module,
        trainable: Sequence[Any] = (),
        base: str | None = None,
        control_signal: str | None = None,
        **text_to_video: Any,
    ) -> None:
        if net is None or text_encoder is None or text_to_video.get("noise_scheduler") is None:
            raise ValueError(
                "ParameterEfficientFineTuning fine-tunes a pretrained bundle: pass pretrained=PATH (a diffusers "
                "pipeline folder, a hub id or an effvid run: runs/RUN_ID)"
            )
        injectors = list(trainable)
        net.requires_grad_(not injectors)  # no injector: full fine-tuning of the base
        for inject in injectors:
            net = inject(net)
        text_encoder.requires_grad_(False)
        super().__init__(net=net, text_encoder=text_encoder, **text_to_video)
        if control_signal is not None and control_signal not in CONTROL_SIGNALS:
            raise ValueError(f"unknown control_signal {control_signal!r}; choose one of {sorted(CONTROL_SIGNALS)}")
        self.control_signal = control_signal
        self.base = base
        self.injectors = injectors
        self.trainable_names = {n for n, p in self.named_parameters() if p.requires_grad}
        if not self.trainable_names:
            raise ValueError("ParameterEfficientFineTuning: nothing to train (every parameter is frozen)")
        self._peak_memory_logged = False

    def encode_captions(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """The base's text conditioning, plus what an injected net encodes itself (X-Adapter's
        old base reads its own text encoder's features)."""
        conditioning = super().encode_captions(captions)
        encode_more = getattr(self.net, "encode_captions", None)
        return {**conditioning, **encode_more(list(captions))} if encode_more is not None else conditioning

    def condition(self, batch: dict[str, Any], drop: bool) -> dict[str, Tensor]:
        conditioning = super().condition(batch, drop)
        if self.control_signal is not None:
            control = batch.get("control")
            conditioning["control"] = control if control is not None else CONTROL_SIGNALS[self.control_signal](batch["video"])
        return conditioning

    @torch.no_grad()
    def generate_with_control(self, prompts: Sequence[str], control: Tensor, seed: int = 0, **sampling: Any) -> Tensor:
        """Videos `(len(prompts), C, F, H, W)` following a control clip `(B, K, F, H, W)` (e.g.
        `sobel_edges(clip)`); a `ControlBranch` run. `sampling`: `sample`'s sampler, steps, guidance_scale."""
        frames = {"control": control.to(self.device)}
        conditioning = {**self.encode_captions(prompts), **frames}
        unconditioning = {**self.encode_captions([""] * len(prompts)), **frames}
        shape = (len(prompts), self.video_shape[0], control.shape[2], *self.video_shape[2:])
        generator = torch.Generator().manual_seed(seed)
        return self.decode_data(self.sample(self.data_shape(shape), conditioning, unconditioning, generator=generator, **sampling))

    # --- what a checkpoint holds ---------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Only the trained weights; the frozen base is found through `base`."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        # In place: nested calls (EMA's AveragedModel) write into the caller's dict.
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :] not in self.trainable_names]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        unexpected = sorted(set(state_dict) - set(super().state_dict()))
        missing = sorted(self.trainable_names - set(state_dict))
        if strict and (unexpected or missing):
            raise RuntimeError(
                f"{type(self).__name__}: checkpoint does not match the trained modules: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        return type(result)(missing, unexpected)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["effvid_base"] = {"base": self.base, "trained": sorted(self.trainable_names)}

    # --- what it reports --------------------------------------------------------------------
    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        self.print(f"PEFT: training {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
        if self.logger:
            self.logger.log_hyperparams({"params/trainable": trainable, "params/total": total})

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._peak_memory_logged and self.global_step >= 1:
            self._peak_memory_logged = True
            self.log("memory/peak_mb", peak_memory_mb(self.device), rank_zero_only=True)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since start: CUDA's allocator peak on a GPU; on a CPU the process's peak
    resident set size (`ru_maxrss`), which includes the interpreter and libraries."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
