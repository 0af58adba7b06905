"""Diffusion-DPO: the loss, the reference, the reward, and preference shards end to end."""

from __future__ import annotations

import copy
import csv
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from data_tools import cli
from data_tools.digits import make_digit_clip
from data_tools.pairs import PreferencePair, write_pair_shards
from data_tools.video_io import encode_mp4
from datamodules.preference_pairs import PreferencePairDataModule
from lit_models.conditioning import OpenClipTextEncoder
from lit_models.peft import LoRA
from lit_models.preference import DiffusionDPO, dpo_loss, epsilon_error_scale
from lit_models.rewards import digit_reward
from tests.test_peft import TEXT_CFG, full_state, tiny_net

PROMPTS = ["a handwritten 3 moving up", "a handwritten 7 moving left"]


def test_dpo_loss_matches_a_hand_computed_example() -> None:
    # Pair 1: the model improved on the winner relative to the reference: (0.2-0.5)-(0.3-0.4) = -0.2,
    # logit = -0.5 * 10 * -0.2 = 1.  Pair 2: (0.5-0.2)-(0.3-0.4) = 0.4, logit = -2.
    loss, stats = dpo_loss(
        torch.tensor([0.2, 0.5]), torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.3]), torch.tensor([0.4, 0.4]), beta=10.0
    )
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["implicit_accuracy"].item() == 0.5
    assert stats["reward_margin"].item() == pytest.approx(-0.5)
    # Model == reference: log 2 whatever beta.
    same = torch.tensor([0.3, 0.1])
    assert dpo_loss(same, same.flip(0), same, same.flip(0), beta=5000.0)[0].item() == pytest.approx(math.log(2))


def test_v_prediction_errors_convert_to_noise_errors() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    torch.manual_seed(0)
    x0, noise, v_hat = torch.randn(3, 1, 2, 4, 4), torch.randn(3, 1, 2, 4, 4), torch.randn(3, 1, 2, 4, 4)
    t = torch.tensor([5, 500, 950])
    x_t = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1, 1)
    eps_hat = sigma * x_t + alpha * v_hat  # the noise a v-prediction implies
    eps_err = (noise - eps_hat).pow(2).flatten(1).mean(1)
    v_err = (v - v_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(v_err * epsilon_error_scale(scheduler, t, "v_prediction"), eps_err)


def test_flow_velocity_errors_convert_to_noise_errors() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lit_models.flow_matching import flow_noised

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.manual_seed(0)
    x0, noise, u_hat = torch.randn(3, 1, 2, 4, 4), torch.randn(3, 1, 2, 4, 4), torch.randn(3, 1, 2, 4, 4)
    t = torch.tensor([5.0, 500.0, 950.0])
    x_t, u = flow_noised(x0, noise, t, 1000)
    eps_hat = x_t + (1 - t / 1000).view(-1, 1, 1, 1, 1) * u_hat  # the noise a velocity implies
    eps_err = (noise - eps_hat).pow(2).flatten(1).mean(1)
    u_err = (u - u_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(u_err * epsilon_error_scale(scheduler, t, "flow_prediction"), eps_err)


def dpo_module(net: torch.nn.Module, trainable: list, **kwargs) -> DiffusionDPO:
    torch.manual_seed(1)
    return DiffusionDPO(
        net=net, text_encoder=OpenClipTextEncoder(model_name=None, text_cfg=TEXT_CFG, embed_dim=16),
        trainable=trainable, noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=1e-2), beta=50.0, **kwargs,
    )  # fmt: skip


def pair_batch() -> dict:
    torch.manual_seed(3)
    return {"win": torch.rand(2, 1, 4, 8, 8) * 2 - 1, "lose": torch.rand(2, 1, 4, 8, 8) * 2 - 1, "caption": PROMPTS}


def test_dpo_with_lora_uses_the_adapter_disabled_net_as_the_base_reference() -> None:
    base = tiny_net()
    module = dpo_module(copy.deepcopy(base), [LoRA(rank=2, alpha=2)])
    assert module.objective.reference_net is None  # no second copy in memory
    data = pair_batch()
    x, t = data["win"], torch.tensor([10, 60])
    conditioning = module.condition({"caption": PROMPTS, "video": x}, drop=False)

    optimizer = module.configure_optimizers()
    loss = module._step(data, "train", torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # model == reference at the start
    before = full_state(module)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in full_state(module).items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)

    assert not torch.equal(module.net(x, t, **conditioning), base(x, t, **conditioning))
    with module.objective.reference(module.net) as reference:
        assert torch.equal(reference(x, t, **conditioning), base(x, t, **conditioning))
    assert module._step(data, "train", torch.Generator().manual_seed(0)).item() < math.log(2)


def test_full_fine_tune_dpo_keeps_a_frozen_reference_out_of_the_checkpoint_and_sft_runs() -> None:
    base = tiny_net()
    module = dpo_module(copy.deepcopy(base), [])
    assert module.objective.reference_net is not None and not any(p.requires_grad for p in module.objective.reference_net.parameters())
    assert not any(k.startswith("reference_net.") for k in module.state_dict())
    assert any(k.startswith("net.") for k in module.state_dict())
    sft = dpo_module(copy.deepcopy(base), [LoRA(rank=2, alpha=2)], objective="sft")
    assert sft.objective.reference_net is None
    assert torch.isfinite(sft._step(pair_batch(), "train", None))


def digit_video(digit: int, direction: str, seed: int = 0) -> torch.Tensor:
    frames, _ = make_digit_clip(seed, canvas=32, num_frames=8, digit=digit, direction=direction)
    video = torch.from_numpy(frames).float() / 127.5 - 1  # (F, H, W)
    return video[None, None]  # (1, 1, F, H, W)


def test_digit_reward_prefers_the_prompted_digit_and_direction() -> None:
    video = digit_video(3, "up")
    right = digit_reward(video, ["a handwritten 3 moving up"])
    wrong_direction = digit_reward(video, ["a handwritten 3 moving down"])
    blank = digit_reward(-torch.ones_like(video), ["a handwritten 3 moving up"])
    assert right.item() > 0.7 and wrong_direction.item() == 0.0 and blank.item() == 0.0
    with pytest.raises(ValueError, match="not a moving-digit caption"):
        digit_reward(video, ["a cat"])


def mp4(video: torch.Tensor) -> bytes:
    return encode_mp4(((video[0, 0] + 1) * 127.5).round().byte().numpy())


def test_pair_shards_read_back_through_the_preference_datamodule(tmp_path: Path) -> None:
    win, lose = digit_video(3, "up"), digit_video(7, "left", seed=1)
    pairs = [PreferencePair(PROMPTS[0], mp4(win), mp4(lose), {"win_score": 0.9, "lose_score": 0.1, "i": i}) for i in range(5)]
    stats = write_pair_shards(pairs, tmp_path / "pairs", shard_size=2)
    assert stats == {**stats, "pairs": 5, "shards": 3}
    data = PreferencePairDataModule(tmp_path / "pairs", tmp_path / "pairs", batch_size=2, val_batch_size=4,
                                    num_frames=8, size=32, channels=1, shuffle_buffer=1)
    data.setup("fit")
    val = next(iter(data.val_dataloader()))
    assert val["win"].shape == (4, 1, 8, 32, 32) and val["caption"] == [PROMPTS[0]] * 4
    assert [m["i"] for m in val["meta"]] == [0, 1, 2, 3] and val["meta"][0]["win_score"] == 0.9
    assert (val["win"][0] - win[0]).abs().mean() < 0.02 and (val["lose"][0] - lose[0]).abs().mean() < 0.02
    train = iter(data.train_dataloader())
    assert sum(len(next(train)["key"]) for _ in range(5)) == 10  # repeats past the 5 pairs

    # Human-labelled pairs from a CSV table of video files.
    (tmp_path / "w.mp4").write_bytes(mp4(win))
    (tmp_path / "l.mp4").write_bytes(mp4(lose))
    with open(tmp_path / "table.csv", "w", newline="") as stream:
        csv.writer(stream).writerows([["prompt", "win", "lose", "labeler"], [PROMPTS[0], "w.mp4", "l.mp4", "ann"]])
    assert cli.main(["pairs", "--table", str(tmp_path / "table.csv"), "--out", str(tmp_path / "human")]) == 0
    human = PreferencePairDataModule(tmp_path / "human", tmp_path / "human", num_frames=8, size=32)
    human.setup("validate")
    row = next(iter(human.val_dataloader()))
    assert row["meta"][0]["labeler"] == "ann" and (row["win"][0] - win[0]).abs().mean() < 0.02
    (tmp_path / "l.mp4").unlink()
    assert cli.main(["pairs", "--table", str(tmp_path / "table.csv"), "--out", str(tmp_path / "bad")]) == 2


@pytest.fixture(scope="module")
def tiny_base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An effvid checkpoint of the quickstart's config with a tiny random network."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_config, tiny_overrides

    folder = tmp_path_factory.mktemp("base")
    cfg = compose_config([*tiny_overrides(folder, folder), "run_id=base"])
    torch.manual_seed(0)
    module = instantiate(cfg.paradigm, net=instantiate(cfg.model))
    path = folder / "base.ckpt"
    torch.save({"state_dict": module.state_dict(), "effvid": {"config": OmegaConf.to_container(cfg)}}, path)
    return path


def test_pairs_cli_samples_ranks_and_writes_shards_the_datamodule_reads(tiny_base_ckpt: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_models import rewards

    # A reward with no ties on a random network: mean brightness.
    monkeypatch.setitem(rewards.REWARDS, "digits", lambda videos, prompts: videos.flatten(1).mean(1))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "pairs"
    args = ["pairs", "--ckpt", str(tiny_base_ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
            "--per-prompt", "3", "--steps", "2", "--reward", "digits"]
    assert cli.main(args) == 0
    data = PreferencePairDataModule(out, out, val_batch_size=8, num_frames=8, size=16)
    data.setup("validate")
    pairs = next(iter(data.val_dataloader()))
    assert pairs["caption"] == PROMPTS and pairs["win"].shape == (2, 1, 8, 16, 16)
    for meta, win, lose in zip(pairs["meta"], pairs["win"], pairs["lose"]):
        assert meta["win_score"] == max(meta["scores"]) > meta["lose_score"] == min(meta["scores"])
        assert win.mean() > lose.mean()  # the brighter one won (up to mp4 rounding)
    assert cli.main([*args[:2], str(tmp_path / "missing.ckpt"), *args[3:]]) == 2


@pytest.mark.parametrize(
    "experiment, paradigm, trained",
    [
        ("dpo_digits", "DiffusionDPO", "lora_"),
        ("lora_t2v", "ParameterEfficientFineTuning", "lora_"),
        ("simda", "ParameterEfficientFineTuning", "adapter"),
        ("control_a_video", "ParameterEfficientFineTuning", ("net.encoder.", "net.hint.", "zero_conv")),
    ],
)
def test_experiment_configs_build_their_paradigm_on_a_base_checkpoint(
    experiment: str, paradigm: str, trained: str | tuple[str, ...], tiny_base_ckpt: Path, tmp_path: Path
) -> None:
    from lit_models.bundle import build_module
    from tests.conftest import compose_config

    cfg = compose_config([f"experiment={experiment}", f"pretrained={tiny_base_ckpt}", "run_id=x",
                          f"runs_dir={tmp_path}", f"data_root={tmp_path}"])
    module = build_module(cfg)
    assert type(module).__name__ == paradigm and cfg.callbacks.ema is None
    markers = (trained,) if isinstance(trained, str) else trained
    assert module.trainable_names and all(any(m in k for m in markers) for k in module.trainable_names)
    assert not any(k.startswith("text_encoder.") for k in module.trainable_names)


def test_animatediff_configs_compose() -> None:
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=animatediff_motionlora", "pretrained=/sd", "bundle.motion_adapter=/ma", "run_id=x"])
    targets = [t["_target_"] for t in cfg.paradigm.trainable]
    assert targets == ["lit_models.peft.MotionModule", "lit_models.peft.LoRA"] and cfg.model is None
    assert cfg.pretrained == "/sd" and cfg.bundle.motion_adapter == "/ma" and cfg.callbacks.ema is None
