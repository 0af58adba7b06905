"""LoRA fine-tuning cost of the pretrained families at their published sizes, random weights.

For each family's published denoiser configuration (CogVideoX-2b, LTX-Video 0.9, Wan 2.1
T2V-1.3B; no download: the architecture is built from its config with random weights), one
effvid LoRA training step on precomputed latents and prompt features (what `effvid-data encode`
gives: the VAE and text encoder are not in the step), with gradient checkpointing off and on:
seconds per step and peak memory. Each measurement runs in its own process, so the peak is
that configuration's alone.

    python -m benchmarks.pretrained                                  # CPU: reduced clips (9 frames, 128 px)
    python -m benchmarks.pretrained --device cuda --dtype bfloat16 --frames 49 --height 512 --width 768
    python -m benchmarks.pretrained --families ltx_video --checkpointing on --out results.jsonl

Peak memory is CUDA's allocator peak on a GPU, the process's peak RSS growth over the model's
construction and steps on a CPU (which counts the weights, as the GPU figure does). Anchor:
finetrainers' published LTX-Video LoRA peak, about 5 GB at 49x512x768 with precomputed latents.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Published denoiser configs (diffusers' config.json of each release's transformer/).
FAMILIES: dict[str, dict[str, Any]] = {
    "cogvideox": dict(
        release="THUDM/CogVideoX-2b", wrapper="CogVideoXBackbone", vae_time=4, vae_space=8, text_tokens=226, text_dim=4096,
        schedule=("CogVideoXDDIMScheduler", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                   snr_shift_scale=3.0, timestep_spacing="trailing")),
        config=dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                    text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                    temporal_compression_ratio=4, max_text_seq_length=226, spatial_interpolation_scale=1.875),
    ),
    "ltx_video": dict(
        release="Lightricks/LTX-Video (0.9)", wrapper="LTXVideoBackbone", vae_time=8, vae_space=32, text_tokens=128,
        text_dim=4096, schedule=("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, base_shift=0.95,
                                                                          max_shift=2.05, base_image_seq_len=1024,
                                                                          max_image_seq_len=4096)),
        config=dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                    attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096),
    ),
    "wan": dict(
        release="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", wrapper="WanBackbone", vae_time=4, vae_space=8, text_tokens=512,
        text_dim=4096, schedule=("UniPCMultistepScheduler", dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                                   flow_shift=3.0)),
        config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    ),
}
LORA = dict(target_modules=["to_q", "to_k", "to_v", "to_out.0"], rank=128, alpha=128)  # finetrainers' LTX recipe


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(family: str, frames: int, height: int, width: int, batch: int, steps: int, checkpointing: bool,
            device: str, dtype: str) -> dict[str, Any]:
    """One configuration, in this process."""
    import diffusers
    import torch
    from torch import nn

    import lit_models.nets.diffusers_video as wrappers
    from lit_models.bundle import training_scheduler
    from lit_models.fine_tuning import count_parameters
    from lit_models.peft import LoRA, ParameterEfficientFineTuning

    spec = FAMILIES[family]
    torch.manual_seed(0)
    start_rss = rss_mb()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    wrapper = getattr(wrappers, spec["wrapper"])
    model_class = wrapper.model_class
    with torch.device(device):
        model = model_class.from_config(spec["config"])
    if torch_dtype != torch.float32:  # as from_pretrained(torch_dtype=...) does: some modules stay float32
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, part in model.named_modules():
            if not list(part.children()) and not any(k in name.split(".") for k in keep):
                part.to(torch_dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    extra = {"vae_temporal_compression": spec["vae_time"], "vae_spatial_compression": spec["vae_space"]} if family == "ltx_video" else {}
    net = wrapper(model=model, **extra)
    scheduler_name, scheduler_config = spec["schedule"]
    scheduler = training_scheduler(getattr(diffusers, scheduler_name)(**scheduler_config))
    module = ParameterEfficientFineTuning(
        net=net, text_encoder=nn.Module(), trainable=[LoRA(**LORA)], base=spec["release"], noise_scheduler=scheduler,
        sampler="pipeline", optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4), min_snr_gamma=None, cfg_dropout=0.0,
        video_shape=(3, frames, height, width),
    ).to(device)
    trainable, total = count_parameters(module)
    latent = (batch, spec["config"]["in_channels"], (frames - 1) // spec["vae_time"] + 1,
              height // spec["vae_space"], width // spec["vae_space"])  # fmt: skip
    x0 = torch.randn(latent, device=device, dtype=torch_dtype)  # precomputed VAE latents
    conditioning = {"context": torch.randn(batch, spec["text_tokens"], spec["text_dim"], device=device, dtype=torch_dtype)}
    if family == "ltx_video":
        conditioning["context_mask"] = torch.ones(batch, spec["text_tokens"], dtype=torch.bool, device=device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, kernel choice)
        begin = time.perf_counter()
        loss = module.diffusion_loss(x0, conditioning).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else (rss_mb() - start_rss) / 1024
    return {
        "family": family, "release": spec["release"], "device": device, "dtype": dtype, "frames": frames,
        "height": height, "width": width, "batch": batch, "latent": list(latent), "tokens": net.sequence_length(latent),
        "gradient_checkpointing": checkpointing, "params_total_m": round(total / 1e6, 1),
        "params_trainable_m": round(trainable / 1e6, 2), "s_per_step": round(sum(times) / len(times), 3),
        "peak_memory_gb": round(peak, 2), "loss": round(float(loss), 4),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    parser.add_argument("--frames", type=int, default=9, help="pixel frames (4k+1; 8k+1 for LTX-Video)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="append each row as JSON to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one measurement
    args = parser.parse_args(argv)
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        row = measure(args.families[0], args.frames, args.height, args.width, args.batch, args.steps,
                      args.checkpointing == "on", args.device, args.dtype)
        print(json.dumps(row))
        return
    settings = ["off", "on"] if args.checkpointing == "both" else [args.checkpointing]
    rows = []
    for family in args.families:
        for setting in settings:
            cmd = [sys.executable, "-m", "benchmarks.pretrained", "--one", "--families", family, "--checkpointing", setting,
                   "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
                   *(["--threads", str(args.threads)] if args.threads else [])]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{family} checkpointing={setting}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as stream:
                    stream.write(json.dumps(row) + "\n")
    print("\n| family | params (M) | LoRA (M) | clip | latent tokens | grad. ckpt | s/step | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['release']} | {r['params_total_m']} | {r['params_trainable_m']} | {r['frames']}x{r['height']}x{r['width']} "
              f"| {r['tokens']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['s_per_step']} | {r['peak_memory_gb']} |")


if __name__ == "__main__":
    main()
