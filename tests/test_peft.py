"""Parameter-efficient fine-tuning: what trains, what stays, and that the start is the base."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from diffusers import DDPMScheduler

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.nets import FactorizedUNet, TemporalAttention
from lit_models.nets.control import sobel_edges
from lit_models.peft import (
    ControlBranch,
    LoRA,
    MotionModule,
    ParameterEfficientFineTuning,
    SimDAAdapters,
    TrainOnly,
)
from lit_models.lora import adapters_disabled, export_lora, import_lora, merge_lora, unmerge_lora

TEXT_CFG = {"width": 16, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 49408}


def tiny_net(seed: int = 0) -> FactorizedUNet:
    torch.manual_seed(seed)
    net = FactorizedUNet(in_channels=1, channels=(8, 16, 16), context_dim=16, pooled_dim=16,
                         temporal=partial(TemporalAttention, heads=2))
    # A "pretrained" base: no zero-initialised layers left, so every path carries signal.
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def tiny_module(net: torch.nn.Module, trainable: list, paradigm: type = ParameterEfficientFineTuning,
                **kwargs) -> ParameterEfficientFineTuning:
    torch.manual_seed(1)
    text_encoder = OpenClipTextEncoder(model_name=None, text_cfg=TEXT_CFG, embed_dim=16)
    return paradigm(
        net=net, text_encoder=text_encoder, trainable=trainable, base="tiny",
        noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=1e-2), min_snr_gamma=None, **kwargs,
    )  # fmt: skip


def batch(frames: int = 4) -> dict:
    torch.manual_seed(2)
    return {"video": torch.rand(2, 1, frames, 8, 8) * 2 - 1, "caption": ["a handwritten 3 moving up", "a handwritten 7 moving left"]}


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.nn.Module.state_dict(module).items()}


def one_step(module: ParameterEfficientFineTuning, data: dict) -> None:
    optimizer = module.configure_optimizers()
    loss = module.diffusion_loss(data["video"], module.condition(data, drop=False)).mean()
    loss.backward()
    optimizer.step()


INJECTORS = {
    "lora": lambda: [LoRA(rank=2, alpha=2)],
    "adapters": lambda: [SimDAAdapters()],
    "control": lambda: [ControlBranch()],
    "temporal_only": lambda: [TrainOnly(r"\.temporal\.")],
}


@pytest.mark.parametrize("method", sorted(INJECTORS))
def test_a_step_changes_only_the_named_parameters_and_the_start_is_the_base(method: str) -> None:
    base = tiny_net()
    data = batch()
    kwargs = {"control_signal": "sobel_edges"} if method == "control" else {}
    module = tiny_module(copy.deepcopy(base), INJECTORS[method](), **kwargs)
    # Zero-initialised adapters / LoRA B / control projections: exactly the base at step 0.
    x, t = data["video"], torch.tensor([10, 60])
    conditioning = module.condition(data, drop=False)
    base_conditioning = {k: v for k, v in conditioning.items() if k != "control"}
    assert torch.equal(module.net(x, t, **conditioning), base(x, t, **base_conditioning))

    before = full_state(module)
    one_step(module, data)
    after = full_state(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert changed <= module.trainable_names
    marker = {"lora": "lora_", "adapters": "adapter", "control": "net.encoder.", "temporal_only": ".temporal."}[method]
    extra = {"control": ("net.hint.", "net.zero_convs.", "net.mid_zero_conv.")}.get(method, ())
    assert all(marker in k or k.startswith(extra) for k in changed), sorted(changed)[:5]
    # The checkpoint view holds exactly the trained weights.
    assert set(module.state_dict()) == module.trainable_names
    assert module.trainable_names < set(before)


def test_checkpoint_holds_only_trained_weights_and_loads_back_onto_the_base() -> None:
    module = tiny_module(tiny_net(), [LoRA(rank=2, alpha=2)])
    one_step(module, batch())
    saved = module.state_dict()
    fresh = tiny_module(tiny_net(), [LoRA(rank=2, alpha=2)])
    fresh.load_state_dict(saved)
    assert all(torch.equal(v, full_state(fresh)[k]) for k, v in saved.items())
    with pytest.raises(RuntimeError, match="missing"):
        tiny_module(tiny_net(), [LoRA(rank=2, alpha=2)]).load_state_dict({})
    with pytest.raises(ValueError, match="match no module"):
        tiny_module(tiny_net(), [LoRA(target_modules=r".*no_such_layer$")])


def test_lora_export_import_merge_and_disable(tmp_path) -> None:
    base = tiny_net()
    net = LoRA(rank=2, alpha=4)(copy.deepcopy(base))
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter
    x, t, ctx = torch.randn(1, 1, 4, 8, 8), torch.tensor([30]), torch.randn(1, 3, 16)
    adapted = net(x, t, context=ctx)
    assert not torch.allclose(adapted, base(x, t, context=ctx))
    with adapters_disabled(net):
        assert torch.equal(net(x, t, context=ctx), base(x, t, context=ctx))
    assert torch.equal(net(x, t, context=ctx), adapted)

    path = export_lora(net, tmp_path / "adapter.safetensors")
    other = LoRA(rank=2, alpha=4)(copy.deepcopy(base))
    assert not torch.allclose(other(x, t, context=ctx), adapted)
    import_lora(other, path)
    assert torch.equal(other(x, t, context=ctx), adapted)

    merge_lora(other)
    torch.testing.assert_close(other(x, t, context=ctx), adapted, atol=1e-5, rtol=1e-5)
    unmerge_lora(other)
    torch.testing.assert_close(other(x, t, context=ctx), adapted, atol=1e-5, rtol=1e-5)


def test_sobel_edges_mark_the_digit_outline() -> None:
    video = -torch.ones(1, 1, 2, 8, 8)
    video[..., 2:6, 2:6] = 1.0  # a bright square
    edges = sobel_edges(video)
    assert edges.shape == (1, 1, 2, 8, 8) and edges.max() == 1.0
    assert edges[0, 0, 0, 4, 4] == 0 and edges[0, 0, 0, 0, 0] == 0  # flat inside and outside
    assert edges[0, 0, 0, 2, 4] > 0.5  # on the border


def tiny_diffusers_unet(tmp_path):
    from tests.tiny_pipelines import sd_unet

    torch.manual_seed(0)
    sd_unet(in_channels=1, cross_attention_dim=16, channels=(8, 16)).save_pretrained(tmp_path / "unet")
    return tmp_path


def test_motion_module_on_a_from_pretrained_image_unet(tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    from lit_models.nets.diffusers_video import DiffusersFrameUNet
    from lit_models.injectors import save_motion_adapter

    folder = tiny_diffusers_unet(tmp_path)
    base = DiffusersFrameUNet(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    adapter = {"block_out_channels": [8, 16], "motion_layers_per_block": 1, "motion_num_attention_heads": 2,
               "motion_norm_num_groups": 4, "motion_max_seq_length": 8}
    module = tiny_module(copy.deepcopy(base), [MotionModule(adapter=adapter)])
    data = batch()
    x, t = data["video"], torch.tensor([10, 60])
    conditioning = module.condition(data, drop=False)
    # AnimateDiff zero-initialises the motion output, so the start is the image model.
    torch.testing.assert_close(module.net(x, t, **conditioning), base(x, t, **conditioning), atol=1e-6, rtol=0)
    before = full_state(module)
    one_step(module, data)
    after = full_state(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("motion_modules" in k for k in changed)

    # MotionLoRA: the trained motion modules, frozen, with LoRA on their attention.
    save_motion_adapter(module.net, tmp_path / "motion")
    motion_lora = tiny_module(copy.deepcopy(base), [
        MotionModule(pretrained=str(tmp_path / "motion"), train=False),
        LoRA(target_modules=r".*motion_modules.*\.(to_q|to_k|to_v)$", rank=2, alpha=2),
    ])  # fmt: skip
    torch.testing.assert_close(motion_lora.net(x, t, **conditioning), module.net(x, t, **conditioning))
    assert motion_lora.trainable_names and all("lora_" in k for k in motion_lora.trainable_names)
