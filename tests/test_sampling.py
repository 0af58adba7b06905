"""Training-free speed-ups: every sampler seeded and well-shaped, guidance rescale, DeepCache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_models.feature_cache import DeepCache, deep_cache
from lit_models.nets import FactorizedUNet
from lit_models.nets.temporal import TemporalAttention
from lit_models.samplers import SAMPLERS
from tests.test_diffusion import tiny_model


@pytest.fixture(scope="module")
def perturbed_model(digits_data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    model, _ = tiny_model(digits_data_root, tmp_path_factory.mktemp("runs"))
    with torch.no_grad():  # a non-trivial net, so samplers and caches have something to differ on
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.slow
def test_every_sampler_is_finite_shaped_and_seeded(perturbed_model, sampler: str) -> None:
    prompts = ["a handwritten 1 moving up", "a handwritten 2 moving left"]
    first = perturbed_model.generate(prompts, sampler=sampler, steps=2, seed=1, num_frames=4)
    assert first.shape == (2, 1, 4, 16, 16)
    assert torch.isfinite(first).all()
    assert torch.equal(first, perturbed_model.generate(prompts, sampler=sampler, steps=2, seed=1, num_frames=4))


@pytest.mark.slow
def test_guidance_rescale_changes_guided_samples_only(perturbed_model) -> None:
    prompts = ["a handwritten 3 moving up"]
    plain = perturbed_model.sample
    generate = lambda **kw: perturbed_model.generate(prompts, sampler="ddim", steps=3, seed=0, **kw)  # noqa: E731
    base = generate(guidance_scale=5.0)
    perturbed_model.guidance_rescale = 0.7
    try:
        assert not torch.allclose(base, generate(guidance_scale=5.0))
        # Without guidance there is nothing to rescale.
        perturbed_model.guidance_rescale = 0.0
        unguided = generate(guidance_scale=1.0)
        perturbed_model.guidance_rescale = 0.7
        assert torch.equal(unguided, generate(guidance_scale=1.0))
    finally:
        perturbed_model.guidance_rescale = 0.0
    assert perturbed_model.sample == plain


def tiny_unet(blocks_per_level: int = 1) -> FactorizedUNet:
    torch.manual_seed(0)
    net = FactorizedUNet(
        channels=(8, 16, 16), blocks_per_level=blocks_per_level, context_dim=16, pooled_dim=16,
        temporal=lambda c: TemporalAttention(c, heads=2),
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def unet_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 4, 16, 16, generator=g)
    cond = {"context": torch.randn(2, 5, 16, generator=g), "pooled": torch.randn(2, 16, generator=g)}
    return x, torch.tensor([500, 500]), cond


@torch.no_grad()
def test_deepcache_interval_one_is_the_plain_net_exactly() -> None:
    net = tiny_unet()
    cache = DeepCache(net, interval=1)
    for seed in range(3):
        x, t, cond = unet_inputs(seed)
        assert torch.equal(cache(x, t, **cond), net(x, t, **cond))


@pytest.mark.parametrize("blocks_per_level", [1, 2])
@torch.no_grad()
def test_deepcache_reuses_deep_features_between_full_calls(blocks_per_level: int) -> None:
    net = tiny_unet(blocks_per_level)
    cache = DeepCache(net, interval=3)
    mid_calls = []  # the mid stage's ResBlock runs only when the mid stage really computes
    net.mid_stage.resblock.register_forward_hook(lambda *_: mid_calls.append(1))
    x, t, cond = unet_inputs(0)
    full = cache(x, t, **cond)
    # Same input: the shallow path recomputes what the full call did, on the cached deep features.
    assert torch.allclose(cache(x, t, **cond), full, atol=1e-5)
    x2, _, _ = unet_inputs(1)
    assert not torch.allclose(cache(x2, t, **cond), net(x2, t, **cond), atol=1e-3)
    cache(x2, t, **cond)  # call 3: full again
    assert len(mid_calls) == 3  # full calls 0 and 3, plus the plain net call above
    cache.remove()
    assert torch.equal(net(x, t, **cond), full)  # the hook is gone, the net untouched


@torch.no_grad()
@pytest.mark.slow
def test_deep_cache_context_samples_and_restores_the_net(perturbed_model) -> None:
    net = perturbed_model.net
    prompts = ["a handwritten 4 moving right"]
    with deep_cache(perturbed_model, interval=1) as cache:
        assert cache is None
        exact = perturbed_model.generate(prompts, sampler="ddim", steps=4, seed=0, num_frames=4)
    with deep_cache(perturbed_model, interval=2) as cache:
        cached = perturbed_model.generate(prompts, sampler="ddim", steps=4, seed=0, num_frames=4)
        assert cache.calls == 4
    assert perturbed_model.net is net
    assert cached.shape == exact.shape and torch.isfinite(cached).all()


@torch.no_grad()
@pytest.mark.slow
def test_sampling_benchmark_extends_a_run_with_the_noise_one_longer_run_draws(perturbed_model) -> None:
    from benchmarks.sampling import digit_prompts, measure, merge_rows

    prompts = digit_prompts(4)
    assert digit_prompts(2, first=2) == prompts[2:]
    whole, _, _ = measure(perturbed_model, prompts, "ddim", 2, 3.0, 1, seed=7, batch=2)
    head, _, _ = measure(perturbed_model, prompts[:2], "ddim", 2, 3.0, 1, seed=7, batch=2)
    tail, _, _ = measure(perturbed_model, prompts[2:], "ddim", 2, 3.0, 1, seed=7, batch=2, first_video=2)
    assert torch.equal(torch.cat([head, tail]), whole)

    def row(first: int, per_video: list[float], label: str = "a") -> dict:
        return {"label": label, "sampler": "ddim", "steps": 2, "cache": 1, "nfe": 2, "sec_per_video": 1.0, "guidance": 3.0,
                "seed": 7, "first_video": first, "videos": len(per_video), "digit_accuracy": sum(per_video) / len(per_video),
                "per_video_digit_accuracy": per_video}  # fmt: skip

    (merged,) = merge_rows([row(0, [1.0, 0.0]), row(2, [1.0, 1.0, 1.0, 1.0])])
    assert merged["videos"] == 6 and merged["digit_accuracy"] == pytest.approx(5 / 6)
    assert merged["digit_se"] == pytest.approx(float(torch.tensor([1.0, 0, 1, 1, 1, 1]).std()) / 6**0.5)
    assert len(merge_rows([row(0, [1.0, 0.0]), row(1, [1.0, 1.0])])) == 2  # overlapping reruns stay apart
    assert len(merge_rows([row(0, [1.0]), row(1, [0.0], label="b")])) == 2
