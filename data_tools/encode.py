"""`effvid-data encode`: precompute VAE latents and text embeddings into shards, so training
runs neither the VAE nor the text encoder (both frozen) at every step.

One output shard per input shard, same name, each written as `.tmp` and renamed: a killed
run resumes at the first missing shard. With a per-frame VAE every frame of a clip is encoded,
so the datamodule still draws a random start and stride from the latents; a video VAE (the
pretrained families' temporal compression) encodes the training clip itself, the first
`num_frames` frames at `frame_stride`, and the datamodule takes those latents whole.
Per sample: `KEY.latent.npy` `(c, F, h, w)`, `KEY.text.npz` (`tokens` `(L, D)`, `pooled`
`(P,)`, `mask` `(L,)`), `KEY.txt`, `KEY.json`. The folder's `_encoder.json` names the
encoders by weight fingerprint; `EncodedShardDataModule` and the paradigm check it.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.atomic_files import STORAGE_ERRNOS, write_atomic, write_error
from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS
from data_tools.shards import STATS_NAME, TAR_MTIME
from lit_models.encoded_inputs import ENCODER_INFO_NAME, autoencoder_info, read_encoder_info, text_encoder_info


class EncodeInputError(ValueError):
    """The input or output folder cannot be encoded as asked."""


def array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def encoded_settings(autoencoder: Any, text_encoder: Any, size: int | None, channels: int, dtype: str,
                     clip: dict[str, int] | None = None) -> dict[str, Any]:
    """The `_encoder.json` payload: encoders (None where skipped), decoding settings, and for a
    video VAE the clip its latents encode (`num_frames`, `frame_stride`)."""
    settings = {
        "autoencoder": autoencoder_info(autoencoder) if autoencoder is not None else None,
        "text_encoder": text_encoder_info(text_encoder) if text_encoder is not None else None,
        "size": size,
        "channels": channels,
        "dtype": dtype,
    }
    if clip is not None:
        settings["clip"] = clip
    return settings


def clip_of(autoencoder: Any, num_frames: int | None, frame_stride: int) -> dict[str, int] | None:
    """The clip a video VAE's latents must encode (None for a per-frame VAE)."""
    if autoencoder is None or getattr(autoencoder, "temporal_downscale", 1) == 1:
        return None
    if num_frames is None:
        raise EncodeInputError("a video VAE encodes whole training clips: data.num_frames must be set")
    return {"num_frames": int(num_frames), "frame_stride": int(frame_stride)}


def _decoded_batches(url: str, size: int | None, channels: int, skipped: Any, timeout: float | None,
                     batch_size: int, max_pixels: int | None) -> Iterator[list[dict[str, Any]]]:
    """Every sample of one video shard decoded whole (all frames, first to last), in lists of
    up to `batch_size`."""
    import webdataset as wds

    from datamodules.shard_datamodule import CountTarErrors, SelectFiles
    from datamodules.video_decoding import frames_to_video
    from datamodules.video_shards import DecodeSamples

    stage = DecodeSamples(skipped, caption_key="txt", seed=0, num_frames=None, stride=1, random_start=False,
                          size=size, timeout=timeout, max_pixels=max_pixels)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([url]),
        wds.tarfile_to_samples(handler=CountTarErrors(skipped), select_files=SelectFiles({"mp4", "json", "txt"})),
        stage,
        wds.batched(batch_size, collation_fn=list, partial=True),
    )
    for samples in pipeline:
        for sample in samples:
            sample["video"] = frames_to_video(sample.pop("frames"), channels)  # (C, F, H, W)
        yield samples


@torch.no_grad()
def _encode_batch(samples: list[dict[str, Any]], autoencoder: Any, text_encoder: Any, device: torch.device,
                  max_frames: int, dtype: np.dtype, clip: dict[str, int] | None = None) -> list[dict[str, bytes]]:
    out: list[dict[str, Any]] = [
        {"__key__": s["key"], "txt": s["caption"].encode("utf-8")} for s in samples
    ]
    if autoencoder is not None and clip is not None:  # a video VAE: one training clip per sample
        span = (clip["num_frames"] - 1) * clip["frame_stride"] + 1
        for entry, sample in zip(out, samples):
            frames = sample["video"][:, :span : clip["frame_stride"]]  # (C, num_frames, H, W)
            latent = autoencoder.encode(frames[None].to(device))[0].cpu()  # (c, f, h, w)
            entry["latent.npy"] = array_bytes(latent.numpy().astype(dtype))
    elif autoencoder is not None:
        frames = torch.cat([s["video"] for s in samples], dim=1)  # (C, sum F, H, W)
        latents = torch.cat([
            autoencoder.encode(chunk[None].to(device))[0].cpu()  # (c, f, h, w)
            for chunk in frames.split(max_frames, dim=1)
        ], dim=1)  # fmt: skip
        counts = [s["video"].shape[1] for s in samples]
        for entry, latent in zip(out, latents.split(counts, dim=1)):
            entry["latent.npy"] = array_bytes(latent.numpy().astype(dtype))
    if text_encoder is not None:
        embedding = text_encoder.encode([s["caption"] for s in samples])
        for i, entry in enumerate(out):
            arrays = {"tokens": embedding.tokens[i].cpu().numpy().astype(dtype)}  # (L, D)
            if embedding.pooled is not None:  # a pretrained family's encoder may have none
                arrays["pooled"] = embedding.pooled[i].cpu().numpy().astype(dtype)  # (P,)
            if embedding.mask is not None:
                arrays["mask"] = embedding.mask[i].cpu().numpy()  # (L,) bool
            entry["text.npz"] = npz_bytes(**arrays)
    for entry, sample in zip(out, samples):
        meta = dict(sample["meta"], encoded_frames=int(sample["video"].shape[1]))
        entry["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return out


def encode_shards(
    input_spec: str | Path,
    out_dir: str | Path,
    autoencoder: Any | None,
    text_encoder: Any | None,
    size: int | None,
    channels: int,
    batch_size: int = 32,
    max_frames: int = 256,
    dtype: str = "float16",
    device: str | torch.device = "cpu",
    decode_timeout: float | None = 30,
    progress: bool = True,
    num_frames: int | None = None,
    frame_stride: int = 1,
    max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
) -> dict[str, Any]:
    """Encode every shard of `input_spec` into `out_dir`; returns the stats (also written to
    `out_dir/_stats.json`). Shards already encoded (same name present) are kept. `num_frames`
    and `frame_stride` are the training clip's, which a video VAE encodes whole. A clip that
    declares more than `max_decode_pixels` pixels (all its frames) is skipped and named before
    decoding. A failed write removes the shard's temp file and raises `WriteError` naming it."""
    import webdataset as wds
    from tqdm import tqdm

    from datamodules.shard_lists import resolve_shards
    from datamodules.video_shards import SkippedSampleWarning

    if autoencoder is None and text_encoder is None:
        raise EncodeInputError("nothing to encode: the config has no paradigm.autoencoder and the text is skipped")
    if dtype not in ("float16", "float32"):
        raise EncodeInputError(f"dtype must be float16 or float32, got {dtype!r}")
    urls = resolve_shards(str(input_spec))
    out_dir = Path(out_dir)
    if any(Path(u).resolve().parent == out_dir.resolve() for u in urls):
        raise EncodeInputError(f"--out {out_dir} is the input folder; choose another")
    device = torch.device(device)
    for module in (autoencoder, text_encoder):
        if module is not None:
            module.to(device).eval()
    clip = clip_of(autoencoder, num_frames, frame_stride)
    settings = encoded_settings(autoencoder, text_encoder, size, channels, dtype, clip)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = read_encoder_info(out_dir)
    if existing is not None and {k: existing.get(k) for k in settings} != settings:
        raise EncodeInputError(
            f"{out_dir / ENCODER_INFO_NAME} records other encoders or settings than this config; "
            "encode into a new --out folder (or delete that one)"
        )
    write_atomic(out_dir / ENCODER_INFO_NAME, json.dumps({**settings, "input": str(input_spec)}, indent=1) + "\n")
    for stale in out_dir.glob("*.tar.tmp"):
        stale.unlink()

    skipped = multiprocessing.Value("q", 0)
    started, written, reused, skipped_names = time.perf_counter(), 0, 0, []
    bar = tqdm(urls, desc="encode", unit="shard", disable=not progress)
    for url in bar:
        target = out_dir / Path(url).name
        if target.is_file():
            reused += 1
            continue
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "wb") as stream, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SkippedSampleWarning)
                writer = wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME)
                for batch in _decoded_batches(url, size, channels, skipped, decode_timeout, batch_size,
                                              max_decode_pixels):
                    for entry in _encode_batch(batch, autoencoder, text_encoder, device, max_frames, np.dtype(dtype),
                                               clip):
                        writer.write(entry)
                    written += len(batch)
                writer.close()
        except BaseException as error:
            tmp.unlink(missing_ok=True)  # never leave a half-written shard behind
            if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
                raise write_error(error, target) from error
            raise
        for warning in caught:
            if issubclass(warning.category, SkippedSampleWarning):
                skipped_names.append(str(warning.message))
                tqdm.write(f"effvid-data encode: {warning.message}", file=sys.stderr)
        tmp.replace(target)
        bar.set_postfix(samples=written)
    stats = {
        "shards": len(urls), "shards_reused": reused, "samples": written, "skipped": int(skipped.value),
        "skipped_samples": skipped_names, "seconds": round(time.perf_counter() - started, 3),
    }  # fmt: skip
    write_atomic(out_dir / STATS_NAME, json.dumps(stats, indent=1) + "\n")
    return stats
