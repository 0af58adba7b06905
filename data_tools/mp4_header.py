"""The size an mp4 declares (width, height, frame count), read from its `moov` boxes without
decoding a frame, and the decode budget that refuses clips too large to decode.

Opening a video with FFmpeg (PyAV, decord) runs `avformat_find_stream_info`, which may
decode frames already; a clip that declares 8000x8000 would allocate before any check. The
boxes are read here with plain `struct` instead: `tkhd` and the `stsd` sample entry give the
size (the larger of the two is taken), `stsz`/`stz2` the number of frames of the first video
track. What cannot be parsed (not ISO-BMFF, fragmented files without `stsz` counts) gives
None or an unknown frame count, and the caller decides.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# 2^28 pixels: 805 MB of RGB frames, e.g. 129 frames of 1920x1080; 8000x8000 x 16 frames is 4x over.
DEFAULT_MAX_DECODE_PIXELS = 2**28
_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}
_MAX_MOOV_BYTES = 256 * 2**20


@dataclass(frozen=True)
class DeclaredSize:
    width: int
    height: int
    frames: int | None  # None: the header does not say

    def pixels(self, frames: int | None = None) -> int:
        """Pixels of `frames` frames (all declared frames when None; 1 if unknown)."""
        count = frames if frames is not None else self.frames
        return self.width * self.height * max(count or 1, 1)


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of the boxes in `data[start:end]`."""
    end = len(data) if end is None else end
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        header = 8
        if size == 1:
            if position + 16 > end:
                return
            size = struct.unpack(">Q", data[position + 8 : position + 16])[0]
            header = 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            return
        yield kind, position + header, position + size
        position += size


def _read_moov(stream: BinaryIO) -> bytes | None:
    """The payload of the top-level `moov` box (its place in the file does not matter)."""
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return None
        size, kind = struct.unpack(">I4s", head)
        header = 8
        if size == 1:
            size = struct.unpack(">Q", stream.read(8))[0]
            header = 16
        elif size == 0:
            return stream.read(_MAX_MOOV_BYTES) if kind == b"moov" else None
        if size < header:
            return None
        if kind == b"moov":
            return stream.read(min(size - header, _MAX_MOOV_BYTES))
        stream.seek(size - header, io.SEEK_CUR)


def _video_track(data: bytes, start: int, end: int) -> DeclaredSize | None:
    """Width, height and frames of one `trak` payload, if it is a video track."""
    found: dict[str, int] = {}
    is_video = False

    def walk(lo: int, hi: int) -> None:
        nonlocal is_video
        for kind, payload, stop in _boxes(data, lo, hi):
            if kind in _CONTAINER_BOXES:
                walk(payload, stop)
            elif kind == b"hdlr" and stop - payload >= 12:
                is_video = is_video or data[payload + 8 : payload + 12] == b"vide"
            elif kind == b"tkhd" and stop - payload >= 8:
                width, height = struct.unpack(">II", data[stop - 8 : stop])  # 16.16 fixed point
                found["tkhd_w"], found["tkhd_h"] = width >> 16, height >> 16
            elif kind == b"stsd" and stop - payload >= 8 + 8 + 36:
                entry = payload + 8  # version/flags, entry count; then the first sample entry box
                width, height = struct.unpack(">HH", data[entry + 8 + 24 : entry + 8 + 28])
                found["stsd_w"], found["stsd_h"] = width, height
            elif kind in (b"stsz", b"stz2") and stop - payload >= 12:
                found["frames"] = struct.unpack(">I", data[payload + 8 : payload + 12])[0]

    walk(start, end)
    if not is_video:
        return None
    width = max(found.get("tkhd_w", 0), found.get("stsd_w", 0))
    height = max(found.get("tkhd_h", 0), found.get("stsd_h", 0))
    if not width or not height:
        return None
    return DeclaredSize(width, height, found.get("frames") or None)


def declared_size(source: bytes | str | Path) -> DeclaredSize | None:
    """What the first video track of an mp4 (bytes or a path) declares; None when the file is
    not an mp4 this parser understands."""
    try:
        if isinstance(source, (bytes, bytearray)):
            moov = _read_moov(io.BytesIO(source))
        else:
            with open(source, "rb") as stream:
                moov = _read_moov(stream)
    except (OSError, struct.error, OverflowError):
        return None
    if not moov:
        return None
    for kind, payload, stop in _boxes(moov):
        if kind == b"trak":
            track = _video_track(moov, payload, stop)
            if track is not None:
                return track
    return None


def over_budget(size: DeclaredSize, max_pixels: int | None, frames: int | None = None) -> str | None:
    """Why a clip of `size` decoding `frames` frames (all when None) is refused, or None.
    `frames` is capped at the declared count when that is known."""
    if max_pixels is None:
        return None
    if frames is not None and size.frames is not None:
        frames = min(frames, size.frames)
    count = frames if frames is not None else size.frames
    pixels = size.pixels(count)
    if pixels <= max_pixels:
        return None
    shown = f"{count} frames" if count is not None else "an unknown number of frames (counted as 1)"
    return (f"declares {size.width}x{size.height} x {shown} = {pixels:,} pixels to decode, over the "
            f"decode budget of {max_pixels:,} (max_decode_pixels)")
