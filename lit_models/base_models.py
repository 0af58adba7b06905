"""Pretrained bases for fine-tuning paradigms: an effvid run's checkpoint or a diffusers model.

The fine-tuning paradigms (`peft.py`, `preference.py`) start from a trained network and its
text encoder. These loaders rebuild them from what a checkpoint records (its `effvid`
stamp holds the composed config) without unpickling anything, so a config can point at a
base by path:

    model:   {_target_: lit_models.base_models.load_effvid_net, ckpt: runs/base/checkpoints/last.ckpt}
    paradigm.text_encoder: {_target_: lit_models.base_models.load_effvid_text_encoder, ckpt: ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from einops import rearrange, repeat
from omegaconf import OmegaConf
from torch import Tensor, nn

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.trusted_config import instantiate_trusted


class BaseCheckpointError(ValueError):
    """A base checkpoint is missing, unreadable or not an effvid run's checkpoint."""


def read_effvid_checkpoint(ckpt: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The (EMA) `state_dict` and composed config of an effvid run checkpoint."""
    path = Path(ckpt)
    if not path.is_file():
        raise BaseCheckpointError(f"base checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise BaseCheckpointError(f"cannot read base checkpoint {path}: {error}") from None
    stamp = checkpoint.get("effvid")
    if stamp is None or "config" not in stamp:
        raise BaseCheckpointError(f"{path} has no effvid stamp (config); is it an effvid-train checkpoint?")
    return checkpoint["state_dict"], stamp["config"]


def _sub_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_effvid_net(ckpt: str | Path) -> nn.Module:
    """The denoiser of an effvid run, built from the run's config with the checkpoint's weights."""
    state, config = read_effvid_checkpoint(ckpt)
    net = instantiate_trusted(OmegaConf.create(config)["model"], str(ckpt))
    net.load_state_dict(_sub_state(state, "net."))
    return net


def load_effvid_text_encoder(ckpt: str | Path, trainable: bool = False) -> OpenClipTextEncoder:
    """The text encoder of an effvid run (frozen unless `trainable`)."""
    state, config = read_effvid_checkpoint(ckpt)
    encoder_cfg = OmegaConf.create(config)["paradigm"]["text_encoder"]
    encoder_cfg.trainable = trainable
    encoder = instantiate_trusted(encoder_cfg, str(ckpt))
    encoder.load_state_dict(_sub_state(state, "text_encoder."))
    return encoder


class DiffusersFrameUNet(nn.Module):
    """A diffusers 2D or motion U-Net behind effvid's net contract `net(x, timesteps, context=...)`
    with x `(B, C, F, H, W)`.

    `UNet2DConditionModel` sees frames folded into the batch; `UNetMotionModel` takes the clip
    itself but, like the image model, wants the text tokens repeated per frame `(B*F, L, D)`
    (AnimateDiff's pipeline does the same). The pooled text feature and the padding mask are
    not used: SD-style U-Nets condition on tokens only.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def is_motion_model(self) -> bool:
        return type(self.unet).__name__ == "UNetMotionModel"

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        # x: (B, C, F, H, W), context: (B, L, D)
        num_frames = x.shape[2]
        if context is None:
            raise ValueError("DiffusersFrameUNet: diffusers U-Nets need text tokens (context)")
        tokens = repeat(context, "b l d -> (b f) l d", f=num_frames)  # (B*F, L, D)
        if self.is_motion_model:
            return self.unet(x, timesteps, encoder_hidden_states=tokens, **extra).sample
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        frame_timesteps = repeat(timesteps.expand(x.shape[0]), "b -> (b f)", f=num_frames)
        out = self.unet(frames, frame_timesteps, encoder_hidden_states=tokens, **extra).sample
        return rearrange(out, "(b f) c h w -> b c f h w", f=num_frames)


def load_diffusers_net(path: str | Path, subfolder: str | None = None) -> DiffusersFrameUNet:
    """A diffusers `UNet2DConditionModel` from `from_pretrained` (a local folder or a hub id the
    user has cached), wrapped to take clips."""
    from diffusers import UNet2DConditionModel

    return DiffusersFrameUNet(UNet2DConditionModel.from_pretrained(str(path), subfolder=subfolder))


def load_effvid_module(ckpt: str | Path) -> nn.Module:
    """The whole paradigm module of an effvid run (net, text encoder, sampler settings) in eval
    mode, for sampling. PEFT checkpoints hold only their trained weights; their config names
    the base, which the model config loads first."""
    state, config = read_effvid_checkpoint(ckpt)
    cfg = OmegaConf.create(config)
    module = instantiate_trusted(cfg.paradigm, str(ckpt), net=instantiate_trusted(cfg.model, str(ckpt)))
    result = module.load_state_dict(state, strict=False)
    trained = getattr(module, "trainable_names", None)  # PEFT: only its trained weights are stored
    missing = [k for k in result.missing_keys if trained is None or k in trained]
    if missing or result.unexpected_keys:
        raise BaseCheckpointError(
            f"checkpoint {ckpt} does not match the model of its config: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    return module.eval()


def load_text_encoder(ckpt: str | Path | None = None, trainable: bool = False, **open_clip: Any) -> OpenClipTextEncoder:
    """The text encoder of an effvid run when `ckpt` is given, else an `OpenClipTextEncoder`
    built from `open_clip` (model_name, pretrained, ...), e.g. for a diffusers base."""
    if ckpt is not None:
        return load_effvid_text_encoder(ckpt, trainable)
    return OpenClipTextEncoder(trainable=trainable, **open_clip)
