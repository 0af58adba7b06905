"""`effvid-data curate`: raw videos -> scene-cut, filtered, deduplicated clip shards.

Per input (in a worker): caption -> probe + cut detection (one decode) -> clip plan ->
extraction (second decode) -> re-encode -> scores and bounds. In the writing process, in
input order: near-duplicate removal, then the shard writer of `data_tools.shards`
(atomic tars, per-shard manifests, `_stats.json`), then `manifest.jsonl` (every input with
its status and reason) and the run summary. Shard i holds the clips of inputs
i*N .. (i+1)*N-1, so a re-run after a crash rewrites only unfinished shards and the result
holds the same clips as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.atomic_files import write_atomic
from data_tools.captions import CaptionError, read_sidecar_caption, read_table, table_captions
from data_tools.clips import ClipSpan, extract_clips, output_size, plan_clips
from data_tools.curation_config import CurationConfig, config_to_dict
from data_tools.dedup import PerceptualDedup
from data_tools.executors import map_ordered
from data_tools.filters import bounds_violation, opencv_scores
from data_tools.mp4_header import DeclaredSize, declared_size, over_budget
from data_tools.probe import ProbeError
from data_tools.scenes import VideoScan, scan_video
from data_tools.shards import ShardInputError, write_planned_shards
from data_tools.stages import DROPPED, FAILED, ClipRecord
from data_tools.video_io import encode_mp4

VIDEO_INPUT_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
TABLE_SUFFIXES = (".csv", ".parquet")
MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class CurateInput:
    index: int  # position in the input list: clip keys are "{index:08d}_{clip:03d}"
    path: str
    caption: str | None = None  # from a caption table; None: read per `captions.source`
    from_table: bool = False

    @property
    def key(self) -> str:
        return f"{self.index:08d}"


def list_curation_inputs(spec: str | Path, config: CurationConfig) -> list[CurateInput]:
    """Inputs from a folder (videos found recursively, sorted), one video file, a text file
    of paths (one a line, relative to the file), or a CSV/parquet table with a path column.
    Listed paths that do not exist stay in the list and are reported as failed."""
    spec = Path(spec)
    captions = config.captions
    if spec.is_dir():
        paths = sorted(str(p.resolve()) for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_INPUT_SUFFIXES)
        if not paths:
            raise ShardInputError(f"no video files ({', '.join(VIDEO_INPUT_SUFFIXES)}) under {spec}")
    elif not spec.exists():
        raise ShardInputError(f"input {spec} does not exist")
    elif spec.suffix.lower() in VIDEO_INPUT_SUFFIXES:
        paths = [str(spec.resolve())]
    elif spec.suffix.lower() in TABLE_SUFFIXES:
        try:
            rows = read_table(spec, [captions.path_column])
        except CaptionError as error:
            raise ShardInputError(str(error)) from error
        paths = [str((spec.parent / row[captions.path_column]).resolve()) for row in rows if row[captions.path_column]]
    else:
        try:
            lines = spec.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ShardInputError(f"input list {spec} is not UTF-8 text (byte {error.start}: "
                                  f"{error.object[error.start:error.start + 1]!r}); save it as UTF-8") from None
        paths = [str((spec.parent / line.strip()).resolve()) for line in lines if line.strip() and not line.startswith("#")]
    if not paths:
        raise ShardInputError(f"input list {spec} names no videos")

    by_path: dict[str, str | None] = {}
    if captions.source == "table":
        try:
            by_path = table_captions(captions)
        except CaptionError as error:
            raise ShardInputError(str(error)) from error
    return [
        CurateInput(i, path, by_path.get(path), from_table=captions.source == "table")
        for i, path in enumerate(paths)
    ]


def _caption(item: CurateInput, config: CurationConfig) -> str | None:
    if config.captions.source == "none":
        return None
    if item.from_table:
        return item.caption
    return read_sidecar_caption(item.path)


def _clip_meta(scan: VideoScan, span: ClipSpan, clip: int, frames: np.ndarray, fps: float) -> dict[str, Any]:
    probe = scan.probe
    return {
        "clip": {
            "index": clip,
            "start_frame": span.start,
            "end_frame": span.end,
            "start_time": round(span.start_time, 6),
            "end_time": round(span.end_time, 6),
        },
        "source_video": {
            "num_frames": probe.num_frames, "fps": probe.fps, "width": probe.width, "height": probe.height,
            "duration": probe.duration, "codec": probe.codec, "cuts": list(scan.cuts),
        },
        "num_frames": int(len(frames)),
        "fps": fps,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "duration": round(len(frames) / fps, 6),
    }


def _filter_reason(scores: dict[str, Any], config: CurationConfig) -> str | None:
    filters = config.filters
    for name, bounds in (
        ("motion", filters.motion), ("brightness", filters.brightness), ("sharpness", filters.sharpness),
        ("text_area", filters.text_area), ("clip_similarity", config.clip_score.similarity),
        ("aesthetic", config.clip_score.aesthetic),
    ):
        reason = bounds_violation(name, scores.get(name), bounds)
        if reason:
            return reason
    return None


def _over_decode_budget(path: str, config: CurationConfig) -> str | None:
    """Why an input is too large to decode, from its mp4 header: one source frame, or one
    clip at output size and rate, over `clips.max_decode_pixels`. Other containers pass."""
    clips = config.clips
    declared = declared_size(path) if Path(path).suffix.lower() in (".mp4", ".m4v", ".mov") else None
    if declared is None or clips.max_decode_pixels is None:
        return None
    if (problem := over_budget(declared, clips.max_decode_pixels, frames=1)) is not None:
        return f"{problem} for one frame (clips.max_decode_pixels)"
    width, height = output_size(declared.width, declared.height, clips.short_side)
    frames = math.ceil(clips.max_seconds * clips.fps) if clips.fps is not None else declared.frames
    clip = DeclaredSize(width, height, frames)
    if (problem := over_budget(clip, clips.max_decode_pixels)) is not None:
        return f"a clip of it at output size {problem.removeprefix('declares ')} (clips.max_decode_pixels)"
    return None


def process_input(item: CurateInput, config: CurationConfig) -> list[ClipRecord]:
    """All clip records of one input video: kept ones with their mp4 bytes, dropped ones with
    the reason. A broken input gives one failed record naming the cause."""
    try:
        caption = _caption(item, config)
    except CaptionError as error:
        return [ClipRecord(key=item.key, source=item.path, status=FAILED, reason=f"caption: {error}")]
    if (problem := _over_decode_budget(item.path, config)) is not None:
        return [ClipRecord(key=item.key, source=item.path, status=FAILED, reason=f"too large: {problem}")]
    try:
        scan = scan_video(item.path, config.cuts)
    except ProbeError as error:
        return [ClipRecord(key=item.key, source=item.path, status=FAILED, reason=f"probe: {error.reason}")]
    spans, skipped = plan_clips(scan, config.clips)
    # Scenes (or remainders) outside the duration bounds are listed as drops of this input.
    records = [ClipRecord(key=item.key, source=item.path, status=DROPPED, reason=f"clips: {reason}") for reason in skipped]
    if not spans:
        return records or [ClipRecord(key=item.key, source=item.path, status=DROPPED, reason="clips: no clip")]

    fps = config.clips.fps if config.clips.fps is not None else scan.probe.fps
    scorer = None
    if config.clip_score.model:
        from data_tools.clip_scores import clip_scorer

        scorer = clip_scorer(config.clip_score)
    try:
        for clip, (span, frames) in enumerate(zip(spans, extract_clips(item.path, scan, spans, config.clips))):
            key = f"{item.key}_{clip:03d}"
            meta = _clip_meta(scan, span, clip, frames, fps)
            scores = opencv_scores(frames, config.filters)
            meta["phash"] = scores.pop("phash")
            if scorer is not None:
                scores.update(scorer.score(frames, caption or ""))
            meta["scores"] = scores
            meta["caption_missing"] = caption is None or caption == ""
            record = ClipRecord(key=key, source=item.path, caption=caption or "", meta=meta)
            reason = _filter_reason(scores, config)
            if reason is not None:
                records.append(ClipRecord(key=key, source=item.path, meta=meta, status=DROPPED, reason=reason))
                continue
            records.append(replace(record, data=encode_mp4(frames, fps=fps, crf=config.clips.crf, preset=config.clips.preset)))
    except Exception as error:  # noqa: BLE001 - a video that breaks mid-way fails alone
        message = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return [*records, ClipRecord(key=item.key, source=item.path, status=FAILED, reason=f"extract: {message}")]
    return records


def process_chunk(items: list[CurateInput], config: CurationConfig) -> list[list[ClipRecord]]:
    """The per-shard task (what `--executor ray` ships to a cluster worker)."""
    return [process_input(item, config) for item in items]


def plan_notes(config: CurationConfig) -> list[str]:
    """What this config will not score, and why (goes into the summary)."""
    notes = []
    if not config.clip_score.model:
        notes.append("clip_similarity and aesthetic: skipped (no open_clip weights named; set clip_score.model and clip_score.pretrained)")
    elif config.clip_score.pretrained is None:
        notes.append(f"clip scores use a randomly initialised {config.clip_score.model} (no clip_score.pretrained): not meaningful")
    if config.clip_score.model and config.clip_score.aesthetic_head is None:
        notes.append("aesthetic: skipped (no clip_score.aesthetic_head)")
    if config.filters.ocr:
        notes.append("text_area: skipped (OCR scoring is not available in this version)")
    if not config.dedup.enabled:
        notes.append("dedup: disabled")
    return notes


def _write_input_manifest(out_dir: Path) -> int:
    """`manifest.jsonl`: every input of every shard with its status, reason and sample count."""
    lines = []
    for manifest_path in sorted(out_dir.glob("shard-*.manifest.json")):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        for entry in manifest.get("inputs", []):
            lines.append(json.dumps({**entry, "shard": manifest["shard"]}, sort_keys=True))
    write_atomic(out_dir / MANIFEST_NAME, "".join(line + "\n" for line in lines))
    return len(lines)


def curate(
    input_spec: str | Path,
    out_dir: str | Path,
    config: CurationConfig,
    workers: int = 1,
    executor: str = "local",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole curation into `out_dir`; returns the run summary (also `_stats.json`)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    items = list_curation_inputs(input_spec, config)
    size = config.inputs_per_shard
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    plan = [[item.path for item in chunk] for chunk in chunks]

    def process(pending: list[int]) -> Iterator[list[ClipRecord]]:
        if executor == "ray":  # one task per shard: few, large tasks suit a cluster
            results = map_ordered(process_chunk, [chunks[i] for i in pending], config, workers=workers, executor="ray")
            return (records for chunk in results for records in chunk)
        # One task per input locally: even load over few cores and a live progress bar.
        todo = [item for i in pending for item in chunks[i]]
        return map_ordered(process_input, todo, config, workers=workers, executor="local")

    gate = PerceptualDedup(config.dedup.max_distance) if config.dedup.enabled else None
    width_height = "source size" if config.clips.short_side is None else f"short side {config.clips.short_side}"
    stats = write_planned_shards(
        plan, out_dir, process, gate=gate, progress=progress,
        max_samples=config.shard_max_samples, max_bytes=config.shard_max_bytes,
        extra_stats={
            "notes": plan_notes(config),
            "output": f"{config.clips.fps or 'source'} fps, {width_height}",
            "inputs_per_shard": size,
            "executor": executor,
            "workers": workers,
        },
    )
    stats["manifest_lines"] = _write_input_manifest(out_dir)
    stats["config"] = config_to_dict(config)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    write_atomic(out_dir / "_stats.json", json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

