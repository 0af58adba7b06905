"""Near-duplicate removal across the whole run by perceptual hashes of clip keyframes.

Runs in the writing process, over clips in input order, so the first of a group of
duplicates is kept whatever the number of workers. The hashes of written clips are saved in
each shard manifest and restored on a resumed run, which therefore drops exactly the clips an
uninterrupted run drops.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from data_tools.stages import DROPPED, ClipRecord


def _as_hashes(hex_hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


class PerceptualDedup:
    """Drops a clip whose every keyframe hash is within `max_distance` bits of the
    corresponding keyframe hash of a clip already kept."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self._buffer = np.zeros((1024, 3), dtype=np.uint64)  # grows by doubling
        self._kept_keys: list[str] = []

    @property
    def _kept(self) -> np.ndarray:
        return self._buffer[: len(self._kept_keys)]  # (N, 3) keyframe hashes

    def _add(self, key: str, hashes: np.ndarray) -> None:
        if len(self._kept_keys) == len(self._buffer):
            self._buffer = np.concatenate([self._buffer, np.zeros_like(self._buffer)])
        self._buffer[len(self._kept_keys)] = hashes
        self._kept_keys.append(key)

    def restore(self, manifest: dict[str, Any]) -> None:
        """Take in the clips of a shard finished by an earlier run."""
        for key, hex_hashes in manifest.get("phash", {}).items():
            self._add(key, _as_hashes(hex_hashes))

    def __call__(self, record: ClipRecord) -> ClipRecord:
        hex_hashes = record.meta.get("phash")
        if not hex_hashes:
            return record
        hashes = _as_hashes(hex_hashes)
        if len(self._kept):
            distance = np.bitwise_count(self._kept ^ hashes[None]).max(axis=1)  # (N,)
            match = int(np.argmin(distance))
            if distance[match] <= self.max_distance:
                return replace(
                    record, status=DROPPED, data=None,
                    reason=f"dedup: near-duplicate of {self._kept_keys[match]} ({int(distance[match])} bits)",
                )
        self._add(record.key, hashes)
        return record

    def manifest_fields(self, written: list[ClipRecord]) -> dict[str, Any]:
        return {"phash": {r.key: r.meta["phash"] for r in written if r.meta.get("phash")}}
