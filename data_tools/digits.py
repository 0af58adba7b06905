"""The embedded default dataset: handwritten digits (scikit-learn's bundled 8x8 set) moving
in a straight line on a black canvas, captioned "a handwritten 7 moving up-left".

Everything is offline and deterministic: a clip is a pure function of (seed, split, index).
The digit never leaves the canvas and never bounces, so its caption is true for every frame.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.atomic_files import write_atomic
from data_tools.video_io import write_mp4

# Unit (dy, dx) in image coordinates: y grows downwards, so "up" is dy = -1.
_DIAGONAL = float(np.sqrt(0.5))
DIRECTIONS: dict[str, tuple[float, float]] = {
    "up": (-1.0, 0.0),
    "down": (1.0, 0.0),
    "left": (0.0, -1.0),
    "right": (0.0, 1.0),
    "up-left": (-_DIAGONAL, -_DIAGONAL),
    "up-right": (-_DIAGONAL, _DIAGONAL),
    "down-left": (_DIAGONAL, -_DIAGONAL),
    "down-right": (_DIAGONAL, _DIAGONAL),
}

SPLITS = ("train", "val")
# Every fifth source image is held out for "val", so the two splits never share a digit
# image, let alone a clip.
_VAL_EVERY = 5
_SOURCE_SIZE = 8  # sklearn's digits are 8x8
_SOURCE_MAX = 16.0  # ... with intensities 0..16


def caption_for(digit: int, direction: str) -> str:
    """The video caption, e.g. ``caption_for(7, "up-left") == "a handwritten 7 moving up-left"``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {list(DIRECTIONS)}")
    return f"a handwritten {int(digit)} moving {direction}"


def image_caption_for(digit: int) -> str:
    """The still-image caption, e.g. ``"a handwritten 7"``."""
    return f"a handwritten {int(digit)}"


@lru_cache(maxsize=1)
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn takes ~1.5 s to import

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # (N, 8, 8), (N,)


def source_indices(split: str = "train") -> np.ndarray:
    """Indices into sklearn's digits that `split` draws from (disjoint between splits)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    indices = np.arange(len(_source_digits()[1]))
    held_out = indices % _VAL_EVERY == 0
    return indices[held_out] if split == "val" else indices[~held_out]


def derived_seed(seed: int, index: int, split: str = "train") -> int:
    """Per-item seed from (seed, split, index): items do not depend on how many are written,
    and the split's stream is independent of the other split's."""
    stream = zlib.crc32(split.encode())  # stable across processes, unlike hash()
    return int(np.random.SeedSequence([int(seed), stream, int(index)]).generate_state(1)[0])


def _render(glyph: np.ndarray, canvas: int, y: float, x: float) -> np.ndarray:
    """Paste `glyph` (S, S) float at sub-pixel top-left (y, x) by bilinear splatting, so slow
    motion is smooth and the total intensity is preserved."""
    size = glyph.shape[0]
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - y0, x - x0
    # One pixel of padding takes the zero-weight overhang when y or x sits on the last row/column.
    padded = np.zeros((canvas + 1, canvas + 1), np.float32)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            if wy * wx > 0:
                padded[y0 + dy : y0 + dy + size, x0 + dx : x0 + dx + size] += wy * wx * glyph
    return padded[:canvas, :canvas]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * (255.0 / _SOURCE_MAX)), 0, 255).astype(np.uint8)


def _pick_source(rng: np.random.Generator, split: str, digit: int | None) -> int:
    pool = source_indices(split)
    if digit is not None:
        pool = pool[_source_digits()[1][pool] == digit]
        if len(pool) == 0:
            raise ValueError(f"digit must be 0..9, got {digit!r}")
    return int(rng.choice(pool))


def make_digit_clip(
    rng: np.random.Generator | int,
    canvas: int = 32,
    num_frames: int = 16,
    digit_scale: int = 2,
    fps: float = 8.0,
    speed_range: tuple[float, float] = (0.5, 1.0),
    split: str = "train",
    digit: int | None = None,
    direction: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One moving-digit clip: uint8 frames `(F, H, W)` (0..255 on black) and its meta.

    `rng` is a Generator or an int seed (recorded in the meta). `digit` / `direction` fix
    the random choice (for tests and prompts). The digit is `8 * digit_scale` pixels wide,
    moves `speed` px/frame along a unit direction, and stays wholly inside the canvas.
    """
    seed = int(rng) if isinstance(rng, (int, np.integer)) else None
    rng = np.random.default_rng(seed) if seed is not None else rng
    digit_size = _SOURCE_SIZE * digit_scale
    room = canvas - digit_size  # the top-left corner may range over [0, room] on each axis
    if room < 0:
        raise ValueError(f"a {digit_size}px digit does not fit a {canvas}px canvas")

    images, targets = _source_digits()
    source_index = _pick_source(rng, split, digit)
    glyph = np.kron(images[source_index], np.ones((digit_scale, digit_scale), np.float32))
    direction = direction if direction is not None else str(rng.choice(list(DIRECTIONS)))
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {list(DIRECTIONS)}")
    unit = np.asarray(DIRECTIONS[direction])
    low, high = speed_range
    speed = float(rng.uniform(low, high))
    # Slow down rather than bounce when the canvas is too small for the whole path.
    max_speed = room / max(num_frames - 1, 1) / float(np.abs(unit).max())
    # Rounded down to 4 decimals so the meta is readable and the path still fits exactly.
    speed = float(np.floor(min(speed, max_speed) * 1e4) / 1e4)
    travel = unit * speed * (num_frames - 1)  # (dy, dx) from first to last frame
    bounds = [(max(0.0, -t), min(room, room - t)) for t in travel]
    start = [float(np.clip(round(rng.uniform(lo, hi), 4), lo, hi)) for lo, hi in bounds]

    frames = np.stack(
        [
            _render(glyph, canvas, start[0] + unit[0] * speed * t, start[1] + unit[1] * speed * t)
            for t in range(num_frames)
        ]
    )  # (F, H, W) in 0..16
    meta = {
        "digit": int(targets[source_index]),
        "direction": direction,
        "speed": speed,
        "start": start,  # top-left (y, x) in pixels at frame 0
        "velocity": [round(float(v) * speed, 6) for v in unit],  # (dy, dx) px/frame
        "source_index": source_index,
        "seed": seed,
        "split": split,
        "canvas": canvas,
        "digit_size": digit_size,
        "num_frames": num_frames,
        "fps": fps,
    }
    return _to_uint8(frames), meta


def make_digit_image(
    rng: np.random.Generator | int,
    canvas: int = 32,
    digit_scale: int = 2,
    split: str = "train",
    digit: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One still digit at a random position: uint8 `(H, W)` and its meta."""
    seed = int(rng) if isinstance(rng, (int, np.integer)) else None
    rng = np.random.default_rng(seed) if seed is not None else rng
    digit_size = _SOURCE_SIZE * digit_scale
    room = canvas - digit_size
    if room < 0:
        raise ValueError(f"a {digit_size}px digit does not fit a {canvas}px canvas")
    images, targets = _source_digits()
    source_index = _pick_source(rng, split, digit)
    glyph = np.kron(images[source_index], np.ones((digit_scale, digit_scale), np.float32))
    position = [int(rng.integers(0, room + 1)) for _ in range(2)]
    meta = {
        "digit": int(targets[source_index]),
        "position": position,  # top-left (y, x)
        "source_index": source_index,
        "seed": seed,
        "split": split,
        "canvas": canvas,
        "digit_size": digit_size,
    }
    return _to_uint8(_render(glyph, canvas, *position)), meta


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, indent=1) + "\n"


def _is_complete(media: Path, caption: Path, meta_path: Path, meta_text: str) -> bool:
    """Written earlier with the same parameters? The json is written last, so its presence
    with identical content means the media and caption are complete too."""
    if not (media.exists() and caption.exists() and meta_path.exists()):
        return False
    return meta_path.read_text(encoding="utf-8") == meta_text


def write_digit_video(
    out_dir: str | Path,
    index: int,
    seed: int = 0,
    canvas: int = 32,
    num_frames: int = 16,
    fps: float = 8.0,
    digit_scale: int = 2,
    split: str = "train",
    crf: int = 10,
) -> Path:
    """Write clip `index` as `{index:06d}.mp4/.txt/.json` unless already there; returns the mp4."""
    out_dir = Path(out_dir)
    frames, meta = make_digit_clip(
        derived_seed(seed, index, split), canvas, num_frames, digit_scale, fps=fps, split=split
    )
    stem = out_dir / f"{index:06d}"
    mp4, txt, meta_path = stem.with_suffix(".mp4"), stem.with_suffix(".txt"), stem.with_suffix(".json")
    meta_text = _meta_json(meta)
    if not _is_complete(mp4, txt, meta_path, meta_text):
        write_mp4(mp4, frames, fps=fps, crf=crf)
        write_atomic(txt, caption_for(meta["digit"], meta["direction"]))
        write_atomic(meta_path, meta_text)
    return mp4


def write_digit_videos(
    out_dir: str | Path,
    num_videos: int,
    seed: int = 0,
    canvas: int = 32,
    num_frames: int = 16,
    fps: float = 8.0,
    digit_scale: int = 2,
    split: str = "train",
    crf: int = 10,
    progress: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Write `num_videos` clips to `out_dir` as `{i:06d}.mp4` (H.264), `.txt` (caption) and
    `.json` (meta). Same arguments -> byte-identical files; complete files are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_one = partial(
        write_digit_video, out_dir, seed=seed, canvas=canvas, num_frames=num_frames, fps=fps,
        digit_scale=digit_scale, split=split, crf=crf,
    )
    return _map_indices(write_one, num_videos, workers, progress, f"digits {split}", "clip")


def write_digit_image(
    out_dir: str | Path,
    index: int,
    seed: int = 0,
    canvas: int = 32,
    digit_scale: int = 2,
    split: str = "train",
) -> Path:
    """Write image `index` as `{index:06d}.png/.txt/.json` unless already there; returns the png."""
    from PIL import Image

    out_dir = Path(out_dir)
    pixels, meta = make_digit_image(derived_seed(seed, index, split), canvas, digit_scale, split)
    stem = out_dir / f"{index:06d}"
    png, txt, meta_path = stem.with_suffix(".png"), stem.with_suffix(".txt"), stem.with_suffix(".json")
    meta_text = _meta_json(meta)
    if not _is_complete(png, txt, meta_path, meta_text):
        # RGB like the videos, so image and video samples decode to the same channel count.
        buffer = io.BytesIO()
        Image.fromarray(np.repeat(pixels[..., None], 3, axis=-1), mode="RGB").save(buffer, format="PNG")
        write_atomic(png, buffer.getvalue())
        write_atomic(txt, image_caption_for(meta["digit"]))
        write_atomic(meta_path, meta_text)
    return png


def write_digit_images(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    canvas: int = 32,
    digit_scale: int = 2,
    split: str = "train",
    progress: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Write `num_images` stills as `{i:06d}.png` (RGB), `.txt` ("a handwritten 7") and `.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_one = partial(write_digit_image, out_dir, seed=seed, canvas=canvas, digit_scale=digit_scale, split=split)
    return _map_indices(write_one, num_images, workers, progress, f"digit images {split}", "img")


def _map_indices(
    write_one: Callable[[int], Path], count: int, workers: int, progress: bool, desc: str, unit: str
) -> list[Path]:
    """Run `write_one(i)` for i < count, in a process pool when `workers > 1`. Each item is
    a pure function of its index, so the files do not depend on the worker count."""
    from tqdm import tqdm

    _source_digits()  # load (and import sklearn) once here, so forked workers inherit it
    bar = partial(tqdm, total=count, desc=desc, unit=unit, disable=not progress)
    if workers <= 1 or count < 2 * workers:
        return list(bar(map(write_one, range(count))))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunksize = max(1, min(64, count // (4 * workers)))
        return list(bar(pool.map(write_one, range(count), chunksize=chunksize)))
