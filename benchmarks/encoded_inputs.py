"""What `effvid-data encode` saves: a latent text-to-video training step with the frozen VAE
and text encoder run on every batch, vs the same step on precomputed latents and embeddings.

    python -m benchmarks.encoded_inputs [--steps 10] [--rounds 3] [--text-model ViT-B-32]

One model (the quickstart U-Net in the latent space of the digits VAE, a frozen open_clip text
tower of `--text-model`'s architecture, random-initialised: no download), one batch of 16
moving-digit clips and captions. The `raw` row feeds videos and captions, so every step
encodes both; the `encoded` row feeds what `effvid-data encode` stores (computed once here
with the same encoders). Rows alternate by round; a row's figure is the median over rounds of
its median step time (forward, backward, AdamW step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module

from experiments.train import build_model

CAPTIONS = [f"a handwritten {i % 10} moving up-left" for i in range(16)]


def build(text_model: str) -> Any:
    with initialize_config_module(version_base="1.3", config_module="experiments.conf"):
        cfg = compose("train", overrides=[
            "experiment=digits_quickstart", "run_id=bench", "+autoencoder=digits", "paradigm.autoencoder.weights=null",
            "paradigm.text_encoder.trainable=false", "paradigm.text_encoder.text_cfg=null",
            f"paradigm.text_encoder.model_name={text_model}", "paradigm.text_encoder.embed_dim=null",
        ])  # the net's context_dim / pooled_dim follow from the tower when the module builds it  # fmt: skip
    L.seed_everything(0, verbose=False)
    return build_model(cfg)


def step_times(model: Any, batch: dict[str, Any], steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.training_step(batch, 0).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--text-model", default="ViT-B-32", help="open_clip architecture of the text tower (default ViT-B-32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.text_model)
    model.log = lambda *a, **k: None  # no trainer attached
    torch.manual_seed(0)
    raw = {"video": torch.rand(16, 1, 8, 16, 16) * 2 - 1, "caption": CAPTIONS}  # (B, C, F, H, W)
    with torch.no_grad():
        embedding = model.text_encoder.encode(CAPTIONS)
        encoded = {"latent": model.autoencoder.encode(raw["video"]), "caption": CAPTIONS,
                   "context": embedding.tokens, "pooled": embedding.pooled, "context_mask": embedding.mask}
    encoders = sum(p.numel() for m in (model.autoencoder, model.text_encoder) for p in m.parameters())
    print(f"denoiser {sum(p.numel() for p in model.net.parameters()) / 1e6:.1f}M params; frozen VAE + "
          f"{args.text_model} text tower {encoders / 1e6:.1f}M params; batch 16 x (1, 8, 16, 16), {args.threads} threads")
    step_times(model, raw, 2)  # warm-up
    medians: dict[str, list[float]] = {"raw (encoders every step)": [], "encoded (effvid-data encode)": []}
    for _ in range(args.rounds):
        for name, batch in zip(medians, (raw, encoded)):
            medians[name].append(statistics.median(step_times(model, batch, args.steps)))
    base = statistics.median(medians["raw (encoders every step)"])
    print(f"{'inputs':32s} {'s/step':>8s} {'vs raw':>8s}")
    for name, values in medians.items():
        figure = statistics.median(values)
        print(f"{name:32s} {figure:8.3f} {figure / base:8.2f}x")


if __name__ == "__main__":
    main()
