"""Ordered parallel map for the curation tasks: a local process pool, or Ray.

Both yield results in task order (the shard writer consumes them in input order) and keep
only a bounded window of tasks in flight, so memory stays flat on long input lists.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
EXECUTORS = ("local", "ray")


def _local(fn: Callable[[Item, Any], Result], items: Sequence[Item], context: Any, workers: int) -> Iterator[Result]:
    if workers <= 1:
        for item in items:
            yield fn(item, context)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item, context))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _ray(fn: Callable[[Item, Any], Result], items: Sequence[Item], context: Any, workers: int) -> Iterator[Result]:
    try:
        import ray
    except ImportError as error:
        raise RuntimeError("--executor ray needs Ray: pip install 'effvid[ray]'") from error
    if not ray.is_initialized():
        # Joins the cluster named by RAY_ADDRESS when set, else starts a local one.
        ray.init(num_cpus=None if workers <= 1 else workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(fn)
    shared = ray.put(context)
    window: deque = deque()
    limit = 2 * max(workers, int(ray.cluster_resources().get("CPU", 1)))
    for item in items:
        window.append(remote.remote(item, shared))
        if len(window) >= limit:
            yield ray.get(window.popleft())
    while window:
        yield ray.get(window.popleft())


def map_ordered(
    fn: Callable[[Item, Any], Result], items: Sequence[Item], context: Any, workers: int = 1, executor: str = "local"
) -> Iterator[Result]:
    """`fn(item, context)` for each item, in order, on `executor` ("local" or "ray")."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {'/'.join(EXECUTORS)}, got {executor!r}")
    return (_ray if executor == "ray" else _local)(fn, items, context, workers)
