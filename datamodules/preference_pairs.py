"""`PreferencePairDataModule`: batches of preference pairs from the shards `effvid-data pairs`
writes (`KEY.prompt.txt`, `KEY.win.mp4`, `KEY.lose.mp4`, `KEY.json`).

Only those members are read (mp4 decoded with `video_decoding.decode_clip`, text as UTF-8,
json with `json.loads`); nothing is unpickled. Winner and loser are decoded with the same
frame indices (from frame 0), so a pair differs only in content. Pair sets are small, so an
epoch is `epoch_samples` pairs, the shards cycled (reshuffled each cycle) to fill it, read by
the same `ShardStream` as video (equal batches per reader, exact resume); the trainer's
`max_steps` ends training.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any

import lightning
import torch
import webdataset as wds

from datamodules.loaders import ShardLoader, rank_and_world_size
from datamodules.shard_lists import ShardSpec, check_enough_shards, resolve_shards
from datamodules.shard_readers import ShardStream, count_shard_samples
from datamodules.video_decoding import ClipTooShortError, VideoDecodeError, decode_clip
from datamodules.video_shards import SelectFiles

_MEMBERS = {"prompt.txt", "win.mp4", "lose.mp4", "json"}


class SkippedPairWarning(UserWarning):
    """A pair was skipped (missing member, undecodable video, bad text or json)."""


def collate_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "win": torch.stack([s["win"] for s in samples]),  # (B, C, F, H, W)
        "lose": torch.stack([s["lose"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


class _DecodePairs:
    def __init__(self, **clip_options: Any) -> None:
        self.clip_options = clip_options

    def __call__(self, samples: Iterator[dict[str, Any]], epoch: int = 0) -> Iterator[dict[str, Any]]:
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            missing = sorted(_MEMBERS - set(sample))
            if missing:
                warnings.warn(f"skipping pair {key} in shard {url}: no {missing}", SkippedPairWarning, stacklevel=2)
                continue
            try:
                caption = sample["prompt.txt"].decode("utf-8").strip()
                meta = json.loads(sample["json"])
                win, lose = (
                    decode_clip(sample[m], url=url, key=key, random_start=False, rng=None, **self.clip_options)
                    for m in ("win.mp4", "lose.mp4")
                )
            except (UnicodeDecodeError, json.JSONDecodeError, VideoDecodeError, ClipTooShortError) as exc:
                warnings.warn(f"skipping pair {key} in shard {url}: {exc}", SkippedPairWarning, stacklevel=2)
                continue
            if win.shape != lose.shape:
                warnings.warn(f"skipping pair {key} in shard {url}: win {tuple(win.shape)} != lose {tuple(lose.shape)}",
                              SkippedPairWarning, stacklevel=2)
                continue
            yield {"win": win, "lose": lose, "caption": caption, "key": key, "meta": meta}


class PreferencePairDataModule(lightning.LightningDataModule):
    """Batches `{"win", "lose": (B, C, F, H, W) in [-1, 1], "caption", "key", "meta": lists}`.

    Args mirror `VideoShardDataModule`: `num_frames` frames `frame_stride` apart from frame 0
    (None: all), resized to `size`, `channels` 1 (luma) or 3. `epoch_samples` pairs make an
    epoch (the shards cycled to fill it).
    """

    def __init__(
        self,
        train_shards: ShardSpec,
        val_shards: ShardSpec | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_frames: int | None = 8,
        frame_stride: int = 1,
        size: int | None = 16,
        channels: int = 1,
        shuffle_buffer: int = 64,
        seed: int = 0,
        epoch_samples: int = 4096,
    ) -> None:
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.epoch_samples = epoch_samples
        self.clip_options = dict(num_frames=num_frames, stride=frame_stride, size=size, channels=channels)
        self.train_urls: list[str] | None = None
        self.shard_sizes: dict[str, int] | None = None
        self.val_urls: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        world_size = rank_and_world_size()[1]
        if stage in (None, "fit"):
            self.train_urls = resolve_shards(self.train_shards)
            check_enough_shards(len(self.train_urls), self.num_workers, world_size, str(self.train_shards))
            readers = max(self.num_workers, 1) * world_size
            if self.epoch_samples < self.batch_size * readers:
                raise ValueError(f"epoch_samples={self.epoch_samples} gives no batch to each of {readers} readers "
                                 f"at batch_size={self.batch_size}; raise epoch_samples")
            self.shard_sizes = {url: count_shard_samples(url, ("win.mp4",)) for url in self.train_urls}
        if self.val_shards is not None and stage in (None, "fit", "validate"):
            self.val_urls = resolve_shards(self.val_shards)

    def _read(self) -> Any:
        return wds.tarfile_to_samples(select_files=SelectFiles(_MEMBERS))

    def train_stream(self) -> ShardStream:
        if self.train_urls is None:
            self.setup("fit")
        rank, world_size = rank_and_world_size()
        trainer = getattr(self, "trainer", None)
        return ShardStream(
            self.train_urls, self.shard_sizes, read=self._read(), decode=_DecodePairs(**self.clip_options),
            collate=collate_pairs, batch_size=self.batch_size, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            epoch_samples=self.epoch_samples, first_epoch=int(trainer.current_epoch) if trainer else 0,
            rank=rank, world_size=world_size, num_workers=self.num_workers,
        )

    def val_pipeline(self) -> wds.DataPipeline:
        if self.val_urls is None:
            self.setup("validate")
        if self.val_urls is None:
            raise ValueError("no val_shards were given")
        return wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            self._read(),
            _DecodePairs(**self.clip_options),
            wds.batched(self.val_batch_size, collation_fn=collate_pairs, partial=True),
        )

    def train_dataloader(self) -> ShardLoader:
        return ShardLoader(self.train_stream(), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        return ShardLoader(self.val_pipeline(), batch_size=None, num_workers=0)
