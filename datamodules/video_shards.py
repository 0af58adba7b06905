"""`VideoShardDataModule`: batches of clips from WebDataset video shards (video2dataset layout).

Each shard sample holds `KEY.mp4` (H.264), `KEY.txt` (caption) and `KEY.json` (metadata).
Only those raw bytes are read and decoded here (mp4 with `decoder`, txt as UTF-8, json with
`json.loads`); nothing is ever unpickled.

Training batches come from a `ShardStream` (`datamodules/shard_readers.py`): the shard list,
shuffled per epoch with a seed shared by all processes, is dealt to the readers (every
DataLoader worker of every rank) balancing their sample counts, and every reader yields the
same number of batches, so DDP ranks step in lock-step whatever the shard sizes. Every reader
needs at least one shard, which `setup()` checks (a clear error, no fallback). `epoch_samples`
instead fixes the epoch length, each reader cycling through its shards.

Exact resume: the train loader is a `StatefulDataLoader` (`datamodules/loaders.py`) whose
state holds every worker's stream position; Lightning saves it in every checkpoint and loads
it on resume, and the next batches are the ones the uninterrupted run would have seen.
Randomness inside readers (shard deal, sample shuffle, start frames) derives from (seed,
epoch, rank, worker, sample key), so workers carry no RNG state that would need saving.
"""

from __future__ import annotations

import functools
import json
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS
from datamodules.bucket_batches import BucketPlan, ShardBuckets, clips_per_bucket, scan_shard
from datamodules.buckets import BucketTable
from datamodules.shard_datamodule import ShardDataModule, SkippedSampleWarning
from datamodules.shard_lists import ShardSpec
from datamodules.video_decoders import get_decoder
from datamodules.video_decoding import (ClipTooShortError, VideoDecodeError, decode_frames, frames_to_video,
                                        sample_frame_indices)

__all__ = ["DecodeSamples", "SkippedSampleWarning", "VideoShardDataModule", "collate_clips"]

Sample = dict[str, Any]


def collate_clips(samples: list[Sample]) -> dict[str, Any]:
    """Stack decoded samples into a batch: tensors (`frames` (B, F, H, W, 3) uint8, or `latent`
    and text embeddings from encoded shards) are stacked; text and metadata stay Python lists."""
    return {
        name: torch.stack([s[name] for s in samples]) if isinstance(value, torch.Tensor) else [s[name] for s in samples]
        for name, value in samples[0].items()
    }


@functools.lru_cache(maxsize=4096)
def _shard_name(url: str) -> str:
    # Cached: a Path per sample cost ~1% of the loader's time on small clips.
    return Path(url).name


def _outside_archive(key: str) -> bool:
    """A member path that would leave the archive if extracted (absolute or with `..`)."""
    return key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/")


class DecodeSamples:
    """Pipeline stage: raw shard samples -> `{"frames" (F, H, W, 3) uint8, "caption", "key",
    "meta"}` (`frames_to_video` makes the float clip).

    A sample that cannot be used is skipped with one `SkippedSampleWarning` naming its shard
    and key, and counted in the shared `skipped` counter.
    """

    media_member = "mp4"  # the member a usable sample must have

    def __init__(self, skipped: Any, *, caption_key: str, seed: int, num_frames: int | None, stride: int,
                 random_start: bool, size: int | None, timeout: float | None = None,
                 require_caption: bool = False, max_pixels: int | None = None, cache_mb: float = 0,
                 decoder: str = "decord") -> None:  # fmt: skip
        self.skipped, self.caption_key, self.seed = skipped, caption_key, seed
        self.require_caption = require_caption
        self.random_start = random_start
        self.clip_options = dict(num_frames=num_frames, stride=stride, random_start=random_start,
                                 size=size, timeout=timeout, max_pixels=max_pixels,
                                 decoder=decoder)
        self.cache = DecodedClips(cache_mb) if cache_mb > 0 else None

    def _sample_rng(self, url: str, key: str, epoch: int) -> np.random.Generator | None:
        # Seeded per sample, not per stream, so a resumed reader that skips samples without
        # decoding them still draws the same start frames for the ones after.
        if not self.random_start:
            return None
        return np.random.default_rng([self.seed, epoch, zlib.crc32(f"{_shard_name(url)}\0{key}".encode())])

    def _skip(self, message: str, warn: bool = True) -> None:
        if warn:
            warnings.warn(message, SkippedSampleWarning, stacklevel=3)
        with self.skipped.get_lock():
            self.skipped.value += 1
        return None

    def __call__(self, samples: Iterator[Sample], epoch: int = 0) -> Iterator[Sample]:
        for sample in samples:
            decoded = self.decode_one(sample, epoch)
            if decoded is not None:
                yield decoded

    def decode_one(self, sample: Sample, epoch: int, shape: tuple[int, int, int] | None = None) -> Sample | None:
        """The decoded sample, or None when it is skipped (warned about and counted). `shape`
        (frames, height, width), a bucket's, replaces the stage's `num_frames` and `size`."""
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        where = f"sample {key} in shard {url}"
        if _outside_archive(key):
            return self._skip(f"skipping {where}: its member path points outside the archive")
        if self.media_member not in sample:
            # video2dataset keeps failed downloads as json-only samples: counted, not warned about.
            return self._skip(f"skipping {where}: no .{self.media_member} member", warn=not _is_failed_download(sample))
        if self.require_caption and self.caption_key not in sample:
            return self._skip(f"skipping {where}: no .{self.caption_key} caption")
        try:
            caption = sample[self.caption_key].decode("utf-8") if self.caption_key in sample else ""
        except UnicodeDecodeError as exc:
            return self._skip(f"skipping {where}: .{self.caption_key} is not UTF-8 ({exc.reason})")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._skip(f"skipping {where}: .json is not valid JSON ({exc})")
        options = self.clip_options if shape is None else {**self.clip_options, "num_frames": shape[0], "size": shape[1:]}
        try:
            media = self.decode_media(sample, url, key, self._sample_rng(url, key, epoch), options)
        except (VideoDecodeError, ClipTooShortError) as exc:
            return self._skip(f"skipping {exc}")
        return {**media, "caption": caption.strip(), "key": key, "meta": meta}

    def decode_media(self, sample: Sample, url: str, key: str, rng: np.random.Generator | None,
                     options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The sample's tensors decoded with `options` (`rng` draws the start frame): uint8
        `frames` (F, H, W, 3); raises `VideoDecodeError` / `ClipTooShortError` naming it."""
        if self.cache is None:
            return {"frames": decode_frames(sample["mp4"], url=url, key=key, rng=rng, **options)}
        clip = self.cache.get(url, key)
        if clip is None:  # every frame, so any start frame of a later epoch is in the cache
            every_frame = {**options, "num_frames": None, "stride": 1, "random_start": False}
            # contiguous: a crop is a view, which would keep the whole decoded clip alive
            clip = self.cache.put(url, key, decode_frames(sample["mp4"], url=url, key=key, rng=None, **every_frame).contiguous())
        return {"frames": clip[self.frame_indices(len(clip), url, key, rng, options)]}

    def frame_indices(self, num_available: int, url: str, key: str, rng: np.random.Generator | None,
                      options: dict[str, Any] | None = None) -> np.ndarray:
        """`sample_frame_indices` with this stage's options; a too-short clip is named by key and shard."""
        options = options or self.clip_options
        try:
            return sample_frame_indices(num_available, options["num_frames"], options["stride"], options["random_start"], rng)
        except ClipTooShortError as exc:
            raise ClipTooShortError(f"sample {key} in shard {url}: {exc}") from exc


class DecodedClips:
    """Decoded clips (every frame, resized, uint8) kept in a reader's memory up to `max_mb`, so
    that the epochs after the first decode nothing: a small dataset read for many epochs (the
    moving digits' 2,000 clips take 24 MB) is otherwise decode-bound on a CPU. Each DataLoader
    worker holds its own (workers persist across epochs). Clips past the budget are decoded
    every time: with a cyclic read order, evicting would only ever evict the next clip. Meant
    for short clips: a clip is decoded whole, so the decode budget (`max_pixels`) counts all
    of its frames, not only the sampled ones."""

    def __init__(self, max_mb: float) -> None:
        self.free = int(max_mb * 2**20)
        self.clips: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, url: str, key: str) -> torch.Tensor | None:
        return self.clips.get((url, key))

    def put(self, url: str, key: str, clip: torch.Tensor) -> torch.Tensor:
        size = clip.numel() * clip.element_size()
        if size <= self.free:
            self.clips[(url, key)] = clip
            self.free -= size
        return clip


def _is_failed_download(sample: Sample) -> bool:
    try:
        return json.loads(sample.get("json", b"{}")).get("status", "success") != "success"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


class VideoShardDataModule(ShardDataModule):
    """Batches `{"video": (B, C, F, H, W) float32 in [-1, 1], "caption": [str], "key": [str],
    "meta": [dict]}` from WebDataset shards of mp4/txt/json samples (see `ShardDataModule` for
    the epochs and the train/validation streams).

    The loaders yield the clips as decoded, `"frames"`: uint8 `(B, F, H, W, 3)` RGB, and
    `on_after_batch_transfer` (which the trainer calls once the batch is on the model's
    device) makes `"video"` of them with `frames_to_video`: a quarter of the bytes to move
    between processes and to the accelerator, and no float work in the workers. Code that
    iterates a loader itself calls `dm.on_after_batch_transfer(batch, 0)`.

    Train clips start at a random frame (`random_start`), validation clips at the first.
    `num_frames=None` takes every frame (at `frame_stride`); `size=None` keeps the resolution.
    Clips shorter than `(num_frames - 1) * frame_stride + 1` are skipped with a warning, as is
    a clip whose decoding takes longer than `decode_timeout` seconds, a sample without a
    caption (unless `require_caption=False`: empty caption) and a member whose path would
    leave the archive; all are counted in `num_skipped_samples`, as are unreadable tar data.
    `decoded_cache_mb` keeps up to that many MB of decoded clips per reader (`DecodedClips`):
    the same batches, decoded once. `decoder` picks the video decoder (`video_decoders.DECODERS`).
    """

    collate = staticmethod(collate_clips)

    def __init__(
        self,
        train_shards: ShardSpec,
        val_shards: ShardSpec | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        num_frames: int | None = 8,
        frame_stride: int = 2,
        random_start: bool = True,
        size: int | None = 16,
        channels: int = 3,
        shuffle_buffer: int = 256,
        seed: int = 0,
        caption_key: str = "txt",
        epoch_samples: int | None = None,
        decode_timeout: float | None = None,
        require_caption: bool = True,
        max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
        decoded_cache_mb: float = 0,
        buckets: Sequence[Mapping[str, Any]] | None = None,
        max_upscale: float = 1.0,
        decoder: str = "decord",
    ) -> None:
        super().__init__(train_shards, val_shards, batch_size=batch_size, val_batch_size=val_batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed,
                         caption_key=caption_key, epoch_samples=epoch_samples)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.num_frames, self.frame_stride, self.random_start = num_frames, frame_stride, random_start
        self.size, self.channels = size, channels
        self.decode_timeout = decode_timeout
        self.require_caption = require_caption
        self.max_decode_pixels = max_decode_pixels
        self.decoded_cache_mb = decoded_cache_mb
        self.bucket_table = None if buckets is None else BucketTable(buckets, max_upscale, stride=frame_stride)
        self.bucket_scan: dict[str, ShardBuckets] | None = None  # per training shard, from setup
        self.bucket_clips: list[int] = []  # clips per bucket over all training shards
        self.unfit_clips: list[str] = []
        get_decoder(decoder)  # an unknown or uninstalled `data.decoder` fails here, not in a worker
        self.decoder = decoder

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """`"frames"` (uint8, as the loaders yield them) -> `"video"` (B, C, F, H, W) float32 in
        [-1, 1], on the batch's device."""
        if isinstance(batch, dict) and "frames" in batch:
            batch = {**batch, "video": frames_to_video(batch["frames"], self.channels)}
            del batch["frames"]
        return batch

    def _count_samples(self, urls: list[str]) -> dict[str, int]:
        if self.bucket_table is None:
            return super()._count_samples(urls)
        self.bucket_scan = {url: scan_shard(url, self.bucket_table, self.media[0]) for url in urls}
        self.unfit_clips = [clip for scan in self.bucket_scan.values() for clip in scan.unfit]
        if self.unfit_clips:
            warnings.warn(f"{len(self.unfit_clips)} training clips fit no bucket of data.buckets "
                          f"({self.bucket_table.describe()}, max_upscale={self.bucket_table.max_upscale:g}) "
                          f"and are left out: {'; '.join(self.unfit_clips[:5])}"
                          f"{' ...' if len(self.unfit_clips) > 5 else ''}", SkippedSampleWarning, stacklevel=3)
        self.bucket_clips = clips_per_bucket(self.bucket_scan.values(), len(self.bucket_table))
        empty = [b.name for b, n in zip(self.bucket_table, self.bucket_clips) if b.weight is not None and not n]
        if empty:
            raise ValueError(f"data.buckets {empty} have a weight but no training clip goes to them "
                             f"(`effvid-data inspect DIR --buckets CONFIG` shows where the clips go)")
        return {url: scan.usable for url, scan in self.bucket_scan.items()}

    def check_model(self, model: Any) -> None:
        """Raise naming the bucket when one of `data.buckets` cannot go through the model's
        video VAE (e.g. a family that takes 4k+1 frames, or sizes a multiple of 16)."""
        check = getattr(getattr(model, "autoencoder", None), "check_shape", None)
        for bucket in self.bucket_table or ():
            if check is not None:
                check(*bucket.shape, where=f"data.buckets {bucket.name} (frames x height x width)")

    def _bucket_plan(self) -> BucketPlan | None:
        if self.bucket_table is None:
            return None
        stage = self._decode_stage(train=True)
        return BucketPlan(self.bucket_table, self.bucket_scan, decode=stage.decode_one, media=self.media[0])

    def _mean_batch_size(self) -> float:
        if self.bucket_table is None:
            return self.batch_size
        return self.bucket_table.mean_batch_size(self.bucket_table.batch_weights(self.bucket_clips))

    def _decode_stage(self, train: bool) -> DecodeSamples:
        return DecodeSamples(
            self._skipped, caption_key=self.caption_key, seed=self.seed,
            num_frames=self.num_frames, stride=self.frame_stride,
            random_start=self.random_start and train, size=self.size,
            timeout=self.decode_timeout, require_caption=self.require_caption, max_pixels=self.max_decode_pixels,
            cache_mb=self.decoded_cache_mb, decoder=self.decoder,
        )
