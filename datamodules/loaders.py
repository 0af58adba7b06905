"""`ShardLoader`: the DataLoader of every shard datamodule. Two things a plain DataLoader gets
wrong in a training run:

* **Signals to the process group.** Ctrl-C, `timeout`, `kill -- -PGID` and SLURM's
  `scancel` signal every process of the job, loader workers included; a worker killed by
  SIGTERM (or one raising KeyboardInterrupt on SIGINT) ends the run before the main process
  can save anything. Workers here ignore SIGINT, SIGTERM and SIGUSR1: the main process
  decides (a checkpoint after the current step, see `experiments/run_callbacks.py`) and
  shuts them down as usual. The signals are blocked in the main process while workers are
  forked, so none arrives in the window before a worker has installed `SIG_IGN`.
* **An epoch with no batch.** An iterable dataset whose pass yields nothing (an empty shard,
  every sample bad) makes Lightning start the next epoch at once, forever. A training loader
  made with `empty_epoch_message` raises `EmptyEpochError` with that message instead (except
  on the first pass after a resume, which may legitimately start at the end of its epoch).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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


class ShardLoader(DataLoader):
    """A DataLoader whose workers ignore stop signals and which refuses an empty training pass
    (`empty_epoch_message`; `resumed`: the first pass may be empty)."""

    def __init__(self, dataset: Any, *args: Any, empty_epoch_message: str | None = None, resumed: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.empty_epoch_message = empty_epoch_message
        self.resumed = resumed
        self._passes = 0

    def _get_iterator(self) -> Any:
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super()._get_iterator()
        init_fn = self.worker_init_fn  # Lightning may have set its seeding function here
        self.worker_init_fn = _IgnoreStopSignals(init_fn)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()  # forks the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.worker_init_fn = init_fn

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        self._passes += 1
        if self.empty_epoch_message is None or (self.resumed and self._passes == 1):
            return iterator
        return self._refusing_empty(iterator)

    def _refusing_empty(self, iterator: Iterator[Any]) -> Iterator[Any]:
        empty = True
        for batch in iterator:
            empty = False
            yield batch
        if empty:
            raise EmptyEpochError(self.empty_epoch_message)
