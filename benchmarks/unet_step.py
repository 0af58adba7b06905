"""Seconds per optimizer step (forward + backward + AdamW) of `FactorizedUNet` on 2 CPU threads.

    python -m benchmarks.unet_step [--steps 10] [--threads 2]

Random-initialised nets, random data and text features; prints one row per configuration.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.nets import FactorizedUNet, TemporalAttention, TemporalConv

TEMPORAL_OPS = {
    "attention": partial(TemporalAttention, heads=4),
    "conv": partial(TemporalConv, kernel_size=3),
    "none": None,
}
TEXT_TOKENS = 16  # context length of the quickstart's tiny open_clip text tower
TEXT_DIM = 64
TINY_TEXT = dict(width=TEXT_DIM, layers=2, heads=4, context_length=TEXT_TOKENS, vocab_size=49408)


def seconds_per_step(
    net: FactorizedUNet,
    shape: tuple[int, ...],
    steps: int,
    warmup: int = 2,
    text_encoder: OpenClipTextEncoder | None = None,
) -> float:
    """Best-of-`steps` seconds of one AdamW step; with `text_encoder`, captions are encoded
    and the encoder trained too, as in the quickstart."""
    batch_size = shape[0]
    parameters = [*net.parameters(), *(text_encoder.parameters() if text_encoder is not None else [])]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    captions = [f"a handwritten {i % 10} moving up-left" for i in range(batch_size)]
    x = torch.randn(shape)
    target = torch.randn(shape)
    timesteps = torch.randint(0, 1000, (batch_size,))
    context = torch.randn(batch_size, TEXT_TOKENS, TEXT_DIM)
    pooled = torch.randn(batch_size, TEXT_DIM)
    mask = torch.ones(batch_size, TEXT_TOKENS, dtype=torch.bool)
    mask[:, 8:] = False
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        if text_encoder is not None:
            text = text_encoder.encode(captions)
            context, pooled, mask = text.tokens, text.pooled, text.mask
        loss = torch.nn.functional.mse_loss(net(x, timesteps, context, pooled, mask), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[0]  # best of N: other processes on the machine only ever add time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = [(op, (16, 1, 8, 16, 16)) for op in TEMPORAL_OPS] + [("attention", (16, 1, 8, 32, 32))]
    print(f"FactorizedUNet defaults, {args.threads} threads, best of {args.steps} steps (other processes only add time)")
    print("| temporal | input (B, C, F, H, W) | params | s/step |")
    print("|---|---|---|---|")
    for op, shape in rows:
        net = FactorizedUNet(in_channels=shape[1], context_dim=TEXT_DIM, pooled_dim=TEXT_DIM, temporal=TEMPORAL_OPS[op])
        seconds = seconds_per_step(net, shape, args.steps)
        print(f"| {op} | {shape} | {net.num_parameters / 1e6:.2f}M | {seconds:.3f} |", flush=True)

    shape = (16, 1, 8, 16, 16)
    net = FactorizedUNet(context_dim=TEXT_DIM, pooled_dim=TEXT_DIM, temporal=TEMPORAL_OPS["attention"])
    encoder = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=TEXT_DIM, trainable=True)
    seconds = seconds_per_step(net, shape, args.steps, text_encoder=encoder)
    params = (net.num_parameters + sum(p.numel() for p in encoder.parameters())) / 1e6
    print(f"| attention + trainable tiny open_clip text tower | {shape} | {params:.2f}M | {seconds:.3f} |")


if __name__ == "__main__":
    main()
