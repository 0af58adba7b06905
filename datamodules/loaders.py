"""`ShardLoader`: the DataLoader of every shard datamodule, a torchdata `StatefulDataLoader`
(its `state_dict` holds each worker's `ShardStream` position; Lightning saves it in every
checkpoint, through the datamodule's `state_dict` and as the fit loop's `combined_loader`,
and loads it on resume). What it adds:

* **Signals to the process group.** Ctrl-C, `timeout`, `kill -- -PGID` and SLURM's
  `scancel` signal every process of the job, loader workers included; a worker killed by
  SIGTERM (or one raising KeyboardInterrupt on SIGINT) ends the run before the main process
  can save anything. Workers here ignore SIGINT, SIGTERM and SIGUSR1: the main process
  decides (a checkpoint after the current step, see `experiments/run_callbacks.py`) and
  shuts them down as usual. The signals are blocked in the main process while workers are
  forked, so none arrives in the window before a worker has installed `SIG_IGN`.
* **Shutdown that finishes.** Because workers ignore SIGTERM, torch's shutdown (ask, wait
  5 s, then SIGTERM) leaves a worker that was slow to answer (a busy machine) running, and
  multiprocessing's exit handler (SIGTERM, then join) would wait for it forever, as it would
  for workers nobody shut down (loaders iterated inside another loader). `shutdown()` waits
  longer, then SIGKILLs; at interpreter exit, before that handler runs, every loader is shut
  down and any of their workers still alive is stopped the same way.
* **An epoch with no batch.** An iterable dataset whose pass yields nothing (every sample
  bad) makes Lightning start the next epoch at once, forever. A loader made with
  `empty_epoch_message` raises `EmptyEpochError` with that message instead.
* **The trainer's position.** Lightning fetches a batch ahead of the training step, so the
  position after the last batch handed out is one batch past the last one trained on. A
  loader made with `track_consumption=True` keeps the state after each batch it handed out
  until `mark_consumed()` says the consumer took it (the datamodule's
  `on_before_batch_transfer`), and `state_dict` is the state after the last batch taken.
* **Every rank's position.** Lightning writes rank 0's checkpoint only, so `state_dict`
  gathers the state of every rank and `load_state_dict` takes this rank's; a state saved
  with another world size or worker count is dropped with a warning (the epoch restarts).
"""

from __future__ import annotations

import atexit
import collections
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_LIVE_LOADERS: weakref.WeakSet[ShardLoader] = weakref.WeakSet()
_WORKERS: weakref.WeakSet[Any] = weakref.WeakSet()  # multiprocessing keeps a child referenced until joined


class EmptyEpochError(ValueError):
    """A training pass over the shards yielded no batch."""


class _IgnoreStopSignals:
    """`worker_init_fn` wrapper: the worker ignores the stop signals, then runs `init_fn`."""

    def __init__(self, init_fn: Callable[[int], Any] | None) -> None:
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.init_fn is not None:
            self.init_fn(worker_id)


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside a distributed run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardLoader(StatefulDataLoader):
    """A StatefulDataLoader whose workers ignore stop signals and are shut down at exit, which
    refuses an empty pass (`empty_epoch_message`) and keeps every rank's position."""

    def __init__(self, dataset: Any, *args: Any, empty_epoch_message: str | None = None,
                 track_consumption: bool = False, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls an API torch deprecated, on every loader
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(dataset, *args, **kwargs)
        self.empty_epoch_message = empty_epoch_message
        self.track_consumption = track_consumption
        self.batches_this_pass = self._resumed_batches = 0
        # (batches this pass, loader state) after the last batch taken / after each one handed out since
        self._consumed: tuple[int, dict[str, Any]] | None = None
        self._handed_out: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        _LIVE_LOADERS.add(self)

    def _get_iterator(self) -> Any:
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super()._get_iterator()
        init_fn = self.worker_init_fn  # Lightning may have set its seeding function here
        self.worker_init_fn = _IgnoreStopSignals(init_fn)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super()._get_iterator()  # forks the workers
            _WORKERS.update(iterator._workers)
            return iterator
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.worker_init_fn = init_fn

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        self.batches_this_pass, self._resumed_batches = self._resumed_batches, 0
        self._handed_out.clear()
        self._consumed = (self.batches_this_pass, super().state_dict()) if self.track_consumption else None
        return self._counting(iterator)

    def _counting(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self.batches_this_pass += 1
            if self.track_consumption:
                self._handed_out.append((self.batches_this_pass, super().state_dict()))
            yield batch
        if self.batches_this_pass == 0 and self.empty_epoch_message is not None:
            raise EmptyEpochError(self.empty_epoch_message)

    def mark_consumed(self) -> None:
        """The consumer took the oldest batch handed out and not yet taken."""
        if self._handed_out:
            self._consumed = self._handed_out.popleft()

    def shutdown(self) -> None:
        """Stop this loader's workers now (the next pass starts new ones)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            _stop(iterator._workers)

    def state_dict(self) -> dict[str, Any]:
        rank, world_size = rank_and_world_size()
        batches, state = self._consumed or (self.batches_this_pass, super().state_dict())
        mine = {"loader": state, "batches": batches}
        ranks: list[Any] = [mine]
        if world_size > 1:  # every rank saves at the same step, so all of them are here to gather
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"world_size": world_size, "num_workers": self.num_workers, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world_size = rank_and_world_size()
        saved = (state_dict.get("world_size"), state_dict.get("num_workers"))
        if saved != (world_size, self.num_workers):
            warnings.warn(f"the checkpoint's data position is for world_size={saved[0]}, num_workers={saved[1]}; "
                          f"this run has {world_size}, {self.num_workers}: the epoch restarts from its beginning",
                          stacklevel=2)
            return
        mine = state_dict["ranks"][rank]
        # A pass saved at its last batch is over, whether or not the loader had been asked past
        # it (the consumed state after the last batch was taken before that): the next pass is
        # the next epoch.
        finished = bool(mine["loader"].get("_iterator_finished")) or mine["batches"] >= self.dataset.batches_per_pass
        self._resumed_batches = 0 if finished else mine["batches"]
        super().load_state_dict(dict(mine["loader"], _iterator_finished=finished))


def _stop(workers: list[Any], timeout: float = 60) -> None:
    """Wait for workers that were asked to stop; SIGKILL the ones still running after `timeout`."""
    for worker in workers:
        worker.join(timeout)
        if worker.is_alive():
            worker.kill()
            worker.join()


@atexit.register
def _shut_down_at_exit() -> None:
    # Registered after multiprocessing's and torch's exit handlers, so it runs before them.
    for loader in list(_LIVE_LOADERS):
        loader.shutdown()
    _stop(list(_WORKERS), timeout=5)  # workers of loaders someone else (Lightning) shut down
