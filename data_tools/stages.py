"""The clip record and the stage runner every curation step plugs into.

A stage is a picklable callable `ClipRecord -> ClipRecord | None` (a module-level function
or a `functools.partial` of one). It returns the record, possibly changed (`dataclasses.replace`),
or marks it `status="dropped"` / `"failed"` with a `reason`; returning None means dropped.
An exception inside a stage fails that record only. Later stages (cut detection, filters,
dedup, captioning) slot into the same list; the sharding run is
list inputs -> `run_stages` -> write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

OK, DROPPED, FAILED = "ok", "dropped", "failed"


@dataclass
class ClipRecord:
    key: str  # the sample key in the shard (no dots: webdataset splits keys at the first dot)
    source: str  # path of the input media file
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # goes to the sample's json
    data: bytes | None = None  # media bytes when a stage produced new ones; else read `source`
    ext: str = "mp4"  # the sample member holding the media: "mp4", "jpg", "png"
    status: str = OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def media_bytes(self) -> bytes:
        return self.data if self.data is not None else Path(self.source).read_bytes()


Stage = Callable[[ClipRecord], "ClipRecord | None"]


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _stage_name(stage: Stage) -> str:
    inner = stage.func if isinstance(stage, partial) else stage
    return getattr(inner, "__name__", type(inner).__name__)


def apply_stages(record: ClipRecord, stages: Sequence[Stage]) -> ClipRecord:
    """Run `stages` in order on one record, stopping at the first that drops or fails it."""
    for stage in stages:
        if not record.ok:
            break
        try:
            result = stage(record)
        except Exception as error:  # noqa: BLE001 - one bad clip must not stop the run
            return replace(record, status=FAILED, reason=f"{_stage_name(stage)}: {type(error).__name__}: {error}")
        record = result if result is not None else replace(record, status=DROPPED, reason=f"dropped by {_stage_name(stage)}")
    return record


def run_stages(
    records: Iterable[ClipRecord], stages: Sequence[Stage], workers: int | None = None, chunksize: int = 8
) -> Iterator[ClipRecord]:
    """Map `stages` over `records`, yielding results in input order (so shards are
    deterministic). Uses a process pool when `workers > 1`, in-process otherwise."""
    workers = default_workers() if workers is None else workers
    run_one = partial(apply_stages, stages=tuple(stages))
    if workers <= 1:
        yield from map(run_one, records)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(run_one, records, chunksize=chunksize)
