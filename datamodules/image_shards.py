"""`ImageShardDataModule`: batches of images from WebDataset image shards (img2dataset layout).

Each shard sample holds `KEY.jpg` (or `.jpeg` / `.png`), `KEY.txt` (caption) and `KEY.json`
(metadata), the layout img2dataset writes and `effvid-data images` reproduces. img2dataset
also keeps entries that failed to download: a `.json` (with `"status": "failed_to_download"`)
and no image. Those, and images that do not decode, are skipped with a warning naming shard
and key and counted in `num_skipped_samples`. Images are decoded with PIL from the raw bytes;
nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import warnings
from collections.abc import Iterator
from typing import Any

import lightning
import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image, UnidentifiedImageError

from datamodules.loaders import ShardLoader
from datamodules.shard_lists import ShardSpec, check_enough_shards, resolve_shards
from datamodules.video_decoding import _resize_center_crop
from datamodules.video_shards import SelectFiles, SkippedSampleWarning, _warn_and_continue

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

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
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


class _SeededShuffle:
    """Shuffle shards (or samples in a buffer) with a seed and the pass number, so every pass
    differs and a rerun repeats. Shard order ignores rank and worker (all readers agree
    before splitting); the sample buffer adds them."""

    def __init__(self, seed: int, what: str, bufsize: int | None = None) -> None:
        self.seed, self.what, self.bufsize, self.passes = seed, what, bufsize, 0

    def __call__(self, items: Iterator[Sample]) -> Iterator[Sample]:
        self.passes += 1
        if self.bufsize is None:
            order = list(items)
            random.Random(f"{self.what}:{self.seed}:{self.passes}").shuffle(order)
            return iter(order)
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.what}:{self.seed}:{self.passes}:{rank}:{worker}")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(items)


class ImageShardDataModule(lightning.LightningDataModule):
    """Batches `{"image": (B, C, H, W) float32 in [-1, 1], "caption": [str], "key": [str],
    "meta": [dict]}` from WebDataset shards of jpg/png + txt + json samples.

    Train: shards and a sample buffer shuffled per pass from `seed`, last partial batch
    dropped. Validation: shard order, every sample once.
    """

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
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.size, self.channels = num_workers, size, channels
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.caption_key = caption_key.lstrip(".").lower()
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def num_skipped_samples(self) -> int:
        """Entries skipped so far (no image, undecodable, bad caption or metadata), all workers."""
        return int(self._skipped.value)

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        world_size = int(trainer.world_size) if trainer is not None else 1
        if stage in (None, "fit"):
            self.train_urls = resolve_shards(self.train_shards)
            check_enough_shards(len(self.train_urls), self.num_workers, world_size, str(self.train_shards))
        if self.val_shards is not None and stage in (None, "fit", "validate"):
            self.val_urls = resolve_shards(self.val_shards)

    def _pipeline(self, urls: list[str], train: bool) -> wds.DataPipeline:
        files = SelectFiles({*IMAGE_EXTENSIONS, "json", self.caption_key})
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            _SeededShuffle(self.seed, "shards") if train else None,
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_warn_and_continue, select_files=files),
            _SeededShuffle(self.seed, "samples", self.shuffle_buffer) if train and self.shuffle_buffer > 1 else None,
            _DecodeImages(self._skipped, self.caption_key, self.size, self.channels),
            wds.batched(self.batch_size if train else self.val_batch_size, collation_fn=collate_images, partial=not train),
        )

    def train_pipeline(self) -> wds.DataPipeline:
        if self.train_urls is None:
            self.setup("fit")
        return self._pipeline(self.train_urls, train=True)

    def train_dataloader(self) -> ShardLoader:
        return ShardLoader(self.train_pipeline(), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        if self.val_urls is None:
            self.setup("validate")
        return ShardLoader(self._pipeline(self.val_urls, train=False), batch_size=None, num_workers=0)
