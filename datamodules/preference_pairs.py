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

import torch

from datamodules.shard_datamodule import ShardDataModule
from datamodules.shard_lists import ShardSpec
from datamodules.video_decoding import ClipTooShortError, VideoDecodeError, decode_clip

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
    """Pipeline stage: raw pair samples -> `{"win", "lose", "caption", "key", "meta"}`; a pair
    that cannot be used is skipped with a `SkippedPairWarning` and counted in `skipped`."""

    def __init__(self, skipped: Any, **clip_options: Any) -> None:
        self.skipped, self.clip_options = skipped, clip_options

    def _skip(self, message: str) -> None:
        warnings.warn(message, SkippedPairWarning, stacklevel=3)
        with self.skipped.get_lock():
            self.skipped.value += 1

    def __call__(self, samples: Iterator[dict[str, Any]], epoch: int = 0) -> Iterator[dict[str, Any]]:
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            missing = sorted(_MEMBERS - set(sample))
            if missing:
                self._skip(f"skipping pair {key} in shard {url}: no {missing}")
                continue
            try:
                caption = sample["prompt.txt"].decode("utf-8").strip()
                meta = json.loads(sample["json"])
                win, lose = (
                    decode_clip(sample[m], url=url, key=key, random_start=False, rng=None, **self.clip_options)
                    for m in ("win.mp4", "lose.mp4")
                )
            except (UnicodeDecodeError, json.JSONDecodeError, VideoDecodeError, ClipTooShortError) as exc:
                self._skip(f"skipping pair {key} in shard {url}: {exc}")
                continue
            if win.shape != lose.shape:
                self._skip(f"skipping pair {key} in shard {url}: win {tuple(win.shape)} != lose {tuple(lose.shape)}")
                continue
            yield {"win": win, "lose": lose, "caption": caption, "key": key, "meta": meta}


class PreferencePairDataModule(ShardDataModule):
    """Batches `{"win", "lose": (B, C, F, H, W) in [-1, 1], "caption", "key", "meta": lists}`.

    Args mirror `VideoShardDataModule`: `num_frames` frames `frame_stride` apart from frame 0
    (None: all), resized to `size`, `channels` 1 (luma) or 3. `epoch_samples` pairs make an
    epoch (the shards cycled to fill it).
    """

    media = ("win.mp4",)
    collate = staticmethod(collate_pairs)

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
        super().__init__(train_shards, val_shards, batch_size=batch_size, val_batch_size=val_batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed, epoch_samples=epoch_samples)
        self.clip_options = dict(num_frames=num_frames, stride=frame_stride, size=size, channels=channels)

    def members(self) -> set[str]:
        return set(_MEMBERS)

    def _decode_stage(self, train: bool) -> _DecodePairs:
        return _DecodePairs(self._skipped, **self.clip_options)
