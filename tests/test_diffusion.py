"""The diffusion core: loss weighting, learning on a fixed batch, sampling to files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from data_tools.video_io import decode_mp4
from lit_models.forward_process import min_snr_weights
from lit_models.samplers import SAMPLERS
from lit_models.video_logging import save_samples
from tests.conftest import compose_config, tiny_overrides


def tiny_model(data_root: Path, tmp_path: Path, *extra: str):
    cfg = compose_config([*tiny_overrides(data_root, tmp_path), "run_id=t", *extra])
    torch.manual_seed(0)
    return instantiate(cfg.paradigm, net=instantiate(cfg.model)), cfg


def test_min_snr_weights_are_one_x0_weight_for_every_target() -> None:
    snr = torch.tensor([0.01, 0.5, 5.0, 50.0])
    gamma = 5.0
    x0_weight = min_snr_weights(snr, gamma, "sample")
    assert torch.allclose(x0_weight, torch.tensor([0.01, 0.5, 5.0, 5.0]))
    # eps loss = snr * x0 loss and v loss = (snr + 1) * x0 loss, so the weighted losses agree.
    assert torch.allclose(min_snr_weights(snr, gamma, "epsilon") * snr, x0_weight)
    assert torch.allclose(min_snr_weights(snr, gamma, "v_prediction") * (snr + 1), x0_weight)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(snr, gamma, "flow")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.slow
def test_loss_falls_on_an_overfit_batch(digits_data_root: Path, tmp_path: Path, prediction_type: str) -> None:
    model, cfg = tiny_model(
        digits_data_root, tmp_path, f"paradigm.noise_scheduler.prediction_type={prediction_type}"
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.val_dataloader())), 0)
    conditioning = lambda: model.condition(batch, drop=False)  # noqa: E731 - re-encoded as the text tower learns
    evaluate = lambda: model.diffusion_loss(  # noqa: E731 - fixed noise and timesteps
        batch["video"], conditioning(), torch.Generator().manual_seed(0)
    ).mean().item()

    before = evaluate()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(80):
        optimizer.zero_grad()
        model.diffusion_loss(batch["video"], conditioning()).mean().backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_draw_videos_of_the_requested_shape(digits_data_root: Path, tmp_path: Path, sampler: str) -> None:
    model, _ = tiny_model(digits_data_root, tmp_path)
    videos = model.generate(["a handwritten 1 moving up", "a handwritten 2 moving left"], sampler=sampler, steps=3)
    assert videos.shape == (2, 1, 8, 16, 16)
    assert torch.isfinite(videos).all() and videos.abs().max() <= 1


def test_generation_is_seeded_and_guidance_changes_it(digits_data_root: Path, tmp_path: Path) -> None:
    model, _ = tiny_model(digits_data_root, tmp_path)
    with torch.no_grad():  # make the net's output non-trivial so guidance has an effect
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a handwritten 3 moving up"]
    first = model.generate(prompts, steps=3, seed=1)
    assert torch.equal(first, model.generate(prompts, steps=3, seed=1))
    assert not torch.equal(first, model.generate(prompts, steps=3, seed=2))
    assert not torch.allclose(first, model.generate(prompts, steps=3, seed=1, guidance_scale=1.0))


def test_save_samples_writes_decodable_mp4s_and_a_grid(tmp_path: Path) -> None:
    videos = torch.rand(3, 1, 6, 8, 8) * 2 - 1
    paths = save_samples(videos, ["a", "b", "c"], tmp_path, scale=2)
    assert len(paths["videos"]) == 3
    frames = decode_mp4(paths["videos"][1])
    assert frames.shape == (6, 16, 16, 3)
    expected = ((videos[1, 0] + 1) * 127.5).round().repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert (torch.from_numpy(frames[..., 0]).float() - expected).abs().mean() < 8  # H.264, near lossless
    assert paths["grid"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "captions.txt").read_text().split() == ["a", "b", "c"]
