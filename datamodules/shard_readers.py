"""Which shards each reader reads in an epoch, how many batches it yields, and where it stands.

A *reader* is one DataLoader worker of one rank (`rank * num_workers + worker`); a rank
with `num_workers=0` has one reader, its main process. Three guarantees, all derived from
(seed, epoch) so every process computes the same plan without talking to the others:

* **Balanced shards.** The shard list is shuffled with (seed, epoch), then dealt to readers
  largest-first onto the least-loaded reader (sample counts from the shard manifests, or
  from the tar headers), so uneven shards (10/10/10/3) give readers near-equal loads.
* **Equal batches.** Every reader yields the same number of batches per epoch,
  `min over readers of load // batch_size`, so every DDP rank steps the same number of
  times and no rank waits forever in an all-reduce. The readers with more data stop early;
  their extra samples come up in other epochs, whose shard deals differ. No sample is read
  twice in an epoch, unless bad samples were skipped: a reader that falls short then repeats
  its most recent good samples to fill its last batches (the only duplication, and only with
  skipped samples).
* **Resumable position.** Each batch carries `POSITION_KEY = (rank, worker, epoch,
  samples, batches)`: how many samples this reader had drawn from its shuffle buffer (bad
  ones included) and how many batches it had yielded. The datamodule records the position
  of the last batch the trainer consumed (prefetched batches do not count) and saves it in
  the checkpoint. On resume, each reader re-reads its shards from the start of the epoch
  and drops that many samples *after the seeded shuffle and before decoding*: the shuffle
  buffer is rebuilt by replay rather than saved, so the continuation is exact and skipping
  costs reading tar bytes, not decoding video. A DataLoader always asks worker 0 first, so a
  resumed rank whose last consumed batch came from worker w - 1 lets worker i play reader
  (i + w) mod num_workers for that epoch: the round-robin order continues where it stopped.
"""

from __future__ import annotations

import json
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

Sample = dict[str, Any]
POSITION_KEY = "reader_position"


def count_shard_samples(url: str) -> int | None:
    """Samples with an mp4 in shard `url`: from its manifest's `keys` when there is one, else
    by listing the tar headers. None for a shard that is not a local file."""
    path = Path(url)
    if not path.is_file():
        return None
    manifest = path.with_name(path.name.removesuffix(".tar") + ".manifest.json")
    if manifest.is_file():
        try:
            keys = json.loads(manifest.read_text(encoding="utf-8")).get("keys")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            keys = None
        if isinstance(keys, list):
            return len(keys)
    with_video: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                key, _, extension = name.partition(".")
                if extension.lower() == "mp4":
                    with_video.add(f"{folder}/{key}")
    except (tarfile.TarError, OSError) as exc:
        warnings.warn(f"shard {url} is unreadable after {len(with_video)} samples ({exc}); "
                      "counting those", stacklevel=2)
    return len(with_video)


def deal_shards(urls: list[str], sizes: dict[str, int] | None, num_readers: int,
                seed: int, epoch: int) -> list[list[str]]:
    """The shards of every reader in epoch `epoch`: shuffled with (seed, epoch), then dealt
    largest-first to the least-loaded reader (round-robin when sizes are unknown)."""
    order = list(urls)
    random.Random(f"shards:{seed}:{epoch}:0").shuffle(order)
    if sizes is None:
        return [order[r::num_readers] for r in range(num_readers)]
    order.sort(key=lambda u: -sizes[u])  # stable: equal sizes keep the shuffled order
    dealt: list[list[str]] = [[] for _ in range(num_readers)]
    loads = [0] * num_readers
    for url in order:
        reader = min(range(num_readers), key=lambda r: (loads[r], len(dealt[r]), r))
        dealt[reader].append(url)
        loads[reader] += sizes[url]
    return dealt


@dataclass
class ReaderPass:
    """One reader's plan and progress in its current pass over the data."""

    epoch: int = -1
    reader: int = 0  # the worker index this worker plays (differs only in a resumed epoch)
    budget: int | None = None  # batches this pass yields; None: until the shards end
    skip_samples: int = 0  # resuming: samples already drawn before the checkpoint
    skip_batches: int = 0
    samples: int = 0  # drawn from the shuffle buffer this pass (bad ones included)
    batches: int = 0  # yielded this pass


@dataclass
class ReaderPlan:
    """Shared by the stages of one process's copy of the pipeline (each worker has its own).

    `resume` is a saved datamodule position: `{"epoch", "num_workers", "world_size",
    "readers": {"RANK:WORKER": [samples, batches]}}`; it applies to the first pass only.
    """

    seed: int
    batch_size: int
    sizes: dict[str, int] | None
    epoch_samples: int | None = None
    resume: dict[str, Any] | None = None
    current: ReaderPass = field(default_factory=ReaderPass)
    passes: int = 0


class AssignShards:
    """Pipeline stage: start a pass (the epoch from `clock`), yield this reader's shards."""

    def __init__(self, clock: Any, plan: ReaderPlan) -> None:
        self.clock, self.plan = clock, plan

    def __call__(self, shards: Iterator[Sample]) -> Iterator[Sample]:
        # Not a generator: the pass must start now, before later stages seed from the epoch.
        epoch = self.clock.next_pass()
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        urls = [s["url"] for s in shards]
        plan, readers = self.plan, world_size * num_workers
        dealt = deal_shards(urls, plan.sizes, readers, plan.seed, epoch)
        budget = None
        if plan.epoch_samples is not None:
            budget = plan.epoch_samples // (plan.batch_size * readers)
        elif plan.sizes is not None and readers > 1:
            budget = min(sum(plan.sizes[u] for u in mine) for mine in dealt) // plan.batch_size
        plan.current = current = ReaderPass(epoch=epoch, reader=worker, budget=budget)
        resume, plan.resume = (plan.resume if plan.passes == 0 else None), None
        plan.passes += 1
        if resume is not None and int(resume["epoch"]) == epoch:
            if (resume.get("world_size"), resume.get("num_workers")) != (world_size, num_workers):
                warnings.warn(
                    f"checkpoint's data position is for world_size={resume.get('world_size')}, "
                    f"num_workers={resume.get('num_workers')}; this run has {world_size}, "
                    f"{num_workers}: epoch {epoch} restarts from its beginning", stacklevel=2)
            else:
                done = [resume["readers"].get(f"{rank}:{w}", (0, 0)) for w in range(num_workers)]
                current.reader = (worker + sum(int(b) for _, b in done)) % num_workers
                samples, batches = done[current.reader]
                current.skip_samples, current.skip_batches = int(samples), int(batches)
        mine = dealt[rank * num_workers + current.reader]
        cycles = None if plan.epoch_samples is not None else 1  # epoch_samples: cycle forever
        return self._cycled(mine, epoch, f"{rank}:{current.reader}", cycles)

    def _cycled(self, mine: list[str], epoch: int, reader: str, cycles: int | None) -> Iterator[Sample]:
        cycle = 0
        while mine and (cycles is None or cycle < cycles):
            order = list(mine)
            if cycle > 0:  # the first cycle keeps the dealt order; later ones reshuffle
                random.Random(f"cycle:{self.plan.seed}:{epoch}:{reader}:{cycle}").shuffle(order)
            yield from ({"url": url} for url in order)
            cycle += 1


class ShuffleSamples:
    """Pipeline stage: buffer-shuffle samples, seeded by (seed, epoch, rank, reader)."""

    def __init__(self, plan: ReaderPlan, bufsize: int) -> None:
        self.plan, self.bufsize = plan, bufsize

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        rank, current = wds.utils.pytorch_worker_info()[0], self.plan.current
        rng = random.Random(f"samples:{self.plan.seed}:{max(current.epoch, 0)}:{rank}:{current.reader}")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)


class SkipConsumed:
    """Pipeline stage (after the sample shuffle, before decoding): count the samples drawn
    this pass and drop the ones a resumed checkpoint had already consumed."""

    def __init__(self, plan: ReaderPlan) -> None:
        self.plan = plan

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        current = self.plan.current
        for sample in samples:
            current.samples += 1
            if current.samples > current.skip_samples:
                yield sample


class BatchReaderSamples:
    """Pipeline stage (replaces `wds.batched`): batches of `batch_size` decoded samples, ended
    at the reader's budget, each stamped with the reader's position right after it.

    `wds.batched` pulls one sample ahead before yielding, which would put the next batch's
    first sample into this batch's position. A reader whose stream ends short of its budget
    (bad samples skipped) repeats its latest good samples so its batch count stays equal.
    """

    def __init__(self, plan: ReaderPlan, collate: Callable[[list[Sample]], Sample]) -> None:
        self.plan, self.collate = plan, collate

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        current, size = self.plan.current, self.plan.batch_size
        current.batches = current.skip_batches
        rank, worker = wds.utils.pytorch_worker_info()[0], current.reader

        def full() -> bool:
            return current.budget is not None and current.batches >= current.budget

        def emit(batch: list[Sample]) -> Sample:
            current.batches += 1
            out = self.collate(batch)
            out[POSITION_KEY] = (rank, worker, current.epoch, current.samples, current.batches)
            return out

        batch: list[Sample] = []
        recent: list[Sample] = []
        for sample in ([] if full() else samples):
            batch.append(sample)
            if len(batch) == size:
                yield emit(batch)
                recent, batch = batch, []
                if full():
                    return
        if current.budget is not None and not full():
            filler = (batch + recent)[-size:]
            if len(filler) < size:
                if current.batches < current.budget:
                    warnings.warn(f"reader {rank}:{worker} has too few good samples for its "
                                  f"{current.budget} batches in epoch {current.epoch}", stacklevel=2)
                return
            while not full():
                yield emit(filler)


class PositionTracker:
    """Main-process side: the position of the last batch consumed by the trainer, per reader."""

    def __init__(self) -> None:
        self.epoch = -1
        self.readers: dict[str, list[int]] = {}

    def record(self, position: tuple[int, int, int, int, int]) -> None:
        rank, worker, epoch, samples, batches = (int(v) for v in position)
        if epoch != self.epoch:
            self.epoch, self.readers = epoch, {}
        self.readers[f"{rank}:{worker}"] = [samples, batches]

    def state(self, world_size: int, num_workers: int) -> dict[str, Any]:
        return {"epoch": self.epoch, "world_size": world_size, "num_workers": max(num_workers, 1),
                "readers": dict(self.readers)}
