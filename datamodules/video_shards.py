"""`VideoShardDataModule`: batches of clips from WebDataset video shards (video2dataset layout).

Each shard sample holds `KEY.mp4` (H.264), `KEY.txt` (caption) and `KEY.json` (metadata).
Only those raw bytes are read and decoded here (mp4 with decord, txt as UTF-8, json with
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

import json
import multiprocessing
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import webdataset as wds

from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS
from datamodules.loaders import ShardLoader, rank_and_world_size
from datamodules.shard_lists import ShardSpec, check_enough_shards, resolve_shards
from datamodules.shard_readers import ShardStream, batches_per_reader, count_shard_samples
from datamodules.video_decoding import ClipTooShortError, VideoDecodeError, decode_clip

Sample = dict[str, Any]


class SkippedSampleWarning(UserWarning):
    """A shard sample was skipped (undecodable video, bad caption or metadata, too short)."""


def collate_clips(samples: list[Sample]) -> dict[str, Any]:
    """Stack decoded samples into a batch: tensors (`video` (B, C, F, H, W), or `latent` and
    text embeddings from encoded shards) are stacked; text and metadata stay Python lists."""
    return {
        name: torch.stack([s[name] for s in samples]) if isinstance(value, torch.Tensor) else [s[name] for s in samples]
        for name, value in samples[0].items()
    }


class SelectFiles:
    """Only these extensions are read out of the tar; anything else (e.g. `.pyd`) is never
    loaded, let alone unpickled."""

    def __init__(self, extensions: set[str]) -> None:
        self.extensions = extensions

    def __call__(self, name: str) -> bool:
        return name.rsplit("/", 1)[-1].split(".", 1)[-1].lower() in self.extensions


class CountTarErrors:
    """tar-level error handler (truncated shard, unreadable file): warn with the shard url, count
    the error in the datamodule's skipped counter (a truncated shard loses its remaining
    samples) and go on, so one bad shard does not end a long run.

    webdataset reports one truncation twice: from the member read (message "... @ <file
    name='SHARD'>") and again from the shard loop (with SHARD as the last argument); the second
    report of the same shard is neither warned about nor counted again."""

    def __init__(self, skipped: Any) -> None:
        self.skipped = skipped
        self._member_error: str | None = None

    def __call__(self, exn: Exception) -> bool:
        message = str(exn.args[0]) if exn.args else ""
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else None
        repeated = url is not None and self._member_error is not None and f"name='{url}'" in self._member_error
        self._member_error = message if " @ " in message else None
        if repeated:
            return True
        warnings.warn(f"skipping unreadable shard data: {exn!r}", SkippedSampleWarning, stacklevel=2)
        with self.skipped.get_lock():
            self.skipped.value += 1
        return True


def _outside_archive(key: str) -> bool:
    """A member path that would leave the archive if extracted (absolute or with `..`)."""
    return key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/")


class DecodeSamples:
    """Pipeline stage: raw shard samples -> `{"video", "caption", "key", "meta"}`.

    A sample that cannot be used is skipped with one `SkippedSampleWarning` naming its shard
    and key, and counted in the shared `skipped` counter.
    """

    media_member = "mp4"  # the member a usable sample must have

    def __init__(self, skipped: Any, *, caption_key: str, seed: int, num_frames: int | None, stride: int,
                 random_start: bool, size: int | None, channels: int, timeout: float | None = None,
                 require_caption: bool = False, max_pixels: int | None = None) -> None:
        self.skipped, self.caption_key, self.seed = skipped, caption_key, seed
        self.require_caption = require_caption
        self.random_start = random_start
        self.clip_options = dict(num_frames=num_frames, stride=stride, random_start=random_start,
                                 size=size, channels=channels, timeout=timeout, max_pixels=max_pixels)

    def _sample_rng(self, url: str, key: str, epoch: int) -> np.random.Generator | None:
        # Seeded per sample, not per stream, so a resumed reader that skips samples without
        # decoding them still draws the same start frames for the ones after.
        if not self.random_start:
            return None
        return np.random.default_rng([self.seed, epoch, zlib.crc32(f"{Path(url).name}\0{key}".encode())])

    def _skip(self, message: str, warn: bool = True) -> None:
        if warn:
            warnings.warn(message, SkippedSampleWarning, stacklevel=3)
        with self.skipped.get_lock():
            self.skipped.value += 1

    def __call__(self, samples: Iterator[Sample], epoch: int = 0) -> Iterator[Sample]:
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            where = f"sample {key} in shard {url}"
            if _outside_archive(key):
                self._skip(f"skipping {where}: its member path points outside the archive")
                continue
            if self.media_member not in sample:
                # video2dataset keeps failed downloads as json-only samples: counted, not warned about.
                self._skip(f"skipping {where}: no .{self.media_member} member", warn=not _is_failed_download(sample))
                continue
            if self.require_caption and self.caption_key not in sample:
                self._skip(f"skipping {where}: no .{self.caption_key} caption")
                continue
            try:
                caption = sample[self.caption_key].decode("utf-8") if self.caption_key in sample else ""
            except UnicodeDecodeError as exc:
                self._skip(f"skipping {where}: .{self.caption_key} is not UTF-8 ({exc.reason})")
                continue
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._skip(f"skipping {where}: .json is not valid JSON ({exc})")
                continue
            try:
                media = self.decode_media(sample, url, key, self._sample_rng(url, key, epoch))
            except (VideoDecodeError, ClipTooShortError) as exc:
                self._skip(f"skipping {exc}")
                continue
            yield {**media, "caption": caption.strip(), "key": key, "meta": meta}

    def decode_media(self, sample: Sample, url: str, key: str, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        """The sample's tensors (`rng` draws the start frame); raises `VideoDecodeError` /
        `ClipTooShortError` naming it."""
        return {"video": decode_clip(sample["mp4"], url=url, key=key, rng=rng, **self.clip_options)}


def _is_failed_download(sample: Sample) -> bool:
    try:
        return json.loads(sample.get("json", b"{}")).get("status", "success") != "success"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


class VideoShardDataModule(lightning.LightningDataModule):
    """Batches `{"video": (B, C, F, H, W) float32 in [-1, 1], "caption": [str], "key": [str],
    "meta": [dict]}` from WebDataset shards of mp4/txt/json samples.

    Train: shards shuffled per epoch, samples shuffled in a `shuffle_buffer`, a random start
    frame per clip, the same number of full batches from every reader. Validation: shard order,
    first frames, every sample once (last partial batch kept). All randomness derives from
    (`seed`, epoch): the epoch starts at the trainer's `current_epoch` when the train loader is
    made (so a resumed run continues the sequence), advances by one per pass, and `set_epoch`
    overrides it. `num_frames=None` takes every frame (at `frame_stride`); `size=None` keeps
    the resolution. Clips shorter than `(num_frames - 1) * frame_stride + 1` are skipped with a
    warning, as is a clip whose decoding takes longer than `decode_timeout` seconds, a sample
    without a caption (unless `require_caption=False`: empty caption) and a member whose path
    would leave the archive; all are counted in `num_skipped_samples`, as are unreadable tar data.
    """

    decode_stage = DecodeSamples  # its `media_member` is what a shard's samples are counted by

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
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.num_frames, self.frame_stride, self.random_start = num_frames, frame_stride, random_start
        self.size, self.channels = size, channels
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.caption_key = caption_key.lstrip(".").lower()
        self.epoch_samples = epoch_samples
        self.decode_timeout = decode_timeout
        self.require_caption = require_caption
        self.max_decode_pixels = max_decode_pixels
        self.train_urls: list[str] | None = None
        self.shard_sizes: dict[str, int] | None = None
        self.val_urls: list[str] | None = None
        self._next_epoch = 0
        self._train_loader: ShardLoader | None = None
        self._loader_state: dict[str, Any] | None = None
        # Shared memory, so DataLoader workers (forked or spawned) report skipped samples back.
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def num_skipped_samples(self) -> int:
        """Samples skipped so far (bad video, caption, metadata or too short), all workers."""
        return int(self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        """Make the next training pass epoch `epoch` (each later pass adds one)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._next_epoch = epoch
        if self._train_loader is not None:  # running workers hold their own copy: start new ones
            self._train_loader.shutdown()
            self._train_loader.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position when used without a Trainer. A Trainer saves the
        train loader's own `state_dict` in every checkpoint (the fit loop's `combined_loader`)
        and loads it on resume, so under one this is empty: the position is saved once."""
        if getattr(self, "trainer", None) is not None or self._train_loader is None:
            return {}
        return {"loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream at a `state_dict()` position (applied to the next
        train loader)."""
        if "loader" in state_dict:
            self._loader_state = state_dict["loader"]
        elif "position" in state_dict:
            warnings.warn("the checkpoint's data position is in the format before torchdata's loader state; "
                          "its epoch restarts from the beginning", stacklevel=2)

    @staticmethod
    def _describe(spec: ShardSpec, urls: list[str]) -> str:
        if isinstance(spec, (str, Path)):
            return str(spec)
        parents = sorted({str(Path(u).parent) for u in urls})
        return parents[0] if len(parents) == 1 else f"{len(parents)} directories"

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists and check there are enough shards and samples for every
        reader, so a bad config fails at start, naming the directory."""
        world_size = rank_and_world_size()[1]
        if stage in (None, "fit"):
            self._setup_train(world_size)
        if self.val_shards is not None and stage in (None, "fit", "validate"):
            self.val_urls = resolve_shards(self.val_shards)
            # Validation uses at most one worker per shard; each rank still needs a shard.
            check_enough_shards(len(self.val_urls), 1, world_size,
                                self._describe(self.val_shards, self.val_urls))

    def _setup_train(self, world_size: int) -> None:
        self.train_urls = urls = resolve_shards(self.train_shards)
        check_enough_shards(len(urls), self.num_workers, world_size, self._describe(self.train_shards, urls))
        readers = max(self.num_workers, 1) * world_size
        if self.epoch_samples is not None and self.epoch_samples < self.batch_size * readers:
            raise ValueError(
                f"epoch_samples={self.epoch_samples} gives no batch to each of {readers} "
                f"readers at batch_size={self.batch_size}; raise epoch_samples"
            )
        # Equal batches per reader need every shard's sample count.
        self.shard_sizes = {url: count_shard_samples(url, (self.decode_stage.media_member,)) for url in urls}
        total = sum(self.shard_sizes.values())
        if self.epoch_samples is None and not total:
            raise ValueError(f"a pass over the training shards yielded no batch: they hold no samples "
                             f"({self._list_shards(urls)})")
        if self.epoch_samples is None and not batches_per_reader(urls, self.shard_sizes, readers, self.batch_size):
            raise ValueError(
                f"a pass over the training shards yielded no batch: {self._list_shards(urls)} hold {total} "
                f"samples, and the least loaded of {readers} reader{'s' if readers > 1 else ''} gets fewer "
                f"than batch_size={self.batch_size}; lower data.batch_size or data.num_workers"
            )

    @staticmethod
    def _list_shards(urls: list[str], limit: int = 5) -> str:
        more = f" and {len(urls) - limit} more" if len(urls) > limit else ""
        return ", ".join(urls[:limit]) + more

    def _empty_epoch_message(self) -> str:
        readers = max(self.num_workers, 1) * rank_and_world_size()[1]
        return (
            f"a pass over the training shards yielded no batch: {self._list_shards(self.train_urls or [])} "
            f"gave fewer than batch_size={self.batch_size} usable samples per reader ({readers} reader"
            f"{'s' if readers > 1 else ''}); "
            "the skipped-sample warnings above name the bad ones"
        )

    def _decode_stage(self, train: bool) -> DecodeSamples:
        return DecodeSamples(
            self._skipped, caption_key=self.caption_key, seed=self.seed,
            num_frames=self.num_frames, stride=self.frame_stride,
            random_start=self.random_start and train, size=self.size, channels=self.channels,
            timeout=self.decode_timeout, require_caption=self.require_caption, max_pixels=self.max_decode_pixels,
        )

    def _read_samples(self) -> Any:
        return wds.tarfile_to_samples(
            handler=CountTarErrors(self._skipped), select_files=SelectFiles({"mp4", "json", self.caption_key})
        )

    def train_stream(self) -> ShardStream:
        """The training stream of this rank (an IterableDataset yielding whole batches)."""
        if self.train_urls is None:
            self.setup("fit")
        rank, world_size = rank_and_world_size()
        trainer = getattr(self, "trainer", None)
        return ShardStream(
            self.train_urls, self.shard_sizes, read=self._read_samples(), decode=self._decode_stage(train=True),
            collate=collate_clips, batch_size=self.batch_size, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            epoch_samples=self.epoch_samples, first_epoch=int(trainer.current_epoch) if trainer else self._next_epoch,
            rank=rank, world_size=world_size, num_workers=self.num_workers,
        )

    def val_pipeline(self) -> wds.DataPipeline:
        """The validation pipeline: shard order, first frames, every sample once."""
        if self.val_urls is None:
            self.setup("validate")
        if self.val_urls is None:
            raise ValueError("no val_shards were given")
        return wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            wds.split_by_node,
            wds.split_by_worker,
            self._read_samples(),
            self._decode_stage(train=False),
            wds.batched(self.val_batch_size, collation_fn=collate_clips, partial=True),
        )

    def _loader_timeout(self, num_workers: int) -> float:
        # Backstop for a decoder stuck in C code, which the per-sample alarm cannot interrupt:
        # the run stops with the DataLoader's timeout error instead of hanging forever.
        if not self.decode_timeout or num_workers == 0:
            return 0
        return self.decode_timeout * max(self.batch_size, self.val_batch_size) * 4

    def train_dataloader(self) -> ShardLoader:
        loader = ShardLoader(self.train_stream(), batch_size=None, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0, timeout=self._loader_timeout(self.num_workers),
                             empty_epoch_message=self._empty_epoch_message())
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None  # applies to this loader only
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        num_workers = min(self.num_workers, len(self.val_urls or resolve_shards(self.val_shards)))
        return ShardLoader(self.val_pipeline(), batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0, timeout=self._loader_timeout(num_workers))
