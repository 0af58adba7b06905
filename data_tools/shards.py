"""Write media + caption + meta folders into WebDataset tar shards (video2dataset / img2dataset
layout: `KEY.mp4` or `KEY.jpg`/`KEY.png`, `KEY.txt`, `KEY.json`), resumably.

Inputs are sorted and cut into chunks of `shard_size`: shard i always holds the inputs
i*shard_size .. (i+1)*shard_size-1 (minus the ones that fail), so a re-run after a crash
neither duplicates nor loses a sample. Each tar is written as `shard-NNNNNN.tar.tmp` and
renamed when complete; its manifest `shard-NNNNNN.manifest.json` is written after that, so
"tar and manifest present, manifest lists the same sources" means the shard is done.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from data_tools.atomic_files import STORAGE_ERRNOS, write_atomic, write_error
from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS
from data_tools.shard_stages import IMAGE_STAGES, IMAGE_TO_JPEG_STAGES, VIDEO_STAGES, probe_video_stage
from data_tools.stages import DROPPED, FAILED, ClipRecord, Stage, run_stages

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
STATS_NAME = "_stats.json"
_SHARD_FILE = re.compile(r"^shard-(\d{6})(_\d{2,})?\.(tar|manifest\.json)$")
# Fixed member mtime: the same inputs give byte-identical tars.
TAR_MTIME = 0


class ShardInputError(ValueError):
    """The input folder is missing, empty, or holds clashing keys."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def part_name(index: int, part: int) -> str:
    """Tar `part` of shard `index`: the shard's own name, then `shard-NNNNNN_01`, ... when a
    shard rolls over at its sample or byte limit."""
    return shard_name(index) if part == 0 else f"{shard_name(index)}_{part:02d}"


def list_inputs(input_dir: str | Path, suffixes: Sequence[str]) -> list[Path]:
    """The media files directly in `input_dir` with one of `suffixes`, sorted by name."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ShardInputError(f"input directory {input_dir} does not exist or is not a directory")
    inputs = sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not inputs:
        raise ShardInputError(f"no {'/'.join(s.lstrip('.') for s in suffixes)} files in {input_dir}")
    return inputs


def sample_key(path: Path) -> str:
    # webdataset splits "KEY.ext" at the first dot, so a key must not contain one.
    return path.stem.replace(".", "_")


def plan_shards(inputs: Sequence[Path], shard_size: int) -> list[list[Path]]:
    """Consecutive chunks of `shard_size` sorted inputs: the shard of an input never depends
    on which other inputs fail."""
    if shard_size < 1:
        raise ShardInputError(f"shard size must be at least 1, got {shard_size}")
    return [list(inputs[i : i + shard_size]) for i in range(0, len(inputs), shard_size)]


# --- writing ----------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _finished_manifest(out_dir: Path, index: int, sources: list[str]) -> dict[str, Any] | None:
    """The manifest of shard `index` if that shard is complete and holds exactly `sources`."""
    manifest = _read_manifest(out_dir / f"{shard_name(index)}.manifest.json")
    if manifest is None or manifest.get("sources") != sources:
        return None
    parts = manifest.get("parts") or [{"tar": f"{shard_name(index)}.tar", "bytes": manifest.get("bytes")}]
    for part in parts:
        tar = out_dir / part["tar"]
        if not tar.is_file() or tar.stat().st_size != part["bytes"]:
            return None
    return manifest


def _remove_stale_files(out_dir: Path, num_shards: int, rewrite: Collection[int] = ()) -> list[str]:
    """Delete leftover `.tmp` files of an interrupted run, shards past the end of the current
    plan (the input folder shrank) and every file of the shards in `rewrite`, so the folder
    holds only current shards."""
    removed = []
    for path in sorted(out_dir.iterdir()):
        match = _SHARD_FILE.match(path.name)
        stale_shard = match is not None and (int(match.group(1)) >= num_shards or int(match.group(1)) in rewrite)
        if (path.name.startswith("shard-") and path.name.endswith(".tmp")) or stale_shard:
            path.unlink()
            removed.append(path.name)
    return removed


def _sample(record: ClipRecord) -> dict[str, Any]:
    meta = {**record.meta, "key": record.key, "source": record.source, "status": record.status}
    return {
        "__key__": record.key,
        record.ext: record.media_bytes(),
        "txt": record.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _report(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # keeps the progress bar intact


class _PartWriter:
    """The tar parts of one shard: each written as `NAME.tar.tmp` and renamed when full or
    when the shard ends."""

    def __init__(self, out_dir: Path, index: int, max_samples: int | None, max_bytes: int | None) -> None:
        self.out_dir, self.index = out_dir, index
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.parts: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        import webdataset as wds

        self.name = f"{part_name(self.index, len(self.parts))}.tar"
        self.tmp = self.out_dir / f"{self.name}.tmp"
        self.stream = open(self.tmp, "wb")  # noqa: SIM115 - closed in _finish / abort (TarWriter leaves it open)
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=TAR_MTIME)
        self.count = 0

    def _finish(self) -> None:
        self.writer.close()
        self.stream.close()
        self.tmp.replace(self.out_dir / self.name)
        self.parts.append({"tar": self.name, "bytes": (self.out_dir / self.name).stat().st_size, "num_samples": self.count})

    def write(self, sample: dict[str, Any]) -> None:
        full = (self.max_samples is not None and self.count >= self.max_samples) or (
            self.max_bytes is not None and self.stream.tell() >= self.max_bytes)
        if full and self.count:
            self._finish()
            self._open()
        self.writer.write(sample)
        self.count += 1

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.parts

    def abort(self) -> None:
        for close in (self.writer.close, self.stream.close):
            try:
                close()
            except OSError:  # e.g. flushing onto a full disk: the file is removed anyway
                pass
        self.tmp.unlink(missing_ok=True)


class SampleGate(Protocol):
    """A check that needs every earlier sample of the run (deduplication). It runs in the
    writing process, over records in input order, and is restored from finished shards."""

    def restore(self, manifest: dict[str, Any]) -> None: ...

    def __call__(self, record: ClipRecord) -> ClipRecord: ...

    def manifest_fields(self, written: list[ClipRecord]) -> dict[str, Any]: ...


def _input_entry(source: str, records: list[ClipRecord], written: int) -> dict[str, Any]:
    """One input's line in the manifest: ok when it gave a sample, else why not (a failure,
    or the last drop: clip-level drops come after scene-level ones)."""
    if written:
        return {"path": source, "status": "ok", "samples": written, "reason": ""}
    problem = next((r for r in records if r.status == FAILED), None) or next((r for r in reversed(records) if not r.ok), None)
    status = problem.status if problem is not None else DROPPED
    return {"path": source, "status": status, "samples": 0, "reason": problem.reason if problem else "no samples"}


def _reason_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """How many samples each stage dropped: reasons read "stage: detail"."""
    counts: dict[str, int] = {}
    for entry in entries:
        stage = entry["reason"].split(":", 1)[0] if ":" in entry["reason"] else entry["reason"]
        counts[stage] = counts.get(stage, 0) + 1
    return dict(sorted(counts.items()))


def write_planned_shards(
    plan: Sequence[Sequence[str]],
    out_dir: str | Path,
    process: Callable[[list[int]], Iterator[list[ClipRecord]]],
    gate: SampleGate | None = None,
    progress: bool = True,
    extra_stats: dict[str, Any] | None = None,
    max_samples: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Write shard i from the records of the inputs `plan[i]` (their sources), skipping
    shards already complete. `process(pending)` yields, for every input of the pending shards
    in order, the list of records it gave (one for a file packed as is, any number for a video
    cut into clips). Records that pass `gate` are written; the rest are listed with their
    reasons. A shard's tar rolls over to `shard-NNNNNN_01.tar`, ... after `max_samples`
    samples or `max_bytes` bytes. Returns the totals also saved as `_stats.json`."""
    from tqdm import tqdm

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sources = [list(chunk) for chunk in plan]
    manifests: dict[int, dict[str, Any]] = {}
    pending = []
    for index, chunk_sources in enumerate(sources):
        manifest = _finished_manifest(out_dir, index, chunk_sources)
        if manifest is not None:
            manifests[index] = manifest
        else:
            pending.append(index)
    # A shard being rewritten must never look finished next to its old manifest, nor keep
    # parts of an earlier attempt.
    _remove_stale_files(out_dir, len(plan), rewrite=set(pending))
    if gate is not None:
        for index in sorted(manifests):
            if index < (pending[0] if pending else len(plan)):
                gate.restore(manifests[index])

    results = process(pending)
    bar = tqdm(total=sum(len(plan[i]) for i in pending), desc="inputs", unit="input", disable=not progress)
    total_written = 0
    try:
        for position, index in enumerate(pending):
            if gate is not None and position > 0:
                # Finished shards after a rewritten one come later in input order.
                for done in range(pending[position - 1] + 1, index):
                    gate.restore(manifests[done])
            written: list[ClipRecord] = []
            failed, dropped, inputs = [], [], []
            tars = _PartWriter(out_dir, index, max_samples, max_bytes)
            try:
                for source in sources[index]:
                    records = []
                    input_written = 0
                    for record in next(results):
                        if record.ok and gate is not None:
                            record = gate(record)
                        if record.ok:
                            try:
                                sample = _sample(record)
                            except OSError as error:  # vanished or unreadable since it was probed
                                record = replace(record, status=FAILED, reason=f"cannot read: {error.strerror or error}")
                            else:
                                tars.write(sample)
                                written.append(record)
                                records.append(record)
                                input_written += 1
                                continue
                        records.append(record)
                        entry = {"path": record.source, "key": record.key, "reason": record.reason}
                        (dropped if record.status == DROPPED else failed).append(entry)
                        if record.status != DROPPED:
                            _report(f"effvid-data: skipped {record.source}: {record.reason}")
                    inputs.append(_input_entry(source, records, input_written))
                    total_written += input_written
                    bar.update()
                    rate = total_written / max(bar.format_dict["elapsed"], 1e-6)
                    bar.set_postfix(samples=total_written, samples_per_s=f"{rate:.2f}", refresh=False)
                parts = tars.close()
            except BaseException as error:
                tars.abort()  # never leave a half-written shard behind
                if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
                    raise write_error(error, out_dir / tars.name) from error
                raise
            manifest = {
                "shard": parts[0]["tar"],
                "num_samples": len(written),
                "keys": [r.key for r in written],
                "sources": sources[index],
                "inputs": inputs,
                "failed": failed,
                "dropped": dropped,
                "bytes": sum(part["bytes"] for part in parts),
                "parts": parts,
                **(gate.manifest_fields(written) if gate is not None else {}),
            }
            _write_json_atomic(out_dir / f"{shard_name(index)}.manifest.json", manifest)
            manifests[index] = manifest
    finally:
        bar.close()  # before any error message, which would otherwise share its line

    ordered = [manifests[i] for i in range(len(plan))]
    failed_entries = [entry for m in ordered for entry in m.get("failed", [])]
    dropped_entries = [entry for m in ordered for entry in m.get("dropped", [])]
    input_entries = [entry for m in ordered for entry in m.get("inputs", [])]
    stats = {
        "inputs": sum(len(chunk) for chunk in sources),
        "inputs_failed": sum(e["status"] == FAILED for e in input_entries),
        "inputs_without_samples": sum(e["status"] == DROPPED for e in input_entries),
        "written": sum(m["num_samples"] for m in ordered),
        "failed": len(failed_entries),
        "failed_paths": sorted({entry["path"] for entry in failed_entries}),
        "dropped": len(dropped_entries),
        "dropped_by": _reason_counts(dropped_entries),
        "failed_by": _reason_counts(failed_entries),
        "shards": len(plan),
        "shards_written": len(pending),
        "shards_skipped": len(plan) - len(pending),
        **(extra_stats or {}),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_json_atomic(out_dir / STATS_NAME, stats)
    return stats


def write_shards(
    inputs: Sequence[Path],
    out_dir: str | Path,
    make_record: Callable[[Path], ClipRecord],
    stages: Sequence[Stage],
    shard_size: int = 256,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `stages` over `inputs` (one sample each) and write the records that pass into tar
    shards in `out_dir`, skipping shards already complete."""
    plan = plan_shards(inputs, shard_size)
    keys = [sample_key(p) for p in inputs]
    if len(set(keys)) != len(keys):
        clash = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ShardInputError(f"inputs share sample keys {clash}: rename the files so their stems differ")

    def process(pending: list[int]) -> Iterator[list[ClipRecord]]:
        records = (make_record(path) for index in pending for path in plan[index])
        return ([record] for record in run_stages(records, stages, workers=workers))

    sources = [[str(p.resolve()) for p in chunk] for chunk in plan]
    return write_planned_shards(sources, out_dir, process, progress=progress, extra_stats={"shard_size": shard_size})


def video_record(path: Path) -> ClipRecord:
    return ClipRecord(key=sample_key(path), source=str(path.resolve()), ext="mp4")


def image_record(path: Path) -> ClipRecord:
    # img2dataset names JPEG members "jpg" whatever the file's spelling.
    ext = "png" if path.suffix.lower() == ".png" else "jpg"
    return ClipRecord(key=sample_key(path), source=str(path.resolve()), ext=ext)


def shard_videos(
    input_dir: str | Path, out_dir: str | Path, shard_size: int = 256, workers: int | None = None, progress: bool = True,
    max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
) -> dict[str, Any]:
    """Shard every `*.mp4` in `input_dir` (with `.txt` / `.json` sidecars) into `out_dir`; a clip
    declaring more than `max_decode_pixels` pixels is refused (listed as failed)."""
    inputs = list_inputs(input_dir, VIDEO_SUFFIXES)
    stages = (functools.partial(probe_video_stage, max_pixels=max_decode_pixels), *VIDEO_STAGES[1:])
    return write_shards(inputs, out_dir, video_record, stages, shard_size, workers, progress)


def shard_images(
    input_dir: str | Path, out_dir: str | Path, shard_size: int = 256, workers: int | None = None, progress: bool = True,
    image_format: str = "keep",
) -> dict[str, Any]:
    """Shard every `*.jpg` / `*.jpeg` / `*.png` in `input_dir` (with sidecars) into `out_dir`;
    `image_format="jpg"` re-encodes PNGs as JPEG like img2dataset, "keep" stores the bytes."""
    if image_format not in ("keep", "jpg"):
        raise ShardInputError(f"image_format must be 'keep' or 'jpg', got {image_format!r}")
    inputs = list_inputs(input_dir, IMAGE_SUFFIXES)
    stages = IMAGE_TO_JPEG_STAGES if image_format == "jpg" else IMAGE_STAGES
    return write_shards(inputs, out_dir, image_record, stages, shard_size, workers, progress)
