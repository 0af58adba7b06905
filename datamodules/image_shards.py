"""`ImageShardDataModule`: batches of images from WebDataset image shards (img2dataset layout).

Each shard sample holds `KEY.jpg` (or `.jpeg` / `.png`), `KEY.txt` (caption) and `KEY.json`
(metadata), the layout img2dataset writes and `effvid-data images` reproduces. img2dataset
also keeps entries that failed to download: a `.json` (with `"status": "failed_to_download"`)
and no image. Those, and images that do not decode, are skipped with a warning naming shard
and key and counted in `num_skipped_samples`. Images are decoded with PIL from the raw bytes;
nothing is unpickled. Training batches come from the same `ShardStream` as video (balanced
shards, equal batches per reader, exact resume).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, UnidentifiedImageError

from datamodules.shard_datamodule import ShardDataModule, SkippedSampleWarning
from datamodules.shard_lists import ShardSpec
from datamodules.video_decoding import _resize_center_crop

Sample = dict[str, Any]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def decode_image(data: bytes, *, size: int | None, channels: int) -> torch.Tensor:
    """Image bytes -> float32 `(C, H, W)` in [-1, 1], short side resized to `size` and centre
    cropped (None keeps the resolution). Raises `ValueError` for bytes PIL cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc
    frames = torch.from_numpy(pixels.copy()).float()
    frames = frames[None, None] if channels == 1 else rearrange(frames, "h w c -> 1 c h w")  # (1, C, H, W)
    if size is not None:
        frames = _resize_center_crop(frames, size)
    return (frames[0] / 127.5 - 1.0).clamp_(-1.0, 1.0)  # (C, H, W)


def collate_images(samples: list[Sample]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, C, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


class _DecodeImages:
    """Pipeline stage: raw shard samples -> `{"image", "caption", "key", "meta"}`, skipping
    (and counting) failed entries and undecodable images."""

    def __init__(self, skipped: Any, caption_key: str, size: int | None, channels: int) -> None:
        self.skipped, self.caption_key, self.size, self.channels = skipped, caption_key, size, channels

    def _skip(self, message: str) -> None:
        warnings.warn(message, SkippedSampleWarning, stacklevel=3)
        with self.skipped.get_lock():
            self.skipped.value += 1

    def __call__(self, samples: Iterator[Sample], epoch: int = 0) -> Iterator[Sample]:
        for sample in samples:
            where = f"sample {sample.get('__key__', '?')} in shard {sample.get('__url__', '?')}"
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
                caption = sample[self.caption_key].decode("utf-8") if self.caption_key in sample else ""
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._skip(f"skipping {where}: bad caption or metadata ({exc})")
                continue
            if ext is None:
                status = meta.get("status", "no status") if isinstance(meta, dict) else "no status"
                self._skip(f"skipping {where}: no image member ({status})")
                continue
            try:
                image = decode_image(sample[ext], size=self.size, channels=self.channels)
            except ValueError as exc:
                self._skip(f"skipping {where}: {exc}")
                continue
            yield {"image": image, "caption": caption.strip(), "key": sample["__key__"], "meta": meta}


class ImageShardDataModule(ShardDataModule):
    """Batches `{"image": (B, C, H, W) float32 in [-1, 1], "caption": [str], "key": [str],
    "meta": [dict]}` from WebDataset shards of jpg/png + txt + json samples (see
    `ShardDataModule` for the epochs and the train/validation streams).
    """

    media = IMAGE_EXTENSIONS
    collate = staticmethod(collate_images)

    def __init__(
        self,
        train_shards: ShardSpec,
        val_shards: ShardSpec | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        size: int | None = 16,
        channels: int = 3,
        shuffle_buffer: int = 256,
        seed: int = 0,
        caption_key: str = "txt",
    ) -> None:
        super().__init__(train_shards, val_shards, batch_size=batch_size, val_batch_size=val_batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed, caption_key=caption_key)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size, self.channels = size, channels

    def _decode_stage(self, train: bool) -> _DecodeImages:
        return _DecodeImages(self._skipped, self.caption_key, self.size, self.channels)
