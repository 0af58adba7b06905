"""Training-free feature caching for sampling.

- `DeepCache` (Ma et al. 2024) for effvid's `FactorizedUNet`: between full steps, only the
  outermost level runs; the deep features entering its up stage are reused from the last
  full step. The net is hooked from outside (its own forward is unchanged), so the U-Net
  stays one module and any checkpoint samples with or without caching.
- Diffusers transformers cache with diffusers' own hooks; see
  `lit_models.nets.diffusers_video.DiffusersVideoBackbone.enable_cache`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from lit_models.nets.unet import FactorizedUNet


def _empty_like_channels(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """A zero-channel stand-in for a skipped module's output: concatenating it is free."""
    return x[:, :0]


class DeepCache(nn.Module):
    """Wrap a `FactorizedUNet` so that only every `interval`-th call runs the whole net.

    A full call stores the features the deepest-but-outermost upsampler hands to the level-0
    up stages; the calls in between run `conv_in`, the level-0 down stages, the level-0 up
    stages and `conv_out`, with those features taken from the store. `interval=1` is the
    plain net, exactly. Call `reset()` before each sampling run; `deep_cache` wraps one
    sampling run. With classifier-free guidance both halves are one call, so they share a step.

    Args:
        net: the U-Net; needs at least two levels.
        interval: full calls happen at call 0, interval, 2 * interval, ...
    """

    def __init__(self, net: FactorizedUNet, interval: int = 3) -> None:
        super().__init__()
        if not isinstance(net, FactorizedUNet):
            raise TypeError(f"DeepCache: needs a FactorizedUNet, got {type(net).__name__}")
        if net.num_levels < 2:
            raise ValueError("DeepCache: the U-Net needs at least two levels to cache the deep ones")
        if interval < 1:
            raise ValueError(f"DeepCache: interval must be >= 1, got {interval}")
        self.net = net
        self.interval = interval
        self.calls = 0
        self.cached: Tensor | None = None
        blocks = net.blocks_per_level
        # The upsampler feeding level 0 is the last but one (the last is the identity at level 0).
        self.boundary = net.upsamplers[net.num_levels - 2]
        self.skipped: list[nn.Module] = [
            *net.down_stages[blocks:], net.downsamplers[0], *net.downsamplers[1:],
            net.mid_stage, *net.up_stages[: len(net.up_stages) - blocks], *net.upsamplers[: net.num_levels - 2],
        ]  # fmt: skip
        self._hook = self.boundary.register_forward_hook(self._store)

    def reset(self) -> None:
        self.calls, self.cached = 0, None

    def remove(self) -> None:
        """Detach from the U-Net (drop the hook and the stored features)."""
        self._hook.remove()
        self.reset()

    def _store(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.cached = output

    def forward(self, x: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        full = self.calls % self.interval == 0 or self.cached is None
        self.calls += 1
        if full:
            return self.net(x, timesteps, **conditioning)
        cached = self.cached
        # Instance attributes shadow the class's forward for this call only.
        for module in self.skipped:
            module.forward = _empty_like_channels
        self.boundary.forward = lambda h: cached
        try:
            return self.net(x, timesteps, **conditioning)
        finally:
            for module in [*self.skipped, self.boundary]:
                del module.forward
            self.cached = cached


@contextmanager
def deep_cache(model: nn.Module, interval: int) -> Iterator[DeepCache | None]:
    """Sample `model` (a `DiffusionModule`) with DeepCache on its U-Net inside the block.
    The U-Net may sit inside conditioning wrappers (masked frames, low-res input) that keep
    it as `.net`."""
    if interval <= 1:
        yield None
        return
    owner = model
    while not isinstance(owner.net, FactorizedUNet) and isinstance(getattr(owner.net, "net", None), nn.Module):
        owner = owner.net
    net = owner.net
    cache = DeepCache(net, interval)
    owner.net = cache
    try:
        yield cache
    finally:
        owner.net = net
        cache.remove()


DIFFUSERS_CACHES = ("first_block", "pyramid")


@contextmanager
def sampling_cache(model: nn.Module, spec: int | str | None) -> Iterator[None]:
    """Feature caching for one sampling run: `spec` is a DeepCache interval (effvid's U-Net;
    None or 1 = off) or the name of a diffusers cache hook for diffusers transformer
    backbones (`first_block`: `FirstBlockCacheConfig`, `pyramid`:
    `PyramidAttentionBroadcastConfig`)."""
    if spec is None or isinstance(spec, int) or str(spec).isdigit():
        with deep_cache(model, int(spec or 1)):
            yield
        return
    if spec not in DIFFUSERS_CACHES:
        raise ValueError(f"cache={spec!r}: give a DeepCache interval (an integer) or one of {DIFFUSERS_CACHES}")
    if not hasattr(model.net, "enable_cache"):
        raise ValueError(f"cache={spec} needs a diffusers transformer backbone (model=latte|cogvideox); "
                         f"this run's net is {type(model.net).__name__}: use an integer DeepCache interval")
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    config = FirstBlockCacheConfig(threshold=0.05) if spec == "first_block" else PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800))
    model.net.enable_cache(config)
    try:
        yield
    finally:
        model.net.disable_cache()
