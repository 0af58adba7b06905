"""Training batches drawn from one bucket at a time (`datamodules/buckets.py` has the table).

At setup every shard is scanned once (`scan_shard`: its json members, or the mp4 header when
the json lacks a size; no frame decoded): how many of its clips go to each bucket, and which
clips fit none (counted and named). A reader then plans its epoch from (seed, epoch, rank,
worker) and these counts alone:

* **Which bucket next.** The bucket whose batch share is furthest behind its weight
  (`w_b * slots - batches_b`), so over any stretch of `n` batches every bucket's count is
  within one batch of `w_b * n`; a bucket none of the reader's shards holds is left out.
* **Which clips.** The reader's raw samples, in the seeded shuffle, go to their bucket's
  queue (undecoded) until the chosen bucket has a batch; its clips are then decoded at the
  bucket's shape. A queue holds at most `MAX_PENDING_BATCHES` batches: clips of a bucket with
  a small weight beyond that are passed over this epoch. The reader cycles through its shards
  (reshuffled) until it has its batches, so every reader yields the same number.
* **Exact resume.** The plan depends on metadata only, never on decoding. A resumed reader
  replays the slots it had yielded (reading tar bytes, decoding nothing), which rebuilds the
  queues, and continues with the next batch. A clip that fails to decode is replaced by
  another clip of its batch, so a bad clip never moves the plan either.
"""

from __future__ import annotations

import random
import tarfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datamodules.buckets import BucketTable, clip_size

if TYPE_CHECKING:
    from datamodules.shard_readers import ShardStream

Sample = dict[str, Any]
MAX_PENDING_BATCHES = 8


@dataclass
class ShardBuckets:
    """One shard's clips per bucket, and the clips that fit no bucket (`url/key: why`)."""

    counts: list[int]
    unfit: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return sum(self.counts)


def scan_shard(url: str, table: BucketTable, media: str = "mp4") -> ShardBuckets:
    """Count the clips of the local shard `url` per bucket of `table` from their json (the mp4
    header when the json has no size), reading no frame."""
    counts, unfit = [0] * len(table), []
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                key, _, extension = name.partition(".")
                extension = extension.lower()
                if member.isfile() and extension in (media, "json"):
                    samples.setdefault(f"{folder}/{key}".lstrip("/"), {})[extension] = member
            for key, members in samples.items():
                if media not in members:
                    continue  # a failed download's json: not a clip
                sample = {"json": tar.extractfile(members["json"]).read()} if "json" in members else {}
                size = clip_size(sample, media)
                if size is None:  # no size in the json: read the header from the clip's bytes
                    size = clip_size({media: tar.extractfile(members[media]).read()}, media)
                bucket = None if size is None else table.assign(size)
                if bucket is None:
                    why = ("no width/height/frames in its json or mp4 header" if size is None else
                           f"{size.frames} frames of {size.width}x{size.height} fit no bucket")
                    unfit.append(f"{Path(url).name}/{key}: {why}")
                else:
                    counts[bucket] += 1
    except (tarfile.TarError, OSError) as exc:
        warnings.warn(f"shard {url} is unreadable after {sum(counts)} clips ({exc}); bucketing those",
                      stacklevel=2)
    return ShardBuckets(counts, unfit)


def clips_per_bucket(scans: Iterable[ShardBuckets], num_buckets: int) -> list[int]:
    """Clips in each bucket over the scanned shards."""
    totals = [0] * num_buckets
    for scan in scans:
        totals = [t + n for t, n in zip(totals, scan.counts)]
    return totals


class BucketSchedule:
    """The next bucket: the one furthest behind its share of the batches so far (ties: the
    larger weight, then the lower index)."""

    def __init__(self, weights: Sequence[float]) -> None:
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(weights)
        self.slots = 0

    def next(self) -> int:
        self.slots += 1
        bucket = max((b for b, w in enumerate(self.weights) if w > 0),
                     key=lambda b: (self.weights[b] * self.slots - self.counts[b], self.weights[b], -b))
        self.counts[bucket] += 1
        return bucket


@dataclass
class BucketPlan:
    """What a `ShardStream` needs to batch by bucket: the table, every shard's scan, the
    batch share of each bucket, how to bucket a raw sample and how to decode it at a shape."""

    table: BucketTable
    shards: dict[str, ShardBuckets]
    decode: Callable[[Sample, int, tuple[int, int, int]], Sample | None]  # (raw, epoch, shape) -> sample
    media: str = "mp4"
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.weights = self.table.batch_weights(clips_per_bucket(self.shards.values(), len(self.table)))

    @property
    def mean_batch_size(self) -> float:
        return self.table.mean_batch_size(self.weights)

    def assign(self, sample: Sample) -> int | None:
        size = clip_size(sample, self.media)
        return None if size is None else self.table.assign(size)

    def batches(self, stream: ShardStream, reader: str, mine: list[str], samples: Iterator[Sample],
                collate: Callable[[list[Sample]], Sample]) -> Iterator[Sample]:
        """The epoch's batches of one reader: `mine` are its shards, `samples` its raw samples
        in the seeded shuffle, cycling. Advances `stream.batches` / `stream.samples`."""
        held = [sum(self.shards[u].counts[b] for u in mine) for b in range(len(self.table))]
        weights = [w if n else 0.0 for w, n in zip(self.weights, held)]
        if not any(weights):
            warnings.warn(f"reader {reader} holds no clip of a bucket with a weight in epoch {stream.epoch}",
                          stacklevel=2)
            return
        schedule = BucketSchedule(weights)
        pending: list[deque[Sample]] = [deque() for _ in self.table]
        give_up = 2 * (sum(held) + stream.shuffle_buffer) + 1  # draws without progress: shards unreadable
        replay, last = stream.batches, None
        for slot in range(stream.budget):
            bucket = schedule.next()
            size = self.table.buckets[bucket].batch_size
            idle = 0
            while len(pending[bucket]) < size:
                sample = next(samples, None)
                idle += 1
                if sample is None or idle > give_up:
                    warnings.warn(f"reader {reader} found no more clips of bucket "
                                  f"{self.table.buckets[bucket].name} after {slot} of its {stream.budget} "
                                  f"batches in epoch {stream.epoch}; are its shards readable?", stacklevel=2)
                    return
                stream.samples += 1
                target = self.assign(sample)
                if target is not None and weights[target] > 0:
                    queue = pending[target]
                    queue.append(sample)
                    if len(queue) > MAX_PENDING_BATCHES * self.table.buckets[target].batch_size:
                        queue.popleft()  # a rarely drawn bucket: its oldest clip waits for another epoch
                    if target == bucket:
                        idle = 0
            raw = [pending[bucket].popleft() for _ in range(size)]
            if slot < replay:
                continue  # yielded before the resume: rebuilds the queues, decodes nothing
            shape = self.table.buckets[bucket].shape
            decoded = [d for d in (self.decode(s, stream.epoch, shape) for s in raw) if d is not None]
            stream.batches = slot + 1  # counted before the yield: the worker's state is read there
            if decoded:
                # a clip that failed to decode is replaced by another of its batch: the plan stays
                last = collate([decoded[i % len(decoded)] for i in range(size)])
            elif last is None:
                warnings.warn(f"reader {reader}: no clip of batch {slot} ({self.table.buckets[bucket].name}) "
                              f"decoded and there is no earlier batch to repeat", stacklevel=2)
                continue
            yield last
