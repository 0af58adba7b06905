"""The per-sample stages of `effvid-data shard`: probe the media, attach the caption and meta
sidecars, and (images) re-encode and fingerprint them the way img2dataset does. Each takes a
`ClipRecord` and returns it updated, or marked FAILED with the reason."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS, declared_size, over_budget
from data_tools.probe import ProbeError, probe_image, probe_video
from data_tools.stages import FAILED, ClipRecord, Stage


def probe_video_stage(record: ClipRecord, max_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS) -> ClipRecord:
    """Decode the clip; record frames, fps, size, duration and codec, or fail with the reason.
    A clip whose mp4 header declares more than `max_pixels` pixels (width x height x frames)
    fails before any frame is decoded: training would have to decode it."""
    declared = declared_size(record.data if record.data is not None else record.source)
    if declared is not None and (problem := over_budget(declared, max_pixels)) is not None:
        return replace(record, status=FAILED, reason=f"too large: {problem}")
    try:
        probe = probe_video(record.source, record.data)
    except ProbeError as error:
        return replace(record, status=FAILED, reason=error.reason)
    fields = probe.to_dict()
    fields.pop("path")
    return replace(record, meta={**record.meta, **fields})


def probe_image_stage(record: ClipRecord) -> ClipRecord:
    """Decode the image; record width and height, or fail with the reason."""
    try:
        probe = probe_image(record.source)
    except ProbeError as error:
        return replace(record, status=FAILED, reason=error.reason)
    return replace(record, meta={**record.meta, "width": probe.width, "height": probe.height})


def read_sidecars(record: ClipRecord) -> ClipRecord:
    """Attach `NAME.txt` as the caption and `NAME.json` as meta; probe fields already in the
    meta win over the sidecar's. A missing caption becomes "" with `caption_missing: true`."""
    source = Path(record.source)
    caption_path, meta_path = source.with_suffix(".txt"), source.with_suffix(".json")
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return replace(record, status=FAILED, reason=f"unreadable sidecar {meta_path.name}: {error}")
        if not isinstance(meta, dict):
            return replace(record, status=FAILED, reason=f"sidecar {meta_path.name} is not a JSON object")
    if caption_path.exists():
        caption = caption_path.read_text(encoding="utf-8").strip()
    else:
        caption, meta["caption_missing"] = "", True
    return replace(record, caption=caption, meta={**meta, **record.meta})


def reencode_jpeg(record: ClipRecord, quality: int = 95) -> ClipRecord:
    """Re-encode a non-JPEG image as JPEG (img2dataset's default output format), keeping the
    original format in the meta."""
    if record.ext == "jpg":
        return record
    from PIL import Image

    with Image.open(io.BytesIO(record.media_bytes())) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    meta = {**record.meta, "original_format": record.ext}
    return replace(record, data=buffer.getvalue(), ext="jpg", meta=meta)


def fingerprint_image(record: ClipRecord) -> ClipRecord:
    """img2dataset's json fields: sha256 of the stored image bytes and the original width and
    height (equal to width and height: images are never resized here)."""
    data = record.media_bytes()
    meta = {
        **record.meta,
        "sha256": hashlib.sha256(data).hexdigest(),
        "original_width": record.meta.get("width"),
        "original_height": record.meta.get("height"),
    }
    return replace(record, data=data, meta=meta)


VIDEO_STAGES: tuple[Stage, ...] = (probe_video_stage, read_sidecars)
IMAGE_STAGES: tuple[Stage, ...] = (probe_image_stage, read_sidecars, fingerprint_image)
IMAGE_TO_JPEG_STAGES: tuple[Stage, ...] = (probe_image_stage, read_sidecars, reencode_jpeg, fingerprint_image)
