"""Every backbone behind the one denoiser interface `net(x, timesteps, context=, pooled=,
context_mask=)`: built from its model/ config, same shape, gradient and overfit checks;
diffusers wrappers round-trip through save_pretrained/from_pretrained and cache exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lit_models.diffusion import build_net
from tests.conftest import compose_config

TEXT_WIDTH = 16
# Per config file, the overrides that make it tiny.
TINY = {
    "factorized_unet": ["model.channels=[8,16]", "model.attention_levels=[false,true]", "model.temporal_levels=[false,true]"],
    "dit": ["model.dim=32", "model.depth=1", "model.heads=2"],
    "uvit": ["model.dim=32", "model.depth=3", "model.heads=2"],
    "mamba": ["model.dim=32", "model.depth=1", "model.d_state=4"],
    "latte": ["model.config.num_layers=1", "model.config.num_attention_heads=2", "model.config.attention_head_dim=8", "model.config.cross_attention_dim=16"],
    "cogvideox": ["model.config.num_layers=1", "model.config.num_attention_heads=2", "model.config.attention_head_dim=8", "model.config.time_embed_dim=16", "model.config.sample_frames=13"],
    "unet3d": [
        "model.config.down_block_types=[CrossAttnDownBlock3D,DownBlock3D]", "model.config.up_block_types=[UpBlock3D,CrossAttnUpBlock3D]",
        "model.config.block_out_channels=[8,16]", "model.config.norm_num_groups=4", "model.config.attention_head_dim=4",
    ],
}
DIFFUSERS = ["latte", "cogvideox", "unet3d"]
# Overfit steps: 20, but diffusers' UNet3D (the slowest step here) fits to 0.47x in 8.
FIT_STEPS = {"unet3d": 8}
# Parameters diffusers' own forward never uses (Latte keeps PixArt's adaLN-single projection).
UNUSED = {"latte": {"model.adaln_single.linear.weight", "model.adaln_single.linear.bias"}}


def tiny_backbone(name: str) -> torch.nn.Module:
    overrides = [
        f"model={name}", "run_id=t", "data.num_frames=4",
        f"paradigm.text_encoder.text_cfg.width={TEXT_WIDTH}", f"paradigm.text_encoder.embed_dim={TEXT_WIDTH}",
        "paradigm.text_encoder.text_cfg.context_length=6", *TINY[name],
    ]  # fmt: skip
    cfg = compose_config(overrides)
    text_encoder = instantiate(cfg.paradigm.text_encoder)
    torch.manual_seed(0)
    return build_net(instantiate(cfg.model), text_encoder)  # a factory's widths come from the text encoder


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 4, 16, 16, generator=g)  # (B, C, F, H, W)
    conditioning = {
        "context": torch.randn(2, 6, TEXT_WIDTH, generator=g),
        "pooled": torch.randn(2, TEXT_WIDTH, generator=g),
        "context_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool),
    }
    return x, torch.tensor([10, 700]), conditioning


@pytest.mark.parametrize("name", sorted(TINY))
def test_backbone_shape_gradient_and_overfit(name: str) -> None:
    net = tiny_backbone(name)
    x, timesteps, conditioning = inputs()
    out = net(x, timesteps, **conditioning)
    assert out.shape == x.shape and torch.isfinite(out).all()

    target = x.flip(2)  # a fixed batch to fit: the clip played backwards
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    grads = [p.grad for n, p in net.named_parameters() if p.requires_grad and n not in UNUSED.get(name, ())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "a parameter is cut off the graph"
    assert sum(g.abs().sum() for g in grads) > 0

    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-3)
    first = loss.item()
    for _ in range(FIT_STEPS.get(name, 20)):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x, timesteps, **conditioning), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.9 * first, (first, loss.item())


@pytest.mark.parametrize("name", DIFFUSERS)
@torch.no_grad()
def test_diffusers_backbone_loads_through_from_pretrained(name: str, tmp_path: Path) -> None:
    net = tiny_backbone(name)
    net.model.save_pretrained(tmp_path / name)
    loaded = type(net)(pretrained=str(tmp_path / name))
    x, timesteps, conditioning = inputs()
    assert torch.equal(loaded(x, timesteps, **conditioning), net(x, timesteps, **conditioning))
    with pytest.raises(ValueError, match="exactly one of pretrained=, config= or model="):
        type(net)(pretrained=str(tmp_path / name), config={"in_channels": 1})


@torch.no_grad()
def test_diffusers_cache_hooks_are_exact_at_skip_range_one() -> None:
    from diffusers import PyramidAttentionBroadcastConfig

    net = tiny_backbone("latte").eval()
    for p in net.parameters():  # a non-trivial net, so a reused attention output would show
        p.add_(0.05 * torch.randn_like(p))
    x, _, conditioning = inputs()
    steps = [torch.tensor([t, t]) for t in (900, 600, 300)]
    plain = [net(x + 0.1 * i, t, **conditioning) for i, t in enumerate(steps)]
    net.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1, temporal_attention_block_skip_range=1,
            spatial_attention_timestep_skip_range=(0, 1000), temporal_attention_timestep_skip_range=(0, 1000),
        )
    )  # fmt: skip
    assert net.model.is_cache_enabled
    assert all(torch.equal(net(x + 0.1 * i, t, **conditioning), p) for i, (t, p) in enumerate(zip(steps, plain)))
    net.disable_cache()
    assert not net.model.is_cache_enabled
