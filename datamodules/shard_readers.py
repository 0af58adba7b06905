"""`ShardStream`: the training batches of WebDataset shards, as an IterableDataset that owns its
position (`state_dict` / `load_state_dict`, saved per worker by torchdata's `StatefulDataLoader`).

A *reader* is one DataLoader worker of one rank (`rank * num_workers + worker`); a rank with
`num_workers=0` has one reader, its main process. Everything a reader does in an epoch follows
from (seed, epoch), so every process computes the same plan without talking to the others:

* **Balanced shards.** The shard list is shuffled with (seed, epoch), then dealt to readers
  largest-first onto the least-loaded reader (sample counts from the shard manifests, or from
  the tar headers), so uneven shards (10/10/10/3) give readers near-equal loads.
* **Equal batches.** Every reader yields the same number of batches per epoch,
  `min over readers of load // batch_size` (or `epoch_samples // (batch_size * readers)`), so
  every DDP rank steps the same number of times and no rank waits forever in an all-reduce.
  The readers with more data stop early; their extra samples come up in other epochs, whose
  deals differ. No sample is read twice in an epoch unless bad samples were skipped: a reader
  that falls short then repeats its most recent good samples to fill its last batches.
* **Exact resume.** The position is (epoch, samples drawn from the shuffle buffer, bad ones
  included, batches yielded). A resumed reader re-reads its shards from the start of the epoch
  and drops that many samples *after the seeded shuffle and before decoding*: the shuffle
  buffer is rebuilt by replay rather than saved, and skipping costs reading tar bytes, not
  decoding video. Start frames are seeded per sample (`DecodeSamples`), so they replay too.
"""

from __future__ import annotations

import json
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from datamodules.bucket_batches import BucketPlan

Sample = dict[str, Any]


def count_shard_samples(url: str, media: tuple[str, ...] = ("mp4",)) -> int:
    """Samples with a member of a `media` extension (`mp4`, `latent.npy`, ...) in the local shard `url`: from
    its manifest's `keys` when there is one, else by listing the tar headers."""
    path = Path(url)
    manifest = path.with_name(path.name.removesuffix(".tar") + ".manifest.json")
    if manifest.is_file():
        try:
            keys = json.loads(manifest.read_text(encoding="utf-8")).get("keys")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            keys = None
        if isinstance(keys, list):
            return len(keys)
    with_media: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                key, _, extension = name.partition(".")
                if extension.lower() in media:
                    with_media.add(f"{folder}/{key}")
    except (tarfile.TarError, OSError) as exc:
        warnings.warn(f"shard {url} is unreadable after {len(with_media)} samples ({exc}); "
                      "counting those", stacklevel=2)
    return len(with_media)


def deal_shards(urls: list[str], sizes: dict[str, int] | None, num_readers: int,
                seed: int, epoch: int) -> list[list[str]]:
    """The shards of every reader in epoch `epoch`: shuffled with (seed, epoch), then dealt
    largest-first to the least-loaded reader (round-robin when sizes are unknown; a single
    reader keeps the shuffled order)."""
    order = list(urls)
    random.Random(f"shards:{seed}:{epoch}:0").shuffle(order)
    if sizes is None or num_readers == 1:
        return [order[r::num_readers] for r in range(num_readers)]
    order.sort(key=lambda u: -sizes[u])  # stable: equal sizes keep the shuffled order
    dealt: list[list[str]] = [[] for _ in range(num_readers)]
    loads = [0] * num_readers
    for url in order:
        reader = min(range(num_readers), key=lambda r: (loads[r], len(dealt[r]), r))
        dealt[reader].append(url)
        loads[reader] += sizes[url]
    return dealt


def batches_per_reader(urls: list[str], sizes: dict[str, int], num_readers: int, batch_size: float,
                       epoch_samples: int | None = None) -> int:
    """Batches every reader yields per epoch (the same in every epoch: largest-first dealing
    depends on the sizes only, not on the epoch's shuffle). With buckets, `batch_size` is the
    mean over the buckets' batch shares."""
    if epoch_samples is not None:
        return _whole(epoch_samples / (batch_size * num_readers))
    dealt = deal_shards(urls, sizes, num_readers, 0, 0)
    return _whole(min(sum(sizes[u] for u in mine) for mine in dealt) / batch_size)


def _whole(batches: float) -> int:
    return int(batches + 1e-9)  # a mean batch size of 1.8 is 1.7999...: 1800 samples still give 1000


class ShardStream(IterableDataset):
    """Training batches of one rank: each DataLoader worker's copy is one reader (see the
    module docstring). Each pass (`iter`) is the next epoch, starting at `first_epoch`, except
    the first pass after `load_state_dict`, which yields the rest of the loaded epoch (nothing,
    for a reader that had finished it while others had not).

    Stages: `read` turns `{"url"}` dicts into raw tar samples (webdataset), `decode(samples,
    epoch)` turns raw samples into decoded ones (dropping bad ones), `collate` makes a batch.
    With `buckets` (a `BucketPlan`), every batch is one bucket's shape and size instead
    (`datamodules/bucket_batches.py`; `sizes` then count the clips that fit a bucket).
    """

    def __init__(self, urls: list[str], sizes: dict[str, int], *, read: Callable[[Iterator[Sample]], Iterator[Sample]],
                 decode: Callable[[Iterator[Sample], int], Iterator[Sample]], collate: Callable[[list[Sample]], Sample],
                 batch_size: int, seed: int, shuffle_buffer: int, epoch_samples: int | None = None,
                 first_epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 buckets: BucketPlan | None = None) -> None:
        super().__init__()
        self.urls, self.sizes = urls, sizes
        self.read, self.decode, self.collate = read, decode, collate
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.epoch_samples = epoch_samples
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.num_readers = world_size * max(num_workers, 1)
        self.buckets = buckets
        self.budget = batches_per_reader(urls, sizes, self.num_readers,
                                         batch_size if buckets is None else buckets.mean_batch_size, epoch_samples)
        # The position: the epoch of the current (or last) pass, samples drawn and batches
        # yielded in it. Each worker's copy advances its own.
        self.epoch, self.samples, self.batches = first_epoch - 1, 0, 0
        self._continue = False

    @property
    def batches_per_pass(self) -> int:
        """Batches per epoch of this rank (all its workers). Not `__len__`: for Lightning the
        stream stays an unsized iterable, which it reads one batch ahead of the trainer (the
        loader's state follows the batches the trainer took, see `ShardLoader`)."""
        return self.budget * max(self.num_workers, 1)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (from its beginning)."""
        self.epoch, self.samples, self.batches, self._continue = epoch - 1, 0, 0, False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples": self.samples, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.samples, self.batches = int(state["epoch"]), int(state["samples"]), int(state["batches"])
        self._continue = True

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream made for {self.num_workers} workers runs in a loader with {num_workers}")
        if not self._continue:
            self.epoch, self.samples, self.batches = self.epoch + 1, 0, 0
        self._continue = False
        return self._batches(worker)

    def _shard_urls(self, mine: list[str], worker: int) -> Iterator[Sample]:
        """This reader's shards in the dealt order; with `epoch_samples` or buckets, cycled
        (reshuffled) until the budget is met."""
        cycle = 0
        while mine and (self.epoch_samples is not None or self.buckets is not None or cycle == 0):
            order = list(mine)
            if cycle > 0:
                random.Random(f"cycle:{self.seed}:{self.epoch}:{self.rank}:{worker}:{cycle}").shuffle(order)
            yield from ({"url": url} for url in order)
            cycle += 1

    def _count_and_skip(self, samples: Iterator[Sample], skip: int) -> Iterator[Sample]:
        """Count the samples drawn this epoch; drop the first `skip` (consumed before a resume)."""
        for drawn, sample in enumerate(samples, start=1):
            if drawn > skip:
                self.samples = drawn
                yield sample

    def _batches(self, worker: int) -> Iterator[Sample]:
        epoch, size = self.epoch, self.batch_size
        mine = deal_shards(self.urls, self.sizes, self.num_readers, self.seed, epoch)[
            self.rank * max(self.num_workers, 1) + worker]
        samples = self.read(self._shard_urls(mine, worker))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"samples:{self.seed}:{epoch}:{self.rank}:{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        if self.buckets is not None:
            self.samples = 0  # re-counted while the plan replays
            yield from self.buckets.batches(self, f"{self.rank}:{worker}", mine, iter(samples), self.collate)
            return
        decoded = self.decode(self._count_and_skip(samples, self.samples), epoch)
        batch: list[Sample] = []
        recent: list[Sample] = []
        for sample in decoded if self.batches < self.budget else ():
            batch.append(sample)
            if len(batch) == size:
                self.batches += 1  # counted before the yield: the worker's state is read at the yield
                yield self.collate(batch)
                recent, batch = batch, []
                if self.batches >= self.budget:
                    return
        filler = (batch + recent)[-size:]  # bad samples were skipped: repeat the latest good ones
        if len(filler) < size:
            if self.batches < self.budget:
                warnings.warn(f"reader {self.rank}:{worker} has too few good samples for its {self.budget} "
                              f"batches in epoch {epoch}", stacklevel=2)
            return
        while self.batches < self.budget:
            self.batches += 1
            yield self.collate(filler)
