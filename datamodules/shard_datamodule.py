"""`ShardDataModule`: what every shard datamodule (video, encoded, image, preference pairs)
shares: shard lists checked at setup, training batches from a `ShardStream`, validation from a
plain webdataset pipeline, loaders that are `ShardLoader`s, and a count of skipped samples.

A subclass says which tar members it reads (`members`), which ones a usable sample must have
(`media`, also what a shard's samples are counted by), how a batch is made (`collate`) and how
raw samples are decoded (`_decode_stage`). Only the named members are read out of a tar and
they are decoded from raw bytes; webdataset's default decoders (pickle among them) never run.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning
import torch
import webdataset as wds

from datamodules.bucket_batches import BucketPlan
from datamodules.loaders import ShardLoader, rank_and_world_size
from datamodules.shard_lists import ShardSpec, check_enough_shards, resolve_shards
from datamodules.shard_readers import ShardStream, batches_per_reader, count_shard_samples

Sample = dict[str, Any]


class SkippedSampleWarning(UserWarning):
    """A shard sample was skipped (undecodable video, bad caption or metadata, too short)."""


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


def batch_as_yielded(batch: Sample) -> Sample:
    """The loaders' `collate_fn`: train stream and validation pipeline yield whole batches
    (their own `collate`). torch's default for `batch_size=None`, `default_convert`, would walk
    every caption and metadata dict of every batch once more looking for numpy arrays, which
    none holds (~25 us a clip, 1% of decoding a digit clip)."""
    return batch


def _list_shards(urls: list[str], limit: int = 5) -> str:
    more = f" and {len(urls) - limit} more" if len(urls) > limit else ""
    return ", ".join(urls[:limit]) + more


def _describe(spec: ShardSpec, urls: list[str]) -> str:
    if isinstance(spec, (str, Path)):
        return str(spec)
    parents = sorted({str(Path(u).parent) for u in urls})
    return parents[0] if len(parents) == 1 else f"{len(parents)} directories"


class ShardDataModule(lightning.LightningDataModule):
    """Train: shards shuffled per epoch, samples shuffled in a `shuffle_buffer`, the same number
    of full batches from every reader (`epoch_samples`: that many samples per epoch, shards
    cycled). The epoch starts at the trainer's `current_epoch` when the train loader is made
    (so a resumed run continues the sequence), advances by one per pass, and `set_epoch`
    overrides it. Validation: shard order, every sample once (last partial batch kept)."""

    media: tuple[str, ...] = ("mp4",)
    collate: Callable[[list[Sample]], Sample]
    decode_timeout: float | None = None  # seconds per sample; bounds a stuck worker too

    def __init__(self, train_shards: ShardSpec, val_shards: ShardSpec | None, *, batch_size: int,
                 val_batch_size: int | None, num_workers: int, shuffle_buffer: int, seed: int,
                 caption_key: str = "txt", epoch_samples: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.caption_key = caption_key.lstrip(".").lower()
        self.epoch_samples = epoch_samples
        self.train_urls: list[str] | None = None
        self.shard_sizes: dict[str, int] | None = None
        self.val_urls: list[str] | None = None
        self._next_epoch = 0
        self._train_loader: ShardLoader | None = None
        self._loader_state: dict[str, Any] | None = None
        # Shared memory, so DataLoader workers (forked or spawned) report skipped samples back.
        self._skipped = multiprocessing.Value("q", 0)

    def members(self) -> set[str]:
        """The tar members read (by extension); nothing else is loaded."""
        return {*self.media, "json", self.caption_key}

    def _decode_stage(self, train: bool) -> Callable[[Iterator[Sample], int], Iterator[Sample]]:
        raise NotImplementedError

    @property
    def num_skipped_samples(self) -> int:
        """Samples skipped so far (bad media, caption or metadata, unreadable tar data), all workers."""
        return int(self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        """Make the next training pass epoch `epoch` (each later pass adds one)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._next_epoch = epoch
        if self._train_loader is not None:  # running workers hold their own copy: start new ones
            self._train_loader.shutdown()
            self._train_loader.dataset.set_epoch(epoch)

    def _is_trainers(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.datamodule is self

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The trainer took a training batch: the loader's position moves past it (Lightning
        fetched the next one already)."""
        if self._is_trainers() and self.trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The loaders' batches are on the CPU already; Lightning would still rebuild every list
        # and dict of the batch (captions, keys, per-sample metadata: ~2.5 ms a batch of 64).
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (saved by Lightning in every checkpoint). Lightning
        saves the train loader's own state too, but restores it only when the loader is made
        after the checkpoint is read, which `trainer.estimated_stepping_batches` in
        `configure_optimizers` prevents (Lightning-AI/pytorch-lightning#20550); the datamodule
        is restored before any loader is made."""
        return {} if self._train_loader is None else {"loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream at a `state_dict()` position (applied to the next
        train loader)."""
        if "loader" in state_dict:
            self._loader_state = state_dict["loader"]
        elif "position" in state_dict:
            warnings.warn("the checkpoint's data position is in the format before torchdata's loader state; "
                          "its epoch restarts from the beginning", stacklevel=2)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists and check there are enough shards and samples for every
        reader, so a bad config fails at start, naming the directory."""
        world_size = rank_and_world_size()[1]
        if stage in (None, "fit"):
            self._setup_train(world_size)
        if self.val_shards is not None and stage in (None, "fit", "validate"):
            self.val_urls = resolve_shards(self.val_shards)
            # Validation uses at most one worker per shard; each rank still needs a shard.
            check_enough_shards(len(self.val_urls), 1, world_size, _describe(self.val_shards, self.val_urls))

    def _setup_train(self, world_size: int) -> None:
        self.train_urls = urls = resolve_shards(self.train_shards)
        check_enough_shards(len(urls), self.num_workers, world_size, _describe(self.train_shards, urls))
        readers = max(self.num_workers, 1) * world_size
        # Equal batches per reader need every shard's sample count.
        self.shard_sizes = self._count_samples(urls)
        total = sum(self.shard_sizes.values())
        if not total:
            raise ValueError(f"a pass over the training shards yielded no batch: they hold no samples "
                             f"({_list_shards(urls)})")
        batch_size = self._mean_batch_size()
        if self.epoch_samples is not None and not batches_per_reader(urls, self.shard_sizes, readers, batch_size,
                                                                     self.epoch_samples):
            raise ValueError(
                f"epoch_samples={self.epoch_samples} gives no batch to each of {readers} "
                f"readers at batch_size={batch_size:g}; raise epoch_samples"
            )
        if self.epoch_samples is None and not batches_per_reader(urls, self.shard_sizes, readers, batch_size):
            raise ValueError(
                f"a pass over the training shards yielded no batch: {_list_shards(urls)} hold {total} "
                f"samples, and the least loaded of {readers} reader{'s' if readers > 1 else ''} gets fewer "
                f"than batch_size={batch_size:g}; lower data.batch_size or data.num_workers"
            )

    def _count_samples(self, urls: list[str]) -> dict[str, int]:
        """The usable samples of every training shard."""
        return {url: count_shard_samples(url, self.media) for url in urls}

    def _mean_batch_size(self) -> float:
        return self.batch_size

    def _bucket_plan(self) -> BucketPlan | None:
        """How training batches are bucketed by shape (None: one shape, `batch_size`)."""
        return None

    def _read_samples(self) -> Any:
        return wds.tarfile_to_samples(handler=CountTarErrors(self._skipped), select_files=SelectFiles(self.members()))

    def train_stream(self) -> ShardStream:
        """The training stream of this rank (an IterableDataset yielding whole batches)."""
        if self.train_urls is None:
            self.setup("fit")
        rank, world_size = rank_and_world_size()
        trainer = getattr(self, "trainer", None)
        return ShardStream(
            self.train_urls, self.shard_sizes, read=self._read_samples(), decode=self._decode_stage(train=True),
            collate=self.collate, batch_size=self.batch_size, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            epoch_samples=self.epoch_samples, first_epoch=int(trainer.current_epoch) if trainer else self._next_epoch,
            rank=rank, world_size=world_size, num_workers=self.num_workers, buckets=self._bucket_plan(),
        )

    def val_pipeline(self) -> wds.DataPipeline:
        """The validation pipeline: shard order, every sample once."""
        if self.val_urls is None:
            self.setup("validate")
        if self.val_urls is None:
            raise ValueError("no val_shards were given")
        return wds.DataPipeline(
            wds.SimpleShardList(self.val_urls), wds.split_by_node, wds.split_by_worker, self._read_samples(),
            self._decode_stage(train=False),
            wds.batched(self.val_batch_size, collation_fn=self.collate, partial=True),
        )

    def _loader_timeout(self, num_workers: int) -> float:
        # Backstop for a decoder stuck in C code, which the per-sample alarm cannot interrupt:
        # the run stops with the DataLoader's timeout error instead of hanging forever.
        if not self.decode_timeout or num_workers == 0:
            return 0
        return self.decode_timeout * max(self.batch_size, self.val_batch_size) * 4

    def train_dataloader(self) -> ShardLoader:
        stream = self.train_stream()
        readers = stream.num_readers
        empty = (f"a pass over the training shards yielded no batch: {_list_shards(stream.urls)} gave fewer "
                 f"than batch_size={self.batch_size} usable samples per reader ({readers} reader"
                 f"{'s' if readers > 1 else ''}); the skipped-sample warnings above name the bad ones")
        loader = ShardLoader(stream, batch_size=None, collate_fn=batch_as_yielded, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0, timeout=self._loader_timeout(self.num_workers),
                             empty_epoch_message=empty, track_consumption=self._is_trainers())
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None  # applies to this loader only
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        num_workers = min(self.num_workers, len(self.val_urls or resolve_shards(self.val_shards)))
        return ShardLoader(self.val_pipeline(), batch_size=None, collate_fn=batch_as_yielded, num_workers=num_workers,
                           persistent_workers=num_workers > 0, timeout=self._loader_timeout(num_workers))
